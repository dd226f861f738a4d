"""Speed of LUT / MAE pre-training: the real training step, its FLOPs and MFU, and the input pipeline.

    # CPU: ViT-S/16, 224 px, batch 8, float32; LUT and MAE of the same size
    python tools/benchmark.py --model lut_vit_small_patch16 --batch_size 8 --device cpu
    # one GPU: ViT-B/16, batch 128, bf16 autocast, eager and torch.compile'd
    python tools/benchmark.py --model lut_vit_base_patch16 --batch_size 128 --device cuda --amp bf16 --compile

The step is engine_pretrain's: `pretrain_step` under the --amp autocast, backward through the GradScaler,
`apply_gradients` (fused AdamW, teacher EMA), on random images already on the device; step time is the median of
--repeats steps after --warmup. FLOPs: torch.utils.flop_counter over one eager step. MFU = achieved FLOP/s /
(--peak_tflops, or the measured torch.mm peak of the step's precision). Peak memory: CUDA, the allocator's peak for
each model; CPU, the process's peak resident memory so far (ru_maxrss), so a row includes the rows above it.
The input pipeline is timed as one DataLoader worker (one process, one torch thread).
"""
import argparse
import copy
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

# Run as a script from anywhere: the repository root holds models_lut, engine_pretrain and util.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models_lut  # noqa: E402
from engine_pretrain import apply_gradients, build_optimizer, masking_noise, pretrain_step  # noqa: E402
from util.augment import LUTTwoViews, mae_transform  # noqa: E402
from util.datasets import PretrainDataset, augmentation_seed, find_images  # noqa: E402

PEAK_DTYPE = {"none": "float32", "bf16": "bfloat16", "fp16": "float16"}  # the matmul precision of each --amp
PEAK_SIZES = {"cpu": (1024, 2048, 4096), "cuda": (4096, 8192, 16384)}  # square torch.mm sizes for the peak
# ImageNet's training images are mostly 500 x 375, 375 x 500 or 500 x 333; some are much larger.
JPEG_SIZES = [(500, 375), (375, 500), (500, 333), (640, 480), (800, 600), (1000, 800)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="lut_vit_small_patch16", choices=sorted(models_lut.MODELS))
    parser.add_argument("--no_compare", action="store_false", dest="compare",
                        help="do not also measure the MAE (for LUT) or LUT (for MAE) model of the same size")
    parser.add_argument("--batch_size", default=8, type=int, help="images per step (LUT: two views each)")
    parser.add_argument("--input_size", default=224, type=int)
    parser.add_argument("--patch_size", default=16, type=int)
    parser.add_argument("--mask_ratio", default=0.75, type=float)
    parser.add_argument("--head_mlp_dim", default=4096, type=int, help="LUT's projector and predictor width")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default=None, choices=sorted(PEAK_DTYPE), help="default bf16 on CUDA, none on CPU")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(pretrain_step)")
    parser.add_argument("--warmup", default=3, type=int, help="untimed steps first (compilation happens here)")
    parser.add_argument("--repeats", default=10, type=int, help="timed steps; the median is reported")
    parser.add_argument("--peak_tflops", default=None, type=float,
                        help="the device's peak TFLOP/s for MFU (default: measured with torch.mm)")
    parser.add_argument("--data_path", default=None, help="images for the input pipeline (default: synthetic JPEGs)")
    parser.add_argument("--num_images", default=60, type=int, help="images for the input pipeline (0 skips it)")
    parser.add_argument("--output_json", default=None)
    # The engine's other arguments, at main_pretrain's defaults; a small constant lr, so that many steps on random
    # images cannot drive the weights to inf.
    parser.set_defaults(w_mae=1.0, w_bc=0.25, model_ema_decay=0.996, weight_decay=0.05, lr=1e-5, seed=0, rank=0,
                        world_size=1)
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    args.amp = args.amp or ("bf16" if args.device.type == "cuda" else "none")
    return args


# torch's flop counter has no formula for the CPU kernel of fused attention, and its backward formulas count the
# score matrix that the fused kernels recompute. Model FLOPs, as MFU is usually defined: forward the two products
# q k^T and softmax(.) v, backward twice that.
def attention_flops(query, key, value, *args, **kwargs):
    return sdpa_flop_count(query, key, value)


