"""Speed of LUT / MAE pre-training: the real training step, the input pipeline, FLOPs and MFU.

    # ViT-S/16, 224 px, batch 8, float32 on this CPU; LUT and its MAE counterpart (for the time and FLOP ratios)
    python tools/benchmark.py --model lut_vit_small_patch16 --batch_size 8 --device cpu
    # ViT-B/16, batch 128, bf16 on one GPU, eager and torch.compile'd
    python tools/benchmark.py --model lut_vit_base_patch16 --batch_size 128 --device cuda --amp bf16 --compile

The step is engine_pretrain's own code: `pretrain_step` (forward under --amp autocast), backward, `apply_gradients`
(fused AdamW, the teacher's EMA update), on random images already on the device; its time is the median of
--repeats steps after --warmup steps. Each model runs in a fresh process, so its peak memory is its own (CUDA: the
allocator's peak; CPU: peak resident memory above that before the model was built). FLOPs are counted with
torch.utils.flop_counter over one whole step (matmuls, convolutions and attention, forward and backward, the
teacher's forward included). MFU = achieved FLOP/s / the measured dense-matmul peak of the step's precision, the best
torch.mm of square matrices of --peak_sizes (float32 for --amp none, bfloat16 for bf16); the ratio to the best peak of
any precision is reported as well. On CPU the float32 peak of oneDNN's matmul (util/onednn.py, which the step's
linear layers use) is measured too, with the MFU against it ("oneDNN" column): torch.mm runs float32 on MKL, which
is slower than oneDNN on some CPUs (AMD EPYC here).
The input pipeline is timed per DataLoader worker (one process, one thread): `PretrainDataset` with LUT's two
views (full and --fast_decode JPEG decoding) and with MAE's crop, on --data_path or on synthetic JPEGs of
ImageNet-like sizes written to a temporary folder. Any other main_pretrain flag (--mask_ratio, --head_mlp_dim, ...)
configures the model and step as in training. Prints each step measurement as it finishes, then the table; with
--output_json the JSON, written after each step measurement too. A step measurement that fails (an error, or its
process dies) is reported as failed, the others still run, and the exit status is 1.
"""
import argparse
import copy
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

# As main_pretrain.py: transparent huge pages for torch's large CPU tensors, here and in the step's processes.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count  # noqa: E402

# Run as a script from anywhere: the project root holds models_lut, engine_pretrain and util.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import main_pretrain  # noqa: E402
import models_lut  # noqa: E402
from engine_pretrain import CompiledStep, apply_gradients, build_optimizer, masking_noise, pretrain_step  # noqa: E402
from util.augment import LUTTwoViews, mae_transform  # noqa: E402
from util.datasets import PretrainDataset, augmentation_seed, find_images  # noqa: E402
from util.onednn import AVAILABLE as ONEDNN_AVAILABLE, onednn_linear  # noqa: E402

# The matmul precision that bounds a step of each --amp setting.
PEAK_DTYPE = {"none": "float32", "bf16": "bfloat16", "fp16": "float16"}
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
# ImageNet-like JPEG sizes (its training images are mostly 500 x 375 / 375 x 500 / 500 x 333, some much larger).
JPEG_SIZES = [(500, 375), (375, 500), (500, 333), (640, 480), (800, 600), (1000, 800)]


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lut_vit_small_patch16", choices=sorted(models_lut.MODELS))
    parser.add_argument("--no_compare", action="store_false", dest="compare",
                        help="do not also time the MAE (for LUT) or LUT (for MAE) model of the same size")
    parser.add_argument("--batch_size", default=8, type=int, help="images per step (LUT: two views each)")
    parser.add_argument("--input_size", default=224, type=int)
    parser.add_argument("--patch_size", default=16, type=int)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                        help="autocast precision (default bf16 on CUDA, none on CPU), as in main_pretrain")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd step")
    parser.add_argument("--threads", default=CORES, type=int,
                        help="torch threads for the step and the matmul peak (default: all cores)")
    parser.add_argument("--warmup", default=3, type=int, help="untimed steps first (compilation happens here)")
    parser.add_argument("--repeats", default=10, type=int, help="timed steps; the median is reported")
    parser.add_argument("--peak_sizes", default=[1024, 2048, 4096, 8192], type=int, nargs="*",
                        help="square matmul sizes for the peak FLOP/s (none given: no peak, no MFU)")
    parser.add_argument("--data_path", default=None,
                        help="images for the input pipeline (default: synthetic JPEGs in a temporary folder)")
    parser.add_argument("--num_images", default=60, type=int, help="images for the input pipeline (0 skips it)")
    parser.add_argument("--passes", default=3, type=int, help="passes over the images per pipeline measurement")
    parser.add_argument("--skip_step", action="store_true", help="measure the peak and the input pipeline only")
    parser.add_argument("--output_json", default=None)
    return parser


