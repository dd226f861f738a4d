"""tools/benchmark.py: its FLOP count, and the report end to end on tiny models; tools/gpu_check.py (make gpu-check)
on the CPU: its JSON and table, what it skips without a GPU, its failures and time limits."""
import argparse
import copy
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from engine_pretrain import TrainingForward, pretrain_step
from models_lut import LUT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import benchmark  # noqa: E402
import gpu_check  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
            decoder_num_heads=2, norm_pix_loss=True, head_mlp_dim=32)
TOOL_FLAGS = ["--model", "lut_vit_tiny_patch16", "--input_size", "32", "--patch_size", "8", "--head_mlp_dim", "32"]


def test_flops_per_step_are_linear_in_the_batch_size():
    flops = {}
    for batch in (2, 4):
        args = benchmark.parse_args(TOOL_FLAGS + ["--batch_size", str(batch), "--warmup", "0", "--repeats", "1",
                                                  "--device", "cpu"])
        flops[batch] = benchmark.measure_step(args, args.model, compiled=False)["flops_per_step"]
    assert flops[4] == 2 * flops[2] > 0


def test_fused_attention_flops_equal_those_of_explicit_attention():
    torch.manual_seed(0)
    model = LUT(**TINY)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    step_args = argparse.Namespace(amp="none", mask_ratio=0.75)
    views, noise = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)], torch.rand(4, 16)

    def step_flops(fused):
        for blk in [*model.blocks, *model.decoder_blocks, *teacher.blocks, *teacher.decoder_blocks]:
            blk.attn.fused_attn = fused  # False: timm's explicit q @ k^T, softmax, @ v
        with FlopCounterMode(display=False, custom_mapping=benchmark.FLOP_FORMULAS) as counter:
            pretrain_step(TrainingForward(model), teacher, views, noise, step_args)["loss"].backward()
        return counter.get_flop_counts()["Global"]

    fused, explicit = step_flops(True), step_flops(False)
    attention = sum(v for op, v in fused.items() if "scaled_dot_product" in str(op))
    assert attention > 0 and attention == explicit[torch.ops.aten.bmm]
    assert sum(fused.values()) == sum(explicit.values())


def test_benchmark_reports_both_models_mfu_cost_ratio_and_pipeline(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), *TOOL_FLAGS, "--device", "cpu",
           "--batch_size", "2", "--warmup", "1", "--repeats", "2", "--num_images", "2", "--peak_tflops", "1",
           "--output_json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,  # runs from any folder
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    lut, mae = report["steps"]
    assert (lut["model"], mae["model"]) == ("lut_vit_tiny_patch16", "mae_vit_tiny_patch16")
    for step in (lut, mae):
        assert len(step["step_times_s"]) == 2 and step["peak_memory_bytes"] > 0
        assert step["mfu"] == pytest.approx(step["flops_per_step"] / step["step_time_s"] / 1e12)
    (ratio,) = report["lut_vs_mae"]
    assert ratio["flop_ratio"] == pytest.approx(lut["flops_per_step"] / mae["flops_per_step"])
    assert ratio["flop_ratio"] > 1  # the teacher's two full views and the student's second view
    assert report["pipeline"]["images"] == 2 and min(report["pipeline"]["images_per_s"].values()) > 0
    assert report["pipeline"]["device_half_batch"] == 128 and report["pipeline"]["device_half_s_per_batch"] > 0
    assert "MFU" in proc.stdout and "LUT / MAE" in proc.stdout and "per DataLoader worker" in proc.stdout
    assert "LUT's device half (view 2's photometric chain, normalisation) on cpu: " in proc.stdout


CHECK_FLAGS = ["--device", "cpu", "--model", "lut_vit_tiny_patch16", "--input_size", "32", "--patch_size", "8",
               "--head_mlp_dim", "32", "--batch_size", "2", "--warmup", "0", "--repeats", "2", "--num_images", "2"]