def attention_backward_flops(grad_out, query, key, value, *args, **kwargs):
    return 2 * sdpa_flop_count(query, key, value)


FLOP_FORMULAS = {}
for kernel in ("flash_attention_for_cpu", "flash_attention", "efficient_attention", "cudnn_attention"):
    FLOP_FORMULAS[getattr(torch.ops.aten, f"_scaled_dot_product_{kernel}")] = attention_flops
    FLOP_FORMULAS[getattr(torch.ops.aten, f"_scaled_dot_product_{kernel}_backward")] = attention_backward_flops


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype, device, trials=3, min_seconds=0.2):
    """Best FLOP/s of torch.mm on square `dtype` matrices of PEAK_SIZES; each timing lasts about min_seconds."""
    def seconds(a, b, reps):
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        synchronize(device)
        return time.perf_counter() - start

    best = 0.0
    for n in PEAK_SIZES[device.type]:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        seconds(a, b, 1)  # library initialisation, kernel selection
        reps = max(1, int(min_seconds / seconds(a, b, 1)))
        best = max(best, *(2 * n ** 3 * reps / seconds(a, b, reps) for _ in range(trials)))
    return best


def measure_step(args, name, compiled):
    """Time the training step of model `name`, built as main_pretrain builds it; returns a dict of results."""
    device, lut = args.device, name.startswith("lut")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    student = models_lut.MODELS[name](img_size=args.input_size, patch_size=args.patch_size, norm_pix_loss=True,
                                      **(dict(head_mlp_dim=args.head_mlp_dim) if lut else {})).to(device)
    teacher = copy.deepcopy(student).eval().requires_grad_(False) if lut else None
    optimizer = build_optimizer(student, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    views = [torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device) for _ in range(1 + lut)]
    noise = masking_noise(args, 0, 0, args.batch_size, student.num_patches, device)
    step_fn = torch.compile(pretrain_step) if compiled else pretrain_step

    def step(fn):
        terms = fn(student, teacher, views, noise, args)
        scaler.scale(terms["loss"]).backward()
        apply_gradients(optimizer, scaler, student, teacher, args.model_ema_decay)

    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        step(pretrain_step)  # compiled or not, the math is the same
    start = time.perf_counter()
    for _ in range(args.warmup):
        step(step_fn)
    synchronize(device)
    warmup_s, times = time.perf_counter() - start, []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step(step_fn)
        synchronize(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device)
    else:  # ru_maxrss is in kilobytes on Linux, bytes on macOS
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    torch.compiler.reset()  # frees a compiled step's graphs; the next model compiles afresh
    flops, seconds = counter.get_total_flops(), statistics.median(times)
    return dict(model=name, amp=args.amp, compiled=compiled, batch_size=args.batch_size, step_time_s=seconds,
                step_times_s=times, warmup_s=warmup_s, images_per_s=args.batch_size / seconds, flops_per_step=flops,
                achieved_flops_per_s=flops / seconds, peak_memory_bytes=memory)


def synthetic_jpeg(path, width, height, rng):
    """Smooth colour fields over finer texture (a 1/f-like spectrum), so that the JPEG file gets a photo-like size."""
    img = rng.standard_normal((height, width, 3)) * 9 + 128
    for octave in range(1, 8):
        grid = Image.fromarray(rng.integers(0, 256, (2 ** octave, 2 ** octave, 3), np.uint8))
        img += (np.asarray(grid.resize((width, height), Image.BICUBIC), np.float32) - 128) * 0.8 ** (octave + 1)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def measure_pipeline(args, folder):
    """Images/s of one DataLoader worker (one torch thread) for each transform, every image loaded once."""
    if args.data_path:
        paths = find_images(args.data_path)[:args.num_images]
    else:
        paths = [os.path.join(folder, f"{i:05d}.jpg") for i in range(args.num_images)]
        rng = np.random.default_rng(0)
        for i, path in enumerate(paths):
            synthetic_jpeg(path, *JPEG_SIZES[i % len(JPEG_SIZES)], rng)
    for path in paths:  # into the page cache, so that every transform starts alike
        with open(path, "rb") as f:
            f.read()
    transforms = {"lut": (LUTTwoViews(args.input_size), None),  # LUT's two views
                  "lut_fast_decode": (LUTTwoViews(args.input_size), args.input_size),  # with --fast_decode
                  "mae": (mae_transform(args.input_size), None)}
    threads, rates = torch.get_num_threads(), {}
    torch.set_num_threads(1)  # what torch gives each DataLoader worker
    for name, (transform, draft_size) in transforms.items():
        dataset = PretrainDataset(paths, transform, draft_size=draft_size)
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[(i, augmentation_seed(args.seed, 0, i))]
        rates[name] = len(dataset) / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    return dict(source=args.data_path or "synthetic JPEGs", images=len(paths), images_per_s=rates)