def training_args(args, model, extra):
    """main_pretrain's arguments for `model` (all its defaults, plus `extra` flags) as the step reads them."""
    argv = ["--data_path", "-", "--model", model, "--input_size", str(args.input_size),
            "--patch_size", str(args.patch_size), "--batch_size", str(args.batch_size), "--device", args.device,
            "--amp", args.amp, *extra]
    train_args = main_pretrain.get_args_parser().parse_args(argv)
    # A small constant lr: random images for many steps must not drive the weights to inf.
    train_args.rank, train_args.world_size, train_args.lr = 0, 1, 1e-5
    return train_args


# ---------------------------------------------------------------- FLOPs

def attention_flops(query, key, value, *args, **kwargs):
    """Fused attention: the two products q k^T and (softmax) v, 4 b h s_q s_k d."""
    return sdpa_flop_count(query, key, value)


def attention_backward_flops(grad_out, query, key, value, *args, **kwargs):
    """Model FLOPs of the attention backward, twice the forward's; torch's own formulas also count the score
    matrix that the fused kernels recompute, which MFU (as in PaLM, appendix B) leaves out."""
    return 2 * sdpa_flop_count(query, key, value)


def onednn_linear_flops(input_shape, weight_shape, *args, **kwargs):
    """util/onednn's linear, x [M, K] times weight [N, K] transposed: 2 M K N, as torch counts addmm (no bias)."""
    return 2 * input_shape[0] * input_shape[1] * weight_shape[0]


aten = torch.ops.aten
# torch's flop counter has no formula for the CPU kernel of fused attention (and counts recomputation in backward),
# nor for oneDNN's linear.
FLOP_FORMULAS = {
    torch.ops.lut.onednn_linear: onednn_linear_flops,
    **{op: attention_flops for op in (aten._scaled_dot_product_flash_attention_for_cpu,
                                      aten._scaled_dot_product_flash_attention,
                                      aten._scaled_dot_product_efficient_attention,
                                      aten._scaled_dot_product_cudnn_attention)},
    **{op: attention_backward_flops for op in (aten._scaled_dot_product_flash_attention_for_cpu_backward,
                                               aten._scaled_dot_product_flash_attention_backward,
                                               aten._scaled_dot_product_efficient_attention_backward,
                                               aten._scaled_dot_product_cudnn_attention_backward)},
}


# ---------------------------------------------------------------- machine and peak

def machine_info(device):
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info = dict(cpu=cpu, cores=CORES, torch=torch.__version__, python=platform.python_version())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype, sizes, device, min_seconds=0.5, onednn=False):
    """{n: best FLOP/s of an n x n by n x n matmul} in `dtype`: 3 trials of enough repeats to last min_seconds.
    torch.mm, or with onednn=True oneDNN's matmul (a b^T; CPU)."""
    result = {}
    for n in sizes:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        out = torch.empty(n, n, device=device, dtype=dtype)
        matmul = (lambda: onednn_linear(a, b)) if onednn else (lambda: torch.mm(a, b, out=out))
        if device.type == "cuda":
            matmul()  # cuBLAS initialisation (first size), kernel selection
        synchronize(device)
        start = time.perf_counter()
        matmul()  # an estimate of one matmul's time
        synchronize(device)
        reps = max(1, int(min_seconds / (time.perf_counter() - start)))
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(reps):
                matmul()
            synchronize(device)
            best = min(best, (time.perf_counter() - start) / reps)
        result[n] = 2 * n ** 3 / best
        del a, b, out
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the step processes get the whole GPU
    return result


# ---------------------------------------------------------------- training step

def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the process's peak resident set size (VmHWM) to the current one
    except OSError:
        pass  # then VmHWM is the peak since the process started, still the step's in this fresh process


