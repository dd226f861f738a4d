"""`make gpu-check`: the CUDA tests and the ViT-B/16 LUT and MAE steps on one GPU, sized for a short loan of a machine.

    python tools/gpu_check.py                       # the GPU check; results in $GPU_CHECK_DIR/gpu_check.json
    python tools/gpu_check.py --device cpu --model lut_vit_tiny_patch16 --input_size 32 --patch_size 8 --batch_size 2

Each part runs in its own process under its own time limit (and all together under --budget_s), so a hang or a
failure costs that part only; the JSON is rewritten after every part and one table is printed at the end. Without a
GPU the CUDA parts are skipped and said so. The exit status is 1 when a part failed or timed out, and when nvidia-smi
lists a GPU that torch cannot use (a wheel built for another driver must not pass as "skipped").
"""
import argparse
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import torch  # noqa: E402

import benchmark  # noqa: E402

# Dense bf16 tensor-core peaks from NVIDIA's data sheets (TFLOP/s, without sparsity), matched in this order against
# torch.cuda.get_device_name(); any other GPU gets no MFU (add its peak here).
DATASHEET_BF16_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.5), ("H100", 989.4),
                         ("GH200", 989.4), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.1), ("A10G", 70.0),
                         ("L4", 121.0)]
# Seconds for each part; each also gets no more than what is left of --budget_s.
LIMITS = {"cuda_tests": 150, "step": 45, "compiled_step": 100, "pipeline": 40}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("GPU_CHECK_DIR", "output_dir/gpu_check"),
                        help="folder of gpu_check.json (default $GPU_CHECK_DIR, else output_dir/gpu_check)")
    parser.add_argument("--device", default=None, help="default cuda where torch sees a GPU; cpu only for trying it")
    parser.add_argument("--model", default="lut_vit_base_patch16", help="the LUT model; MAE's of the same size too")
    parser.add_argument("--batch_size", default=128, type=int)
    parser.add_argument("--input_size", default=224, type=int)
    parser.add_argument("--patch_size", default=16, type=int)
    parser.add_argument("--head_mlp_dim", default=4096, type=int)
    parser.add_argument("--warmup", default=3, type=int, help="untimed steps first (compilation happens here)")
    parser.add_argument("--repeats", default=10, type=int, help="timed steps; the median is reported")
    parser.add_argument("--num_images", default=60, type=int, help="synthetic JPEGs for the input pipeline")
    parser.add_argument("--budget_s", default=290, type=float, help="all parts together; the last ones are skipped")
    parser.add_argument("--no_compiled_mae", action="store_true", help="skip the compiled MAE step")
    parser.add_argument("--no_compile", action="store_true", help="skip both compiled steps")
    return parser.parse_args(argv)


