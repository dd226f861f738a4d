"""Speed work never changes results: the optimised step and input pipeline against straightforward versions, and
tools/benchmark.py end to end."""
import argparse
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from timm.layers import Mlp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import engine_pretrain
from engine_pretrain import CompiledStep, apply_gradients, build_optimizer, pretrain_step
from models_lut import LUT, MaskedAutoencoderViT
from util.augment import BICUBIC, LUTTwoViews
from util.datasets import PretrainDataset, load_image
from util.onednn import AVAILABLE as ONEDNN_AVAILABLE, OneDNNLinear, OneDNNMlp, use_onednn_linears

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import benchmark  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
            decoder_num_heads=2, norm_pix_loss=True)
ARGS = argparse.Namespace(mask_ratio=0.75, w_mae=1.0, w_bc=0.25, amp="none", weight_decay=0.05, lr=1e-3)


def tiny_pair(lut):
    torch.manual_seed(0)
    student = LUT(**TINY, head_mlp_dim=64) if lut else MaskedAutoencoderViT(**TINY)
    if not lut:
        return student.train(), None
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    with torch.no_grad():  # a teacher that differs from the student, with non-trivial BN running statistics
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
        teacher.head[1].running_mean.normal_()
        teacher.head[1].running_var.uniform_(0.5, 2.0)
    return student.train(), teacher


def straightforward_terms(model, teacher, x1, x2, noise):
    """SPEC §2 written out view by view: the teacher encodes each full view on its own, the student each masked
    view in its own call, the heads see one view each; masks from argsort(noise), loss 2 - 2 cos."""
    L = noise.shape[1]
    n = int(L * (1 - ARGS.mask_ratio))
    perm = noise.argsort(dim=1)
    keep1, keep2 = perm[:, :n], perm[:, n:2 * n]
    mask1 = torch.ones_like(noise).scatter_(1, keep1, 0.0)
    latent1 = model.forward_encoder(x1, keep1)
    pred = model.forward_decoder(latent1, perm.argsort(dim=1))
    mim = model.forward_loss(x1, pred, mask1)
    if teacher is None:
        return dict(loss=mim)
    latent2 = model.forward_encoder(x2, keep2)
    q1 = model.predictor(model.head(latent1[:, 1:].mean(dim=1)))
    q2 = model.predictor(model.head(latent2[:, 1:].mean(dim=1)))
    with torch.no_grad():
        k1 = teacher.head(teacher.forward_encoder(x1)[:, 1:].mean(dim=1))
        k2 = teacher.head(teacher.forward_encoder(x2)[:, 1:].mean(dim=1))
    bc = ((2 - 2 * F.cosine_similarity(q1, k2)).mean() + (2 - 2 * F.cosine_similarity(q2, k1)).mean()) / 2
    return dict(loss=ARGS.w_mae * mim + ARGS.w_bc * bc, mim=mim, bc=bc)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lut", [True, False], ids=["lut", "mae"])