def run_gpu_check(cmd, tmp_path, env=None):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.slow
def test_gpu_check_on_cpu_writes_each_part_to_the_json_in_gpu_check_dir_and_prints_one_table(tmp_path):
    proc = run_gpu_check([sys.executable, "tools/gpu_check.py", *CHECK_FLAGS, "--no_compile"], tmp_path,
                         env={"GPU_CHECK_DIR": str(tmp_path / "check")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    parts = report["parts"]
    assert list(parts) == ["lut_vit_tiny_patch16", "mae_vit_tiny_patch16", "pipeline", "cuda_tests"]
    rate = parts["pipeline"]["images_per_s"]
    for name in ("lut_vit_tiny_patch16", "mae_vit_tiny_patch16"):
        step = parts[name]
        assert step["status"] == "ok" and step["amp"] == "bf16" and step["compiled"] is False
        assert len(step["step_times_s"]) == 2 and step["images_per_s"] == pytest.approx(2 / step["step_time_s"])
        assert step["attention_kernels"] == ["flash_attention_for_cpu"]  # torch's SDPA on CPU, not the math path
        assert step["mfu"] is None  # no data-sheet peak for a CPU
        assert report["workers_per_gpu"][name] == math.ceil(step["images_per_s"] / rate[name[:3]])
    assert parts["cuda_tests"]["status"] == "skipped"
    table = proc.stdout[proc.stdout.index("part "):].splitlines()
    for line, part in zip(table[1:], parts):
        assert line.startswith(part + " ") and parts[part]["status"] in line
    assert "flash_attention_for_cpu" in table[1] and "input pipeline, images/s per DataLoader worker" in proc.stdout
    assert parts["pipeline"]["device_half_s_per_batch"] > 0  # --device cpu given: the device half runs on the CPU
    assert "ms per batch of 128" in proc.stdout


@pytest.mark.slow
def test_gpu_check_without_a_gpu_passes_and_says_what_it_skipped(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: make gpu-check would run the real check")
    proc = run_gpu_check(["make", "gpu-check", f"PY={sys.executable}", f"GPU_CHECK_DIR={tmp_path}"], tmp_path,
                         env={"MAKEFLAGS": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert {part: r["status"] for part, r in parts.items() if r["status"] != "skipped"} == {"pipeline": "ok"}
    assert len(parts) == 6  # the eager and compiled ViT-B/16 LUT and MAE steps, the pipeline, the CUDA tests
    assert parts["pipeline"]["device_half_s_per_batch"] is None  # not LUT's device half at full size on the CPU
    assert proc.stdout.count("skipped: no CUDA device") == 6  # the 5 parts, and the device half


def test_gpu_check_fails_when_nvidia_smi_lists_a_gpu_torch_cannot_use(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    proc = run_gpu_check([sys.executable, "tools/gpu_check.py", "--out", str(tmp_path), "--num_images", "2"],
                         tmp_path, env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1
    assert "nvidia-smi lists 1 GPU(s) but torch" in proc.stdout and "cannot use them" in proc.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["nvidia_smi"] == ["GPU 0: NVIDIA H200 (UUID: GPU-0)"] and report["torch_sees_cuda"] is False


@pytest.mark.slow
def test_a_part_over_its_time_limit_costs_that_part_only(monkeypatch, tmp_path):
    # One second is too short for a child to import torch and build the model: both steps time out and are killed,
    # and the pipeline after them still runs.
    monkeypatch.setitem(gpu_check.LIMITS, "step", 1)
    assert gpu_check.main(gpu_check.parse_args([*CHECK_FLAGS, "--no_compile", "--out", str(tmp_path)])) == 1
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert [parts[name]["status"] for name in ("lut_vit_tiny_patch16", "mae_vit_tiny_patch16", "pipeline")] == \
        ["timeout", "timeout", "ok"]
    assert all(parts[name]["seconds"] < 10 for name in ("lut_vit_tiny_patch16", "mae_vit_tiny_patch16"))


def test_the_cuda_tests_part_runs_the_cuda_cases_of_test_gpu():
    result = gpu_check.run_cuda_tests(120)
    assert result["status"] == "ok", result
    if not torch.cuda.is_available():  # each is skipped here (and pytest exits 0); the CPU cases are left out
        counts = re.fullmatch(r"(\d+) skipped, (\d+) deselected in [\d.]+s", result["detail"])
        skipped, deselected = map(int, counts.groups())
        assert skipped >= 5 and deselected >= 3, result  # bf16, fused AdamW, compiled step, NCCL, resume; 3 on CPU
