"""Speed of LUT / MAE pre-training: the real training step, its FLOPs and MFU, the input pipeline (docs/performance.md).

    python tools/benchmark.py --model lut_vit_small_patch16 --batch_size 8 --device cpu
    python tools/benchmark.py --model lut_vit_base_patch16 --batch_size 128 --device cuda --amp bf16 --compile
"""
import argparse
import functools
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
from engine_pretrain import TrainingForward, apply_gradients, build_optimizer, build_teacher  # noqa: E402
from engine_pretrain import masking_noise, pretrain_step  # noqa: E402
from util.augment import LUTTwoViews, lut_views_on_device, mae_transform  # noqa: E402
from util.datasets import PretrainDataset, augmentation_seed  # noqa: E402
from util.sources import open_images  # noqa: E402

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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=torch.device)
    parser.add_argument("--amp", default=None, choices=sorted(PEAK_DTYPE), help="default bf16 on CUDA, none on CPU")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(pretrain_step)")
    parser.add_argument("--warmup", default=3, type=int, help="untimed steps first (compilation happens here)")
    parser.add_argument("--repeats", default=10, type=int, help="timed steps; the median is reported")
    parser.add_argument("--peak_tflops", type=float, help="the device's peak TFLOP/s for MFU (default: torch.mm's)")
    parser.add_argument("--data_path", default=None, help="images for the input pipeline (default: synthetic JPEGs)")
    parser.add_argument("--num_images", default=60, type=int, help="images for the input pipeline (0 skips it)")
    parser.add_argument("--device_half_batch", default=128, type=int,
                        help="batch size for timing LUT's device half (view 2's photometric chain, normalisation); "
                             "0 skips it")
    parser.add_argument("--output_json", default=None)
    # What the engine reads besides: one process, main_pretrain's defaults, but a small constant lr (random images
    # must not blow up). The models' own defaults weight the losses.
    parser.set_defaults(model_ema_decay=0.996, weight_decay=0.05, lr=1e-5, seed=0, rank=0, world_size=1)
    args = parser.parse_args(argv)
    args.amp = args.amp or ("bf16" if args.device.type == "cuda" else "none")
    views = 2 if args.compare else models_lut.model_class(args.model).num_views  # LUT is measured beside MAE
    try:
        models_lut.check_mask_ratio(args.mask_ratio, (args.input_size // args.patch_size) ** 2, views)
    except ValueError as e:
        parser.error(f"--{e}")
    return args


# torch's flop counter has no formula for the CPU kernel of fused attention, and its backward formulas count the
# score matrix that the fused kernels recompute. Model FLOPs, as MFU is usually defined: forward the two products
# q k^T and softmax(.) v, backward twice that.
FLOP_FORMULAS = {}
for kernel in ("flash_attention_for_cpu", "flash_attention", "efficient_attention", "cudnn_attention"):
    FLOP_FORMULAS[getattr(torch.ops.aten, f"_scaled_dot_product_{kernel}")] = (
        lambda query, key, value, *args, **kwargs: sdpa_flop_count(query, key, value))
    FLOP_FORMULAS[getattr(torch.ops.aten, f"_scaled_dot_product_{kernel}_backward")] = (
        lambda grad_out, query, key, value, *args, **kwargs: 2 * sdpa_flop_count(query, key, value))


def seconds(fn, device, repeats=1):
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def matmul_peak(dtype, device, trials=3, min_seconds=0.2):
    """Best FLOP/s of torch.mm on square `dtype` matrices of PEAK_SIZES; each timing lasts about min_seconds."""
    best = 0.0
    for n in PEAK_SIZES[device.type]:
        mm = functools.partial(torch.mm, *(torch.randn(n, n, device=device, dtype=dtype) for _ in range(2)))
        seconds(mm, device)  # library initialisation, kernel selection
        reps = max(1, int(min_seconds / seconds(mm, device)))
        best = max(best, *(2 * n ** 3 * reps / seconds(mm, device, reps) for _ in range(trials)))
    return best


def measure_step(args, name, compiled):
    """Time the training step of model `name`, built as main_pretrain builds it."""
    device, method = args.device, models_lut.model_class(name)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    student = models_lut.MODELS[name](img_size=args.input_size, patch_size=args.patch_size, norm_pix_loss=True,
                                      **(dict(head_mlp_dim=args.head_mlp_dim) if method.needs_teacher else {}))
    student.to(device)
    model, teacher = TrainingForward(student), build_teacher(student)
    optimizer = build_optimizer(student, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    views = [torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
             for _ in range(method.num_views)]
    noise = masking_noise(args, 0, 0, args.batch_size, student.num_patches, device)

    def step(fn=torch.compile(pretrain_step) if compiled else pretrain_step):
        scaler.scale(fn(model, teacher, views, noise, args)["loss"]).backward()
        apply_gradients(optimizer, scaler, student, teacher, args.model_ema_decay)
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        step(pretrain_step)  # compiled or not, the math is the same
    warmup_s = seconds(step, device, args.warmup)
    times = [seconds(step, device) for _ in range(args.repeats)]
    memory = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"  # ru_maxrss: kB on Linux, B on macOS
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024))
    torch.compiler.reset()  # frees a compiled step's graphs; the next model compiles afresh
    flops, step_time = counter.get_total_flops(), statistics.median(times)
    # The SDPA backend the dispatcher chose (flash, efficient, cudnn, math, or the CPU flash kernel), forward ops only.
    attention = sorted({str(op).removeprefix("aten._scaled_dot_product_") for op in counter.get_flop_counts()["Global"]
                        if "scaled_dot_product" in str(op) and not str(op).endswith("backward")})
    return dict(model=name, amp=args.amp, compiled=compiled, batch_size=args.batch_size, step_time_s=step_time,
                step_times_s=times, warmup_s=warmup_s, images_per_s=args.batch_size / step_time, flops_per_step=flops,
                achieved_flops_per_s=flops / step_time, peak_memory_bytes=memory,
                attention_kernels=attention)


def synthetic_jpegs(folder, count):
    """`count` JPEGs in `folder` (returned): smooth colour fields over finer texture (1/f-like), photo-like in size."""
    rng = np.random.default_rng(0)
    for i in range(count):
        width, height = JPEG_SIZES[i % len(JPEG_SIZES)]
        img = rng.standard_normal((height, width, 3)) * 9 + 128
        for octave in range(1, 8):
            grid = Image.fromarray(rng.integers(0, 256, (2 ** octave, 2 ** octave, 3), np.uint8))
            img += (np.asarray(grid.resize((width, height), Image.BICUBIC), np.float32) - 128) * 0.8 ** (octave + 1)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    return folder


def measure_pipeline(args, data_path):
    """Images/s of one DataLoader worker (one torch thread) for each transform, every image loaded once, and the
    seconds per batch of LUT's device half on args.device."""
    images = open_images(data_path, labelled=False)
    count = min(args.num_images, len(images))
    for i in range(count):  # into the page cache, so that every transform starts alike
        images.read(i)
    transforms = {"lut": (LUTTwoViews(args.input_size), None),
                  "lut_fast_decode": (LUTTwoViews(args.input_size), args.input_size),  # as with --fast_decode
                  "mae": (mae_transform(args.input_size), None)}
    threads, rates, samples = torch.get_num_threads(), {}, {}
    torch.set_num_threads(1)  # what torch gives each DataLoader worker
    for name, (transform, draft_size) in transforms.items():
        dataset = PretrainDataset(images, transform, draft_size=draft_size)
        start = time.perf_counter()
        samples[name] = [dataset[(i, augmentation_seed(args.seed, 0, i))] for i in range(count)]
        rates[name] = count / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    return dict(source=args.data_path or "synthetic JPEGs", images=count, images_per_s=rates,
                device_half_batch=args.device_half_batch,
                device_half_s_per_batch=measure_device_half(args, samples["lut"], args.device_half_batch)
                if args.device_half_batch else None)


def measure_device_half(args, samples, batch_size, repeats=3):
    """Seconds per batch of `batch_size` LUT samples for LUTTwoViews' device half (lut_views_on_device: view 2's
    photometric chain, both views normalised) on args.device, the copy from pinned memory included."""
    batch = torch.utils.data.default_collate([samples[i % len(samples)] for i in range(batch_size)])
    if args.device.type == "cuda":  # as the DataLoader's pin_memory thread hands it over
        view1, view2, params = batch
        batch = view1.pin_memory(), view2.pin_memory(), {key: value.pin_memory() for key, value in params.items()}

    def run():
        lut_views_on_device(*batch, args.device)
    run()  # warm-up
    return seconds(run, args.device, repeats) / repeats


def main(args):
    device, dtype = args.device, PEAK_DTYPE[args.amp]
    peak = args.peak_tflops * 1e12 if args.peak_tflops else matmul_peak(getattr(torch, dtype), device)
    report = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda"
                  else f"cpu, {torch.get_num_threads()} threads", peak_flops_per_s=peak,
                  peak_source="--peak_tflops" if args.peak_tflops else f"measured torch.mm {dtype}",
                  config=dict(vars(args)), steps=[], lut_vs_mae=[])
    other = {"lut": "mae", "mae": "lut"}[args.model[:3]] + args.model[3:]  # the same size, the other method
    names = [args.model] + ([other] if args.compare and other in models_lut.MODELS else [])
    for compiled in [False, True] if args.compile else [False]:
        for name in names:
            print(f"measuring {name}{' compiled' if compiled else ''} ...", file=sys.stderr, flush=True)
            step = measure_step(args, name, compiled)
            report["steps"].append(dict(step, mfu=step["achieved_flops_per_s"] / peak))
        if len(names) == 2:
            lut, mae = sorted(report["steps"][-2:], key=lambda step: step["model"])  # lut_* sorts before mae_*
            report["lut_vs_mae"].append(dict(compiled=compiled, step_time_ratio=lut["step_time_s"] / mae["step_time_s"],
                                             flop_ratio=lut["flops_per_step"] / mae["flops_per_step"]))
    memory = "CUDA max allocated" if device.type == "cuda" else "process peak RSS so far (ru_maxrss)"
    print(f"\n{report['device']}; peak {peak / 1e12:.3g} TFLOP/s ({report['peak_source']}); peak mem: {memory}")
    header = ("model", "amp", "compiled", "batch", "step ms", "img/s", "GFLOP/img", "TFLOP/s", "MFU", "peak mem")
    rows = [header] + [(s["model"], s["amp"], "yes" if s["compiled"] else "no", s["batch_size"],
                        f"{s['step_time_s'] * 1e3:.1f}", f"{s['images_per_s']:.1f}",
                        f"{s['flops_per_step'] / s['batch_size'] / 1e9:.2f}", f"{s['achieved_flops_per_s'] / 1e12:.3f}",
                        f"{s['mfu']:.1%}", f"{s['peak_memory_bytes'] / 2 ** 30:.2f} GiB") for s in report["steps"]]
    for row in rows:
        print(f"{row[0]:<24}" + "".join(f"{value:>10}" for value in row[1:]))
    for r in report["lut_vs_mae"]:
        print(f"LUT / MAE{' compiled' if r['compiled'] else ''}: step time x{r['step_time_ratio']:.3f}, "
              f"FLOPs x{r['flop_ratio']:.3f}")
    if args.num_images > 0:
        with tempfile.TemporaryDirectory() as folder:
            data_path = args.data_path or synthetic_jpegs(folder, args.num_images)
            report["pipeline"] = p = measure_pipeline(args, data_path)
        print(f"input pipeline, images/s per DataLoader worker ({p['images']} images, {p['source']}): "
              + ", ".join(f"{name} {rate:.1f}" for name, rate in p["images_per_s"].items()))
        if p["device_half_s_per_batch"] is not None:
            print(f"LUT's device half (view 2's photometric chain, normalisation) on {args.device}: "
                  f"{p['device_half_s_per_batch'] * 1e3:.1f} ms per batch of {p['device_half_batch']}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=1, default=str)  # str: the torch.device
    return report


if __name__ == "__main__":
    main(parse_args())