def test_optimised_step_gives_the_losses_and_gradients_of_the_straightforward_step(lut):
    model, teacher = tiny_pair(lut)
    reference, reference_teacher = copy.deepcopy(model), copy.deepcopy(teacher)
    for m in (model, teacher) if lut else (model,):
        use_onednn_linears(m)  # as main_pretrain builds them; the reference keeps nn.Linear
    torch.manual_seed(1)
    x1, x2, noise = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32), torch.rand(6, 16)

    terms = pretrain_step(model, teacher, [x1, x2] if lut else [x1], noise, ARGS)
    terms["loss"].backward()
    want = straightforward_terms(reference, reference_teacher, x1, x2, noise)
    want["loss"].backward()

    assert terms.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(terms[name], want[name], rtol=1e-5, atol=1e-6)
    got, expected = grads(model), grads(reference)
    assert got.keys() == expected.keys() and len(got) == sum(p.requires_grad for p in model.parameters())
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    # The BatchNorm running statistics (updated per view) agree too.
    for (name, a), b in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_optimizer_and_teacher_update_match_plain_loops():
    model, teacher = tiny_pair(lut=True)
    reference, teacher_before = copy.deepcopy(model), copy.deepcopy(teacher)
    torch.manual_seed(1)
    for p, q in zip(model.parameters(), reference.parameters()):
        if p.requires_grad:
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
    optimizer = build_optimizer(model, ARGS, torch.device("cpu"))
    assert optimizer.defaults["fused"]
    apply_gradients(optimizer, torch.amp.GradScaler("cpu", enabled=False), model, teacher, momentum=0.9)

    trained = [(n, p) for n, p in reference.named_parameters() if p.requires_grad]
    decay = [p for n, p in trained if p.ndim >= 2 and n not in reference.no_weight_decay()]
    no_decay = [p for n, p in trained if p.ndim < 2 or n in reference.no_weight_decay()]
    plain = torch.optim.AdamW([dict(params=decay, weight_decay=ARGS.weight_decay),
                               dict(params=no_decay, weight_decay=0.0)],
                              lr=ARGS.lr, betas=(0.9, 0.95), foreach=False)
    plain.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
        assert a.grad is None  # cleared for the next accumulation window
    assert not torch.equal(model.blocks[0].attn.qkv.weight, teacher_before.blocks[0].attn.qkv.weight)
    for (name, t), t0, s in zip(teacher.state_dict().items(), teacher_before.state_dict().values(),
                                model.state_dict().values()):
        want = 0.9 * t0 + 0.1 * s if t.is_floating_point() else s
        torch.testing.assert_close(t, want, rtol=1e-6, atol=1e-7, msg=name)


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch, capsys):
    calls = []

    def failing_compile(fn):
        def compiled(*args):
            calls.append(1)
            raise torch._dynamo.exc.TorchDynamoException("no C++ compiler found")
        return compiled

    monkeypatch.setattr(engine_pretrain.torch, "compile", failing_compile)
    model, teacher = tiny_pair(lut=True)
    x1, x2, noise = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.rand(4, 16)
    step = CompiledStep()
    terms = step(model, teacher, [x1, x2], noise, ARGS)
    step(model, teacher, [x1, x2], noise, ARGS)
    out = capsys.readouterr().out
    assert out.count("WARNING: torch.compile failed") == 1 and "no C++ compiler found" in out
    assert calls == [1]  # not retried
    torch.testing.assert_close(terms["loss"], straightforward_terms(model, teacher, x1, x2, noise)["loss"])


@pytest.mark.slow
@pytest.mark.skipif(not engine_pretrain._COMPILE_BACKWARD_NOW, reason="this torch compiles backward graphs lazily only")
def test_backward_compile_failure_also_falls_back_to_eager(monkeypatch, capsys):
    """torch compiles the backward graph lazily, at the first backward, outside CompiledStep's fallback; CompiledStep
    compiles it in its own call, so a failure there also ends in eager mode (and the backward works)."""
    import torch._inductor.compile_fx as compile_fx
    compile_inner = compile_fx._compile_fx_inner

    def failing_backward(*args, **kwargs):
        if kwargs.get("is_backward"):
            raise RuntimeError("injected backward compile failure")
        return compile_inner(*args, **kwargs)

    monkeypatch.setattr(compile_fx, "_compile_fx_inner", failing_backward)
    model, teacher = tiny_pair(lut=True)
    reference = copy.deepcopy(model)
    x1, x2, noise = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.rand(4, 16)
    step = CompiledStep()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):  # compile, do not load a cached graph
        terms = step(model, teacher, [x1, x2], noise, ARGS)
    terms["loss"].backward()
    out = capsys.readouterr().out
    assert step.compiled is None and "torch.compile failed (RuntimeError: injected backward compile failure)" in out
    want = pretrain_step(reference, teacher, [x1, x2], noise, ARGS)
    want["loss"].backward()
    expected = grads(reference)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_compiled_step_matches_eager_step():
    model, teacher = tiny_pair(lut=True)
    use_onednn_linears(model), use_onednn_linears(teacher)  # as main_pretrain builds them
    reference = copy.deepcopy(model)
    x1, x2, noise = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.rand(4, 16)
    step = CompiledStep()
    terms = step(model, teacher, [x1, x2], noise, ARGS)
    assert step.compiled is not None, "compilation failed on this machine"
    terms["loss"].backward()
    want = pretrain_step(reference, teacher, [x1, x2], noise, ARGS)
    want["loss"].backward()
    for name in want:
        torch.testing.assert_close(terms[name], want[name], rtol=1e-5, atol=1e-6)
    expected = grads(reference)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------- oneDNN linear layers