def nvidia_smi_gpus():
    """GPU lines of `nvidia-smi -L` (empty without the tool or a GPU)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line for line in out.splitlines() if line.startswith("GPU ")]


def datasheet_peak(device_name):
    return next((tflops * 1e12 for key, tflops in DATASHEET_BF16_TFLOPS if key in device_name), None)


def run_cuda_tests(limit):
    """pytest on the CUDA cases of tests/test_gpu.py (marked cuda): status, pytest's summary line, what failed."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/test_gpu.py"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(status="timeout", detail=f"over {limit:.0f} s")
    lines = [line for line in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    summary = lines[-1].strip("= ") if lines else proc.stdout[-300:] + proc.stderr[-300:]
    failing = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return dict(status="ok" if proc.returncode == 0 else "failed", detail=summary, failing=failing)


def _child(conn, kind, argv, name, compiled):
    try:
        args = benchmark.parse_args(argv)
        if kind == "step":
            result = benchmark.measure_step(args, name, compiled)
        else:
            import tempfile
            with tempfile.TemporaryDirectory() as folder:
                result = benchmark.measure_pipeline(args, benchmark.synthetic_jpegs(folder, args.num_images))
        conn.send(dict(status="ok", **result))
    except BaseException as e:  # reported, never raised: the parent carries on with the next part
        conn.send(dict(status="failed", detail=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))


def in_process(limit, kind, argv, name=None, compiled=False):
    """Run one benchmark part in a fresh process (its own CUDA context), killed after `limit` seconds."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, kind, argv, name, compiled), daemon=True)
    proc.start()
    result = receive.recv() if receive.poll(limit) else dict(status="timeout", detail=f"over {limit:.0f} s")
    proc.join(5)
    if proc.is_alive():
        proc.kill()
    return result


def main(args):
    start = time.monotonic()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_check.json")
    gpus, cuda = nvidia_smi_gpus(), torch.cuda.is_available()
    device = args.device or ("cuda" if cuda else "cpu")
    report = dict(torch=torch.__version__, cuda_runtime=torch.version.cuda, nvidia_smi=gpus, torch_sees_cuda=cuda,
                  device=torch.cuda.get_device_name(0) if cuda else "cpu", config=vars(args), parts={})
    problems = []
    if gpus and not cuda:
        problems.append(f"nvidia-smi lists {len(gpus)} GPU(s) but torch {torch.__version__} (CUDA "
                        f"{torch.version.cuda}) cannot use them: a torch wheel built for another driver?")

    def record(part, result):
        result["seconds"] = round(time.monotonic() - part_start, 1)
        report["parts"][part] = result
        if result["status"] in ("failed", "timeout"):
            problems.append(f"{part}: {result['status']} ({result.get('detail', '')})")
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=1, default=str)
        os.replace(path + ".tmp", path)
        print(f"gpu-check: {part}: {result['status']} in {result['seconds']} s", file=sys.stderr, flush=True)

    def budget_left():
        return args.budget_s - (time.monotonic() - start)

    def limit(part):
        return min(LIMITS[part], budget_left())

    peak = datasheet_peak(report["device"]) if device == "cuda" else None
    report["peak_flops_per_s"] = peak
    report["peak_source"] = ("the data sheet's dense bf16 peak" if peak else "no peak: CPU" if device != "cuda" else
                             "no peak: a GPU missing from DATASHEET_BF16_TFLOPS")
    argv = ["--model", args.model, "--batch_size", str(args.batch_size), "--input_size", str(args.input_size),
            "--patch_size", str(args.patch_size), "--head_mlp_dim", str(args.head_mlp_dim), "--device", device,
            "--amp", "bf16", "--num_images", str(args.num_images), "--warmup", str(args.warmup),
            "--repeats", str(args.repeats)]
    mae = "mae" + args.model[3:]
    # The most telling parts first: what the budget leaves out is the last, the optional compiled MAE step.
    compiled = [] if args.no_compile else [args.model] if args.no_compiled_mae else [args.model, mae]
    parts = ([("step", args.model, False), ("step", mae, False), ("pipeline", None, False), ("cuda_tests", None, False)]
             + [("compiled_step", name, True) for name in compiled])
    for kind, name, compiled in parts:
        part = kind if name is None else f"{name}{' compiled' if compiled else ''}"
        part_start = time.monotonic()
        if kind == "cuda_tests" and not cuda:
            record(part, dict(status="skipped", detail="no CUDA device"))
        elif kind != "pipeline" and device == "cpu" and args.device is None:
            record(part, dict(status="skipped", detail="no CUDA device (--device cpu measures the CPU)"))
        elif budget_left() < 5:
            record(part, dict(status="skipped", detail=f"--budget_s {args.budget_s:.0f} spent"))
        elif kind == "cuda_tests":
            record(part, run_cuda_tests(limit(kind)))
        elif kind == "pipeline":
            # Without a GPU, LUT's device half would run on the CPU at full size, for longer than the part's limit.
            no_gpu = ["--device_half_batch", "0"] if device == "cpu" and args.device is None else []
            record(part, in_process(limit(kind), "pipeline", argv + no_gpu))
        else:
            result = in_process(limit(kind), "step", argv + (["--peak_tflops", str(peak / 1e12)] if peak else []),
                                name, compiled)
            if result["status"] == "ok":
                result["mfu"] = result["achieved_flops_per_s"] / peak if peak else None
            record(part, result)
    summarise(report)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    print_table(report, path)
    for problem in problems:
        print(f"gpu-check FAILED: {problem}")
    return 1 if problems else 0


def summarise(report):
    """The workers per GPU each measured step needs: its images/s over one worker's images/s (two views for LUT)."""
    pipeline = report["parts"].get("pipeline", {})
    rates = pipeline.get("images_per_s", {}) if pipeline.get("status") == "ok" else {}
    report["workers_per_gpu"] = {
        part: math.ceil(step["images_per_s"] / rates[step["model"][:3]])
        for part, step in report["parts"].items()
        if step.get("status") == "ok" and "images_per_s" in step and rates.get(step.get("model", "")[:3])}


def print_table(report, path):
    print(f"\ngpu-check on {report['device']} (torch {report['torch']}, CUDA {report['cuda_runtime']}); "
          f"MFU against {report['peak_source']}")
    rows = [("part", "status", "step ms", "img/s", "MFU", "peak mem", "attention", "workers/GPU", "s")]
    for part, r in report["parts"].items():
        ok = r["status"] == "ok" and "step_time_s" in r
        rows.append((part, r["status"], f"{r['step_time_s'] * 1e3:.1f}" if ok else "",
                     f"{r['images_per_s']:.1f}" if ok else "", f"{r['mfu']:.1%}" if ok and r.get("mfu") else "",
                     f"{r['peak_memory_bytes'] / 2 ** 30:.2f} GiB" if ok else "",
                     (",".join(r["attention_kernels"]) or "math") if ok else "",
                     str(report["workers_per_gpu"].get(part, "")), f"{r['seconds']:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:  # names and status left-aligned, numbers right-aligned
        print("  ".join(v.ljust(w) if i < 2 or i == 6 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    for part, r in report["parts"].items():
        if r["status"] != "ok" or part == "cuda_tests":
            print(f"  {part}: {r['status']}: {r.get('detail', '')}")
        if part == "pipeline" and r["status"] == "ok":
            print("  input pipeline, images/s per DataLoader worker on this CPU: "
                  + ", ".join(f"{name} {rate:.1f}" for name, rate in r["images_per_s"].items()))
            half = r["device_half_s_per_batch"]
            print("  LUT's device half (view 2's photometric chain, normalisation): "
                  + (f"{half * 1e3:.1f} ms per batch of {r['device_half_batch']}" if half is not None else
                     "skipped: no CUDA device"))
    print(f"results: {path}")


if __name__ == "__main__":
    sys.exit(main(parse_args()))