def main(args):
    device, dtype = args.device, PEAK_DTYPE[args.amp]
    peak = args.peak_tflops * 1e12 if args.peak_tflops else matmul_peak(getattr(torch, dtype), device)
    report = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda"
                  else f"cpu, {torch.get_num_threads()} threads", peak_flops_per_s=peak,
                  peak_source="--peak_tflops" if args.peak_tflops else f"measured torch.mm {dtype}",
                  config=dict(vars(args)), steps=[], lut_vs_mae=[])
    kind, size = args.model.split("_", 1)
    other = {"lut": "mae", "mae": "lut"}[kind] + "_" + size  # the same size, the other method
    other = other if args.compare and other in models_lut.MODELS else None
    for compiled in [False, True] if args.compile else [False]:
        steps = {}
        for name in [args.model] + ([other] if other else []):
            print(f"measuring {name}{' compiled' if compiled else ''} ...", file=sys.stderr, flush=True)
            steps[name] = measure_step(args, name, compiled)
            steps[name]["mfu"] = steps[name]["achieved_flops_per_s"] / peak
            report["steps"].append(steps[name])
        if other:
            lut, mae = (steps[name] for name in sorted(steps))  # lut_* sorts before mae_*
            report["lut_vs_mae"].append(dict(compiled=compiled,
                                             step_time_ratio=lut["step_time_s"] / mae["step_time_s"],
                                             flop_ratio=lut["flops_per_step"] / mae["flops_per_step"]))
    if args.num_images > 0:
        with tempfile.TemporaryDirectory() as folder:
            report["pipeline"] = measure_pipeline(args, folder)

    header = (f"{'model':<24} {'amp':>4} {'compiled':>8} {'batch':>5} {'step ms':>9} {'img/s':>8} {'GFLOP/img':>9} "
              f"{'TFLOP/s':>8} {'MFU':>6} {'peak mem':>9}")
    print(f"\n{report['device']}; peak {peak / 1e12:.3g} TFLOP/s ({report['peak_source']}); peak mem: "
          + ("CUDA max allocated" if device.type == "cuda" else "process peak RSS so far (ru_maxrss)"))
    print(f"{header}\n{'-' * len(header)}")
    for s in report["steps"]:
        gflop_per_image = s["flops_per_step"] / s["batch_size"] / 1e9
        print(f"{s['model']:<24} {s['amp']:>4} {'yes' if s['compiled'] else 'no':>8} {s['batch_size']:>5} "
              f"{s['step_time_s'] * 1e3:>9.1f} {s['images_per_s']:>8.1f} {gflop_per_image:>9.2f} "
              f"{s['achieved_flops_per_s'] / 1e12:>8.3f} {s['mfu']:>6.1%} {s['peak_memory_bytes'] / 2 ** 30:>5.2f} GiB")
    for r in report["lut_vs_mae"]:
        print(f"LUT / MAE{' compiled' if r['compiled'] else ''}: step time x{r['step_time_ratio']:.3f}, "
              f"FLOPs x{r['flop_ratio']:.3f}")
    if "pipeline" in report:
        p = report["pipeline"]
        print(f"input pipeline, images/s per DataLoader worker ({p['images']} images, {p['source']}): "
              + ", ".join(f"{name} {rate:.1f}" for name, rate in p["images_per_s"].items()))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=1, default=str)  # str: the torch.device
    return report


if __name__ == "__main__":
    main(parse_args())