def onednn_flops(fn):
    """fn()'s result and the FLOPs it ran through oneDNN's linear."""
    with FlopCounterMode(display=False, custom_mapping=benchmark.FLOP_FORMULAS) as counter:
        out = fn()
    return out, counter.get_flop_counts()["Global"].get(torch.ops.lut.onednn_linear, 0)


@pytest.mark.skipif(not ONEDNN_AVAILABLE, reason="this torch has no oneDNN")
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_gives_the_outputs_and_gradients_of_nn_linear(bias):
    torch.manual_seed(0)
    reference = nn.Linear(24, 40, bias=bias)
    fast = use_onednn_linears(copy.deepcopy(reference))
    assert type(fast) is OneDNNLinear and fast.state_dict().keys() == reference.state_dict().keys()
    x, grad = torch.randn(3, 7, 24), torch.randn(3, 7, 40)
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()

    def forward_backward():
        out = fast(x_fast)
        out.backward(grad)
        return out
    out, flops = onednn_flops(forward_backward)
    want = reference(x_ref)
    want.backward(grad)
    assert flops == 2 * (2 * 21 * 24 * 40)  # the forward and the input gradient; the weight gradient is torch.mm's
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_fast.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(fast.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)
    with torch.no_grad():
        out, flops = onednn_flops(lambda: fast(x))
    assert flops > 0 and not out.requires_grad
    torch.testing.assert_close(out, want.detach(), rtol=1e-5, atol=1e-6)


