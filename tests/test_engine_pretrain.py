"""The pre-training step of engine_pretrain: the same losses, gradients and updates as the method written out
view by view, eager or compiled."""
import argparse
import copy

import pytest
import torch
import torch.nn.functional as F

from engine_pretrain import TrainingForward, apply_gradients, build_optimizer, pretrain_step
from models_lut import LUT, MaskedAutoencoderViT

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
    """docs/method.md written out view by view: the teacher encodes each full view on its own, the student each masked
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
    torch.manual_seed(1)
    x1, x2, noise = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32), torch.rand(6, 16)

    terms = pretrain_step(TrainingForward(model), teacher, [x1, x2] if lut else [x1], noise, ARGS)
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
