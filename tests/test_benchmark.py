"""tools/benchmark.py: its FLOP count, and the report end to end on tiny models."""
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
    step_args = argparse.Namespace(amp="none", mask_ratio=0.75, w_mae=1.0, w_bc=0.25)
    views, noise = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)], torch.rand(4, 16)

    def step_flops(fused):
        for blk in [*model.blocks, *model.decoder_blocks, *teacher.blocks, *teacher.decoder_blocks]:
            blk.attn.fused_attn = fused  # False: timm's explicit q @ k^T, softmax, @ v
        with FlopCounterMode(display=False, custom_mapping=benchmark.FLOP_FORMULAS) as counter:
            pretrain_step(model, teacher, views, noise, step_args)["loss"].backward()
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
    assert "MFU" in proc.stdout and "LUT / MAE" in proc.stdout and "per DataLoader worker" in proc.stdout
