"""The GPU path of pre-training: bf16 autocast, fused AdamW and the compiled step on every device (CPU in CI, CUDA
where there is one: `make gpu-check`), NCCL and resume on CUDA only.

Tiny models, a few seconds each, apart from the compiled step (compilation) and the resume runs (three processes).
"""
import argparse
import copy
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torchvision

from engine_pretrain import TrainingForward, build_optimizer, pretrain_step
from models_lut import LUT
from runs import MICRO_PRETRAIN, assert_same_training_state, run
from util.batchnorm import SyncBatchNorm1d, convert_sync_batchnorm

# The cases `make gpu-check` runs (pytest -m cuda): marked, and skipped where torch sees no GPU.
CUDA_MARKS = (pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


def needs_cuda(test):
    return CUDA_MARKS[0](CUDA_MARKS[1](test))


# Each device-independent check runs on the CPU and, where there is one, on the GPU.
DEVICES = [torch.device("cpu"), pytest.param(torch.device("cuda"), marks=CUDA_MARKS, id="cuda")]
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
            decoder_num_heads=2, norm_pix_loss=True, head_mlp_dim=64)
ARGS = dict(mask_ratio=0.75, w_mae=1.0, w_bc=0.25, weight_decay=0.05, lr=1e-3)


def tiny_lut(device, batch=64):
    """A tiny LUT student (training mode) and its teacher on `device`, random views [B, 3, 32, 32], noise [B, 16]."""
    torch.manual_seed(0)
    student = LUT(**TINY).to(device).train()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    views = [torch.randn(batch, 3, 32, 32, device=device) for _ in range(2)]
    return student, teacher, views, torch.rand(batch, 16, device=device)


def losses_and_grads(step_fn, student, teacher, views, noise, amp):
    """Loss terms and parameter gradients of one step on a copy of `student` (float32 values)."""
    student = copy.deepcopy(student)
    terms = step_fn(TrainingForward(student), teacher, views, noise, argparse.Namespace(amp=amp, **ARGS))
    terms["loss"].backward()
    grads = {n: p.grad.float() for n, p in student.named_parameters() if p.grad is not None}
    return {k: v.detach().float() for k, v in terms.items()}, grads


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_bf16_autocast_step_matches_float32_step(device):
    # bf16 rounds to 8 bits of mantissa (0.4 %): losses within 1 %, all gradients together within 10 % (L2). The
    # broader-context gradients of a random model are sensitive: at batch 8, float32 weights changed by 0.4 % move
    # them by about 10 % already, hence batch 64 (a few percent).
    student, teacher, views, noise = tiny_lut(device)
    terms32, grads32 = losses_and_grads(pretrain_step, student, teacher, views, noise, "none")
    terms16, grads16 = losses_and_grads(pretrain_step, student, teacher, views, noise, "bf16")
    for name in ("loss", "mim", "bc"):
        assert terms16[name].item() == pytest.approx(terms32[name].item(), rel=1e-2)
    assert terms16["loss"].item() != terms32["loss"].item()  # autocast did compute in bf16
    assert grads16.keys() == grads32.keys()
    flat = [torch.cat([g.flatten() for g in grads.values()]) for grads in (grads16, grads32)]
    assert relative_error(*flat) < 0.1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_cuda
def test_sync_batchnorm_with_one_nccl_rank_equals_batchnorm():
    # In a process group SyncBatchNorm1d reduces its statistics with NCCL even for one rank: this checks that path on
    # the GPU (parameters, buffers, outputs, gradients); tests/test_util.py checks the reduction across gloo ranks.
    device = torch.device("cuda")
    student, teacher, views, noise = tiny_lut(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        synced = convert_sync_batchnorm(copy.deepcopy(student))
        assert any(isinstance(m, SyncBatchNorm1d) for m in synced.modules())
        outs = []
        for model in (student, synced):
            out = model(*views, mask_ratio=0.75, noise=noise)
            (out["q1"].square().sum() + out["q2"].sum()).backward()
            heads = [*model.head.modules(), *model.predictor.modules()]
            outs.append(([out["q1"], out["q2"]], [p.grad for m in heads for p in m.parameters(recurse=False)],
                         [b for m in heads for b in m.buffers(recurse=False)]))
        for a, b in zip(*outs):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_fused_adamw_matches_the_per_tensor_loop(device):
    student = tiny_lut(device)[0]
    reference = copy.deepcopy(student)
    args = argparse.Namespace(**ARGS)
    fused = build_optimizer(student, args, device)
    assert fused.defaults["fused"]
    twin = dict(zip(student.parameters(), reference.parameters()))  # the same weight decay groups on the copy
    groups = [dict(params=[twin[p] for p in g["params"]], weight_decay=g["weight_decay"]) for g in fused.param_groups]
    plain = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), foreach=False)
    torch.manual_seed(1)
    for p, q in zip(student.parameters(), reference.parameters()):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    fused.step()
    plain.step()
    for p, q in zip(student.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", [pytest.param(torch.device("cpu"), marks=pytest.mark.slow), *DEVICES[1:]], ids=str)
def test_compiled_step_equals_eager_step(device):
    student, teacher, views, noise = tiny_lut(device)
    eager_terms, eager_grads = losses_and_grads(pretrain_step, student, teacher, views, noise, "none")
    compiled_terms, compiled_grads = losses_and_grads(torch.compile(pretrain_step), student, teacher, views, noise,
                                                      "none")
    torch.testing.assert_close(compiled_terms, eager_terms, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_grads, eager_grads, rtol=1e-4, atol=1e-5)


@needs_cuda
def test_resume_on_cuda_is_bitwise_identical(flat_images, tmp_path):
    def pretrain(out, *flags):  # 256 images: 16 optimizer steps per epoch
        return run([sys.executable, MICRO_PRETRAIN, "--model", "lut_vit_micro", "--input_size", "32", "--patch_size",
                    "8", "--batch_size", "16", "--warmup_epochs", "1", "--num_workers", "0", "--head_mlp_dim", "64",
                    "--print_freq", "4", "--data_path", flat_images, "--epochs", "2", "--device", "cuda",
                    "--output_dir", out, *flags])

    pretrain(tmp_path / "straight")
    pretrain(tmp_path / "resumed", "--stop_at_step", 5)  # mid-epoch 0
    assert "Resumed from" in pretrain(tmp_path / "resumed").stdout
    assert_same_training_state(tmp_path / "straight" / "checkpoint-last.pth",
                               tmp_path / "resumed" / "checkpoint-last.pth")


@needs_cuda
def test_view2_chain_on_cuda_equals_the_cpu_bitwise():
    """util/photometric.py on the GPU: the kernels' float32 and float64 steps (IEEE division and square root, no
    contraction across ops) give the CPU's pixels, which tests/test_photometric.py pins to PIL's."""
    from util.augment import LUTTwoViews, lut_views_on_device
    generator = torch.Generator().manual_seed(0)
    views, samples = LUTTwoViews(64), []
    for seed in range(96):
        smooth = torch.randint(0, 256, (3, 9, 11), generator=generator, dtype=torch.uint8)
        img = torchvision.transforms.functional.to_pil_image(smooth).resize((80, 72), 3)  # bicubic, photo-like
        torch.manual_seed(seed)
        samples.append(views(img))
    batch = torch.utils.data.default_collate(samples)
    on_cpu = lut_views_on_device(*batch, torch.device("cpu"))
    on_cuda = lut_views_on_device(*batch, torch.device("cuda"))
    for cpu, cuda in zip(on_cpu, on_cuda):
        assert torch.equal(cuda.cpu(), cpu)