class OpNames(TorchDispatchMode):
    """Records the name of every op that runs."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not ONEDNN_AVAILABLE, reason="this torch has no oneDNN")
def test_onednn_mlp_fuses_gelu_into_fc1_without_autograd_only():
    torch.manual_seed(0)
    reference = Mlp(24, 96)
    fast = use_onednn_linears(copy.deepcopy(reference))
    assert type(fast) is OneDNNMlp and type(fast.fc1) is type(fast.fc2) is OneDNNLinear
    x = torch.randn(3, 7, 24)
    with torch.no_grad(), OpNames() as ops:
        out = fast(x)
    assert "gelu" not in ops.names and ops.names.count("onednn_linear") == 2
    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-6)
    with OpNames() as ops:  # with autograd, GELU stays separate: its backward needs fc1's output
        out = fast(x)
    assert "gelu" in ops.names and out.requires_grad


@pytest.mark.skipif(not ONEDNN_AVAILABLE, reason="this torch has no oneDNN")
def test_onednn_linear_is_nn_linear_under_autocast_and_for_other_dtypes():
    torch.manual_seed(0)
    reference = nn.Linear(24, 40)
    fast = use_onednn_linears(copy.deepcopy(reference))
    x = torch.randn(5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, flops = onednn_flops(lambda: fast(x))
        want = reference(x)
    assert flops == 0 and out.dtype == torch.bfloat16 and torch.equal(out, want)
    fast.double(), reference.double()
    out, flops = onednn_flops(lambda: fast(x.double()))
    assert flops == 0 and torch.equal(out, reference(x.double()))


@pytest.mark.skipif(not ONEDNN_AVAILABLE, reason="this torch has no oneDNN")
def test_step_flops_are_counted_the_same_with_onednn_linears():
    model, teacher = tiny_pair(lut=True)
    x1, x2, noise = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.rand(4, 16)
    counts = []
    for convert in (False, True):
        m, t = copy.deepcopy(model), copy.deepcopy(teacher)
        if convert:
            use_onednn_linears(m), use_onednn_linears(t)
        with FlopCounterMode(display=False, custom_mapping=benchmark.FLOP_FORMULAS) as counter:
            pretrain_step(m, t, [x1, x2], noise, ARGS)["loss"].backward()
        counts.append(counter.get_flop_counts()["Global"])
    plain, onednn = counts
    assert torch.ops.lut.onednn_linear not in plain
    # Every forward matmul of the step (students, teacher and heads) and every input gradient moved to oneDNN.
    assert onednn[torch.ops.lut.onednn_linear] == plain[torch.ops.aten.addmm] + plain[torch.ops.aten.mm] \
        - onednn[torch.ops.aten.mm]
    assert sum(plain.values()) == sum(onednn.values())


def thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


@pytest.mark.skipif(thp_mode() != "madvise", reason="needs transparent huge pages in madvise mode")
def test_main_pretrain_puts_large_cpu_tensors_on_transparent_huge_pages():
    code = ("import main_pretrain, torch; x = torch.ones(64 * 1024 * 1024); "
            "print(sum(int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')))")

    def huge_page_kb(env):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(proc.stdout.split()[-1])

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert huge_page_kb(env) > 0  # the 256 MB tensor (torch reads the variable main_pretrain sets)
    assert huge_page_kb({**env, "THP_MEM_ALLOC_ENABLE": "0"}) == 0  # and the user can turn it off


# ---------------------------------------------------------------- input pipeline

def photo(width, height, path):
    rng = np.random.default_rng(0)
    benchmark.natural_image(width, height, rng).save(path, quality=90)
    return str(path)


def test_shared_resize_gives_the_views_of_resizing_in_each_view(tmp_path):
    img = load_image(photo(300, 200, tmp_path / "a.jpg"))
    views = LUTTwoViews(64)
    per_view = [T.Compose([T.Resize(64, interpolation=BICUBIC), *v.transforms]) for v in (views.view1, views.view2)]
    for seed in range(8):
        torch.manual_seed(seed)
        got = views(img)
        torch.manual_seed(seed)
        want = per_view[0](img), per_view[1](img)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_fast_decode_scales_jpegs_down_while_the_shorter_side_stays_above_the_crop(tmp_path):
    big, small = photo(1000, 800, tmp_path / "big.jpg"), photo(500, 375, tmp_path / "small.jpg")
    Image.open(big).save(tmp_path / "big.png")
    assert load_image(big, draft_size=224).size == (500, 400)  # 1/4 would give a 200-pixel side
    assert load_image(big, draft_size=96).size == (125, 100)  # 1/8
    assert load_image(small, draft_size=224).size == (500, 375)  # 1/2 would give 188 < 224
    assert load_image(str(tmp_path / "big.png"), draft_size=224).size == (1000, 800)  # not a JPEG: unchanged
    assert load_image(big).size == (1000, 800)


def test_fast_decode_changes_the_views_only_slightly(tmp_path):
    path = photo(1000, 800, tmp_path / "big.jpg")
    full, fast = PretrainDataset([path], LUTTwoViews(224)), PretrainDataset([path], LUTTwoViews(224), draft_size=224)
    for seed in range(3):
        for a, b in zip(full[(0, seed)], fast[(0, seed)]):
            assert a.shape == b.shape
            # normalised units (one 8-bit level is about 0.017): small resampling differences, same crop and flip
            assert (a - b).abs().mean() < 0.05
            assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.98


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
