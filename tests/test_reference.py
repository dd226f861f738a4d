"""The project's standing proof that it computes what the LUT authors' and FAIR's MAE code compute: their model
classes' outputs on fixed weights, images and masking noise (tests/fixtures/README.md), reproduced by our models
with the same state dicts loaded strictly: masks exactly, losses, predictions, head outputs and every gradient to
float32 round-off."""
import argparse
from pathlib import Path

import torch

from engine_pretrain import TrainingForward, pretrain_step
from models_lut import LUT, MaskedAutoencoderViT, bc_loss, lut_loss

FIXTURES = Path(__file__).parent / "fixtures"


def close(got, want, name, rtol=1e-5):
    """Equal to float32 round-off: each element within rtol of itself, or of the tensor's largest magnitude (the
    projector's BatchNorm over 4 samples scales the round-off of the small values up)."""
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item(), msg=name)


def assert_same_gradients(model, want):
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for name, grad in want.items():
        close(got[name], grad, name, rtol=1e-4)


def test_lut_reproduces_the_authors_masks_losses_heads_and_gradients():
    ref = torch.load(FIXTURES / "lut_reference_tiny.pt", weights_only=True)
    weights = dict(w_mae=ref["w_mae"], w_bc=ref["w_bc"])
    student, teacher = LUT(**ref["cfg"], **weights).train(), LUT(**ref["cfg"]).eval()
    student.load_state_dict(ref["student_state"], strict=True)
    teacher.load_state_dict(ref["teacher_state"], strict=True)
    views, noise, r = [ref["imgs1"], ref["imgs2"]], ref["noise"], ref["mask_ratio"]

    out = student(*views, mask_ratio=r, noise=noise)
    k1, k2 = teacher.forward_teacher(*views)
    assert torch.equal(out["mask1"], ref["mask1"]) and torch.equal(out["mask2"], ref["mask2"])
    close(out["mim_loss"], ref["mae_loss"], "mae_loss")
    close(out["pred"], ref["pred"], "pred")
    close(torch.cat([out["q1"], out["q2"]]), ref["student_q"], "student_q")
    close(torch.cat([k1, k2]), ref["teacher_q"], "teacher_q")
    bc = bc_loss(out["q1"], out["q2"], k1, k2)
    close(bc, ref["bc_loss"], "bc_loss")
    close(lut_loss(out["mim_loss"], bc, ref["w_mae"], ref["w_bc"]), ref["total_loss"], "total_loss")

    # The training step itself (engine_pretrain.pretrain_step, from the same state: BatchNorm running statistics
    # are updated by every student forward).
    student.load_state_dict(ref["student_state"], strict=True)
    args = argparse.Namespace(amp="none", mask_ratio=r)
    terms = pretrain_step(TrainingForward(student), teacher, views, noise, args)
    close(terms["loss"], ref["total_loss"], "pretrain_step loss")
    terms["loss"].backward()
    assert_same_gradients(student, ref["grads"])


def test_mae_reproduces_maes_mask_loss_prediction_and_gradients():
    ref = torch.load(FIXTURES / "mae_reference_tiny.pt", weights_only=True)
    model = MaskedAutoencoderViT(**ref["cfg"]).train()
    model.load_state_dict(ref["state"], strict=True)
    loss, pred, mask = model(ref["imgs"], mask_ratio=ref["mask_ratio"], noise=ref["noise"])
    assert torch.equal(mask, ref["mask"])
    close(loss, ref["loss"], "loss")
    close(pred, ref["pred"], "pred")
    loss.backward()
    assert_same_gradients(model, ref["grads"])
