"""tools/benchmark.py: FLOP counting and the report, end to end on tiny models."""
import argparse
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from engine_pretrain import pretrain_step
from models_lut import LUT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import benchmark  # noqa: E402

# ---------------------------------------------------------------- the benchmark tool

def test_flops_per_step_are_linear_in_the_batch_size():
    base = ["--model", "lut_vit_tiny_patch16", "--input_size", "32", "--patch_size", "8", "--threads", "1",
            "--warmup", "0", "--repeats", "1"]
    flops = {}
    for batch in (2, 4):
        args = benchmark.get_args_parser().parse_args(base + ["--batch_size", str(batch)])
        args.amp = "none"
        flops[batch] = benchmark.measure_step(args, args.model, False, ["--head_mlp_dim", "32"])["flops_per_step"]
    assert flops[4] == 2 * flops[2] > 0


def test_fused_attention_flops_equal_those_of_explicit_attention():
    def step_flops(model, teacher, fused):
        for m in (model, teacher):
            for blk in [*m.blocks, *m.decoder_blocks]:
                blk.attn.fused_attn = fused
        mapping = benchmark.FLOP_FORMULAS if fused else {}
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            pretrain_step(model, teacher, [x1, x2], noise, ARGS)["loss"].backward()
        return counter.get_flop_counts()["Global"]

    model, teacher = tiny_pair(lut=True)
    x1, x2, noise = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.rand(4, 16)
    fused, explicit = step_flops(model, teacher, True), step_flops(model, teacher, False)
    attention = sum(v for op, v in fused.items() if "scaled_dot_product" in str(op))
    assert attention > 0 and attention == explicit[torch.ops.aten.bmm]
    assert sum(fused.values()) == sum(explicit.values())


def run_benchmark(out, *flags):
    """tools/benchmark.py on tiny LUT and MAE models, one thread, its JSON to `out`."""
    cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--model", "lut_vit_tiny_patch16",
           "--input_size", "32", "--patch_size", "8", "--threads", "1", "--warmup", "1", "--head_mlp_dim", "32",
           "--output_json", str(out), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_benchmark_reports_step_mfu_ratio_and_pipeline(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_benchmark(out, "--batch_size", "2", "--repeats", "2", "--peak_sizes", "64", "128", "--num_images", "3",
                         "--passes", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [s["model"] for s in report["steps"]] == ["lut_vit_tiny_patch16", "mae_vit_tiny_patch16"]
    for s in report["steps"]:
        assert len(s["step_times_s"]) == 2 and s["step_time_s"] > 0 and s["peak_memory_mb"] > 0
        peak = max(report["peak_flops_per_s"]["float32"].values())
        assert s["mfu"] == pytest.approx(s["achieved_flops_per_s"] / peak)
        if ONEDNN_AVAILABLE:
            onednn_peak = max(report["peak_flops_per_s"]["float32_onednn"].values())
            assert s["mfu_vs_onednn_peak"] == pytest.approx(s["achieved_flops_per_s"] / onednn_peak)
    (ratio,) = report["lut_vs_mae"]
    lut, mae = report["steps"]
    assert ratio["flop_ratio"] == lut["flops_per_step"] / mae["flops_per_step"] > 1
    assert report["pipeline"]["images"] == 3 and report["pipeline"]["lut_two_views"] > 0
    assert "MFU" in proc.stdout and "LUT / MAE" in proc.stdout


@pytest.mark.slow
def test_benchmark_reports_a_failed_measurement_and_still_runs_the_others(tmp_path):
    out = tmp_path / "bench.json"
    # One image per step: LUT's BatchNorm heads fail in the step's process, MAE (no BatchNorm) runs.
    proc = run_benchmark(out, "--batch_size", "1", "--repeats", "1", "--peak_sizes", "64", "--num_images", "0")
    assert proc.returncode == 1 and "1 of 2 step measurements failed" in proc.stderr
    lut, mae = json.loads(out.read_text())["steps"]
    assert lut["model"] == "lut_vit_tiny_patch16" and "Expected more than 1 value per channel" in lut["error"]
    assert mae["model"] == "mae_vit_tiny_patch16" and "error" not in mae and mae["mfu"] > 0
    assert proc.stdout.count("lut_vit_tiny_patch16     none      no     1 FAILED: ValueError") == 2  # progress, table