def resident_mb(field):
    """A memory field of /proc/self/status in MB, VmRSS (now) or VmHWM (peak); None where there is none (not Linux)."""
    if not os.path.exists("/proc/self/status"):
        return None
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 2 ** 10


def peak_memory_mb(device, baseline_mb):
    """CUDA: peak bytes the allocator handed out; CPU: peak resident set size above `baseline_mb`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    peak = resident_mb("VmHWM")
    return None if peak is None else peak - baseline_mb


def measure_step(args, model_name, compiled, extra):
    """Time the training step of `model_name` (run in a fresh process); returns a dict of results."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train_args = training_args(args, model_name, extra)
    baseline_mb = resident_mb("VmRSS") if device.type == "cpu" else 0.0
    torch.manual_seed(0)
    student = main_pretrain.build_model(train_args).to(device)
    # Exactly main_pretrain's set-up: the teacher is a frozen copy in eval mode, the optimizer build_optimizer's.
    teacher = copy.deepcopy(student).eval().requires_grad_(False) if model_name.startswith("lut") else None
    optimizer = build_optimizer(student, train_args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=train_args.amp == "fp16")
    step_fn = CompiledStep() if compiled else pretrain_step
    shape = (args.batch_size, 3, args.input_size, args.input_size)
    views = [torch.randn(shape, device=device) for _ in range(2 if teacher is not None else 1)]
    noise = masking_noise(train_args, 0, 0, args.batch_size, student.num_patches, device)

    def step(fn):
        terms = fn(student, teacher, views, noise, train_args)
        scaler.scale(terms["loss"]).backward()
        apply_gradients(optimizer, scaler, student, teacher, train_args.model_ema_decay)

    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        step(pretrain_step)  # the math is the same compiled or not; the counter sees eager ops
    flops = counter.get_total_flops()
    start = time.perf_counter()
    for _ in range(args.warmup):
        step(step_fn)
    synchronize(device)
    warmup_s = time.perf_counter() - start
    reset_peak_memory(device)
    times = []
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        synchronize(device)
        start = time.perf_counter()
        step(step_fn)
        synchronize(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return dict(model=model_name, compiled=compiled and step_fn.compiled is not None, amp=train_args.amp,
                batch_size=args.batch_size, input_size=args.input_size, patch_size=args.patch_size,
                threads=args.threads, step_time_s=median, step_times_s=times, warmup_s=warmup_s,
                images_per_s=args.batch_size / median, flops_per_step=flops, flops_per_image=flops / args.batch_size,
                achieved_flops_per_s=flops / median, peak_memory_mb=peak_memory_mb(device, baseline_mb),
                memory_kind="CUDA max allocated" if device.type == "cuda"
                else "peak resident set size above the process's before building the model",
                load_average=[load_before, os.getloadavg()[0]])


def measure_step_in_fresh_process(args, model_name, compiled, extra):
    """measure_step in a new process. If it fails (an exception, or the process dies: out of memory, a signal),
    an entry with the error, so that the other measurements still run and are reported."""
    # The process exits on its own when the executor shuts down (terminating it would leak torch.compile's
    # worker pool); if it dies, result() raises BrokenProcessPool instead of waiting forever.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(measure_step, args, model_name, compiled, extra).result()
        except Exception as e:
            traceback.print_exception(e)
            return dict(model=model_name, compiled=compiled, amp=args.amp, batch_size=args.batch_size,
                        error=f"{type(e).__name__}: {e}".strip())


# ---------------------------------------------------------------- input pipeline

def natural_image(width, height, rng):
    """RGB image with roughly natural statistics (1/f-like spectrum: smooth colour fields over finer texture),
    so JPEG files get photo-like sizes (about 3 bits per pixel at quality 90)."""
    img = np.zeros((height, width, 3), np.float32)
    longest = max(width, height)
    for octave in range(1, 8):
        cells = 2 ** octave
        grid = rng.standard_normal((cells * height // longest + 2, cells * width // longest + 2, 3))
        layers = [Image.fromarray(grid[..., c].astype(np.float32)).resize((width, height), Image.BICUBIC)
                  for c in range(3)]
        img += np.stack([np.asarray(layer) for layer in layers], axis=-1) * 60 * 0.8 ** octave
    img += rng.standard_normal(img.shape).astype(np.float32) * 9
    return Image.fromarray(np.clip(img + 128, 0, 255).astype(np.uint8))


def write_jpegs(folder, num_images, seed=0):
    """`num_images` synthetic photos (quality 90) cycling through JPEG_SIZES; returns their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num_images):
        path = os.path.join(folder, f"{i:05d}.jpg")
        natural_image(*JPEG_SIZES[i % len(JPEG_SIZES)], rng).save(path, quality=90)
        paths.append(path)
    return paths


def pipeline_rate(paths, transform, draft_size, passes):
    """Images per second of one DataLoader worker: load and augment every image `passes` times, one thread."""
    dataset = PretrainDataset(paths, transform, draft_size=draft_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what torch gives each DataLoader worker
    try:
        dataset[(0, 0)]
        start = time.perf_counter()
        for p in range(passes):
            for i in range(len(dataset)):
                dataset[(i, augmentation_seed(0, p, i))]
        return passes * len(dataset) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def measure_pipeline(args):
    with tempfile.TemporaryDirectory() as tmp:
        if args.data_path:
            paths = find_images(args.data_path)[:args.num_images]
            source = args.data_path
        else:
            paths = write_jpegs(tmp, args.num_images)
            source = f"synthetic JPEGs, quality 90, sizes {JPEG_SIZES}"
        sizes = []
        for path in paths:
            with Image.open(path) as img:
                sizes.append(img.size)
        mean_kb = sum(os.path.getsize(p) for p in paths) / len(paths) / 1024
        lut, mae = LUTTwoViews(args.input_size), mae_transform(args.input_size)
        return dict(source=source, images=len(paths), mean_pixels=sum(w * h for w, h in sizes) / len(sizes),
                    mean_file_kb=mean_kb, passes=args.passes,
                    lut_two_views=pipeline_rate(paths, lut, None, args.passes),
                    lut_two_views_fast_decode=pipeline_rate(paths, lut, args.input_size, args.passes),
                    mae=pipeline_rate(paths, mae, None, args.passes))


# ---------------------------------------------------------------- report

def counterpart(model_name):
    """The MAE model for a LUT name and vice versa (None if there is none)."""
    kind, rest = model_name.split("_", 1)
    other = {"lut": "mae", "mae": "lut"}.get(kind, "") + "_" + rest
    return other if other in models_lut.MODELS else None


def add_mfu(step, peaks):
    """peaks: {dtype name (float32_onednn: oneDNN's float32 matmul): best matmul FLOP/s}."""
    def ratio(peak):
        return step["achieved_flops_per_s"] / peak if peak else None
    step["mfu"] = ratio(peaks.get(PEAK_DTYPE[step["amp"]]))
    step["mfu_vs_onednn_peak"] = ratio(peaks.get("float32_onednn")) if step["amp"] == "none" else None
    step["mfu_vs_best_peak"] = ratio(max(peaks.values(), default=None))


def lut_vs_mae(steps):
    """Step-time and FLOP ratios of LUT over MAE, for each compile setting where both were timed."""
    ratios = []
    for compiled in (False, True):
        by_kind = {s["model"].split("_", 1)[0]: s for s in steps if s["compiled"] == compiled and "error" not in s}
        if {"lut", "mae"} <= by_kind.keys():
            lut, mae = by_kind["lut"], by_kind["mae"]
            time_ratio = lut["step_time_s"] / mae["step_time_s"]
            flop_ratio = lut["flops_per_step"] / mae["flops_per_step"]
            ratios.append(dict(compiled=compiled, step_time_ratio=time_ratio, flop_ratio=flop_ratio,
                               relative_difference=time_ratio / flop_ratio - 1))
    return ratios


STEP_HEADER = (f"{'model':<24} {'amp':>4} {'compile':>7} {'batch':>5} {'step ms':>9} {'img/s':>8} {'GFLOP/img':>9} "
               f"{'GFLOP/s':>9} {'MFU':>6} {'oneDNN':>6} {'vs best':>7} {'mem MB':>8}")


def step_row(s):
    row = f"{s['model']:<24} {s['amp']:>4} {'yes' if s['compiled'] else 'no':>7} {s['batch_size']:>5}"
    if "error" in s:
        return f"{row} FAILED: {s['error']}"
    mfu, onednn, best = (f"{s[k]:.1%}" if s.get(k) is not None else "-"
                         for k in ("mfu", "mfu_vs_onednn_peak", "mfu_vs_best_peak"))
    return (f"{row} {s['step_time_s'] * 1e3:>9.1f} {s['images_per_s']:>8.1f} {s['flops_per_image'] / 1e9:>9.2f} "
            f"{s['achieved_flops_per_s'] / 1e9:>9.1f} {mfu:>6} {onednn:>6} {best:>7} {s['peak_memory_mb'] or 0:>8.0f}")


def format_report(report):
    m = report["machine"]
    lines = [f"{m['cpu']} ({m['cores']} cores){', ' + m['gpu'] if 'gpu' in m else ''}; torch {m['torch']}; "
             f"device {report['config']['device']}, {report['config']['threads']} threads; "
             f"load average {report['load_average_start']:.2f} at start"]
    for name, by_size in report["peak_flops_per_s"].items():
        sizes = ", ".join(f"{n}: {v / 1e9:.1f}" for n, v in by_size.items())
        lines.append(f"dense matmul peak {name}: {max(by_size.values()) / 1e9:.1f} GFLOP/s (n = {sizes})")
    if report["steps"]:
        lines += [STEP_HEADER, "-" * len(STEP_HEADER)]
        lines += [step_row(s) for s in report["steps"]]
    for r in report["lut_vs_mae"]:
        lines.append(f"LUT / MAE{' (compiled)' if r['compiled'] else ''}: step time x{r['step_time_ratio']:.3f}, "
                     f"FLOPs x{r['flop_ratio']:.3f} ({r['relative_difference']:+.1%})")
    p = report.get("pipeline")
    if p:
        lines.append(f"input pipeline, images/s per worker ({p['images']} images, mean "
                     f"{p['mean_pixels'] / 1e3:.0f} kpixel, {p['mean_file_kb']:.0f} KB): LUT two views "
                     f"{p['lut_two_views']:.1f}, with --fast_decode {p['lut_two_views_fast_decode']:.1f}; "
                     f"MAE {p['mae']:.1f}")
    return "\n".join(lines)


def main(args, extra=()):
    if args.amp is None:
        args.amp = "bf16" if args.device.startswith("cuda") else "none"
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    training_args(args, args.model, extra)  # fail early on a bad extra flag
    report = dict(machine=machine_info(device), config={**vars(args), "extra": list(extra)},
                  load_average_start=os.getloadavg()[0], steps=[], lut_vs_mae=[])

    dtypes = ["float32", "bfloat16"] + (["float16"] if args.amp == "fp16" else [])
    report["peak_flops_per_s"] = {d: matmul_peak(getattr(torch, d), args.peak_sizes, device)
                                  for d in dtypes} if args.peak_sizes else {}
    if args.peak_sizes and device.type == "cpu" and ONEDNN_AVAILABLE:
        report["peak_flops_per_s"]["float32_onednn"] = matmul_peak(torch.float32, args.peak_sizes, device,
                                                                   onednn=True)
    peaks = {d: max(by_size.values()) for d, by_size in report["peak_flops_per_s"].items()}

    if not args.skip_step:
        models = [args.model] + ([counterpart(args.model)] if args.compare and counterpart(args.model) else [])
        runs = [(name, compiled) for compiled in ([False, True] if args.compile else [False]) for name in models]
        print(f"{'':14}{STEP_HEADER}", flush=True)
        for i, (name, compiled) in enumerate(runs):
            start = time.perf_counter()
            step = measure_step_in_fresh_process(args, name, compiled, extra)
            if "error" not in step:
                add_mfu(step, peaks)
            report["steps"].append(step)
            # Progress, and the results so far on disk: a run killed later keeps what it measured.
            print(f"[{i + 1}/{len(runs)} {time.perf_counter() - start:>5.0f} s] {step_row(step)}", flush=True)
            save_report(report, args.output_json)
    report["lut_vs_mae"] = lut_vs_mae(report["steps"])
    if args.num_images > 0:
        report["pipeline"] = measure_pipeline(args)
    report["load_average_end"] = os.getloadavg()[0]

    print(format_report(report))
    save_report(report, args.output_json)
    failed = [s for s in report["steps"] if "error" in s]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(report['steps'])} step measurements failed (see above)")
    return report


def save_report(report, path):
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    args, extra = get_args_parser().parse_known_args()
    main(args, extra)
