"""Behaviour of the MAE / LUT pre-training models (docs/method.md, sections 1-3)."""
import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import models_lut
from models_lut import LUT, MaskedAutoencoderViT, bc_loss, lut_loss, random_masking
from util.ema import momentum_at, update_teacher
from util.pos_embed import get_2d_sincos_pos_embed

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
            decoder_num_heads=2)
HEADS = dict(head_mlp_dim=64)


def tiny_lut(**kw):
    torch.manual_seed(0)
    return LUT(**{**TINY, **HEADS, **kw})


def tiny_mae(**kw):
    torch.manual_seed(0)
    return MaskedAutoencoderViT(**{**TINY, **kw})


# ---------------------------------------------------------------- masking

def test_view_masks_keep_exactly_n_and_are_disjoint():
    noise = torch.rand(5, 196)
    ids_keep, masks, _ = random_masking(noise, 0.75, num_views=2)
    n = int(196 * 0.25)
    for keep, mask in zip(ids_keep, masks):
        assert keep.shape == (5, n)
        assert (mask == 0).sum(dim=1).tolist() == [n] * 5
        assert torch.equal(mask.gather(1, keep), torch.zeros(5, n))
    assert ((masks[0] == 0) & (masks[1] == 0)).sum() == 0


def test_view_masks_follow_argsort_of_noise():
    noise = torch.rand(3, 16)
    (keep1, keep2), _, ids_restore = random_masking(noise, 0.5, num_views=2)
    perm = noise.argsort(dim=1)
    assert torch.equal(keep1, perm[:, :8]) and torch.equal(keep2, perm[:, 8:16])
    assert torch.equal(perm.gather(1, ids_restore), torch.arange(16).expand(3, 16))


def test_mae_mask_equals_lut_view1_mask():
    mae, lut = tiny_mae(), tiny_lut()
    imgs = torch.randn(4, 3, 32, 32)
    noise = torch.rand(4, 16)
    _, _, mae_mask = mae(imgs, mask_ratio=0.75, noise=noise)
    out = lut(imgs, imgs.flip(-1), mask_ratio=0.75, noise=noise)
    assert torch.equal(mae_mask, out["mask1"])


def test_mae_and_lut_view1_reconstruction_agree_for_same_weights():
    mae, lut = tiny_mae(), tiny_lut()
    lut.load_state_dict(mae.state_dict(), strict=False)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    loss, pred, _ = mae(imgs, noise=noise)
    out = lut(imgs, torch.randn(2, 3, 32, 32), noise=noise)
    torch.testing.assert_close(out["pred"], pred)
    torch.testing.assert_close(out["mim_loss"], loss)


def test_lut_rejects_mask_ratio_below_half():
    with pytest.raises(ValueError, match="mask_ratio >= 0.5"):
        tiny_lut()(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), mask_ratio=0.4)


def test_noise_of_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="noise must be"):
        tiny_mae()(torch.randn(2, 3, 32, 32), noise=torch.rand(2, 15))


# ---------------------------------------------------------------- reconstruction loss

def test_patchify_order_and_roundtrip():
    model = tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    x = model.patchify(imgs)
    assert x.shape == (2, 16, 8 * 8 * 3)
    # patch (row 1, col 2), pixel (p=3, q=5), channel 2 sits at index (3 * 8 + 5) * 3 + 2
    assert x[1, 1 * 4 + 2, (3 * 8 + 5) * 3 + 2] == imgs[1, 2, 8 + 3, 16 + 5]
    assert torch.equal(model.unpatchify(x), imgs)


def reference_mim_loss(imgs, pred, mask, p, norm_pix):
    """Loops over patches, written independently of patchify."""
    B, C, H, W = imgs.shape
    total, count = 0.0, 0.0
    for b in range(B):
        for i in range(H // p):
            for j in range(W // p):
                patch = imgs[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).reshape(-1).double()
                if norm_pix:
                    m = patch.mean()
                    var = ((patch - m) ** 2).sum() / (patch.numel() - 1)
                    patch = (patch - m) / math.sqrt(var + 1e-6)
                k = i * (W // p) + j
                total += mask[b, k] * ((pred[b, k].double() - patch) ** 2).mean()
                count += mask[b, k]
    return total / count


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_matches_reference(norm_pix):
    model = tiny_mae(norm_pix_loss=norm_pix)
    imgs = torch.rand(2, 3, 32, 32) * 0.01  # small variance: the +1e-6 matters
    pred = torch.randn(2, 16, 192)
    mask = (torch.rand(2, 16) > 0.5).float()
    mask[0, 0] = 1
    got = model.forward_loss(imgs, pred, mask)
    torch.testing.assert_close(got.double(), reference_mim_loss(imgs, pred, mask, 8, norm_pix), rtol=1e-5, atol=0)


def test_loss_ignores_kept_patches():
    model = tiny_mae(norm_pix_loss=True)
    imgs, pred = torch.randn(1, 3, 32, 32), torch.randn(1, 16, 192)
    mask = torch.ones(1, 16)
    mask[0, 5] = 0  # patch (row 1, col 1) is kept
    before = model.forward_loss(imgs, pred, mask)
    changed = imgs.clone()
    changed[0, :, 8:16, 8:16] += torch.randn(3, 8, 8)
    assert torch.equal(model.forward_loss(changed, pred, mask), before)
    changed[0, :, 0:8, 0:8] += torch.randn(3, 8, 8)  # a removed patch does count
    assert not torch.equal(model.forward_loss(changed, pred, mask), before)


# ---------------------------------------------------------------- teacher and student paths

def test_teacher_sees_all_patches_of_both_views_without_gradients():
    teacher = tiny_lut().eval()
    seen = []
    teacher.blocks[0].register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    x1, x2 = torch.randn(3, 3, 32, 32, requires_grad=True), torch.randn(3, 3, 32, 32)
    k1, k2 = teacher.forward_teacher(x1, x2)
    assert seen == [(6, 17, 32)]  # both views, all 16 patches + CLS
    assert k1.shape == k2.shape == (3, 32) and not k1.requires_grad and not k2.requires_grad


def test_teacher_uses_running_statistics():
    teacher = tiny_lut().eval()
    teacher.head[1].running_mean.fill_(3.0)
    teacher.head[1].running_var.fill_(4.0)
    x1, x2 = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    k1, _ = teacher.forward_teacher(x1, x2)
    pooled = teacher.forward_encoder(x1)[:, 1:].mean(1)
    h = teacher.head[0](pooled)
    h = (h - 3.0) / math.sqrt(4.0 + teacher.head[1].eps) * teacher.head[1].weight + teacher.head[1].bias
    torch.testing.assert_close(k1, teacher.head[3](F.relu(h)))
    # each sample's target is independent of the rest of the batch
    k1_alone, _ = teacher.forward_teacher(x1[:1], x2[:1])
    torch.testing.assert_close(k1_alone, k1[:1])


def test_teacher_refuses_train_mode():
    with pytest.raises(RuntimeError, match="eval mode"):
        tiny_lut().train().forward_teacher(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))


def test_student_heads_normalise_each_view_separately():
    model = tiny_lut().train()
    latents = []
    model.norm.register_forward_hook(lambda m, i, o: latents.append(o.detach()))
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32) * 3 + 1
    out = model(x1, x2, noise=torch.rand(4, 16))
    p1, p2 = latents[0][:, 1:].mean(1).chunk(2)
    heads = copy.deepcopy(torch.nn.Sequential(model.head, model.predictor))
    per_view = heads(p1), heads(p2)
    joint = heads(torch.cat([p1, p2])).chunk(2)
    torch.testing.assert_close(out["q1"].detach(), per_view[0])
    torch.testing.assert_close(out["q2"].detach(), per_view[1])
    assert not torch.allclose(out["q1"].detach(), joint[0], atol=1e-3)


def test_student_gradients_reach_encoder_decoder_and_heads():
    model = tiny_lut()
    teacher = copy.deepcopy(model).eval()
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    out = model(x1, x2)
    k1, k2 = teacher.forward_teacher(x1, x2)
    lut_loss(out["mim_loss"], bc_loss(out["q1"], out["q2"], k1, k2)).backward()
    for name in ("blocks.0.attn.qkv.weight", "decoder_pred.weight", "head.0.weight", "predictor.3.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.parameters())


# ---------------------------------------------------------------- losses

def test_bc_loss_pairs_views_crosswise_only():
    e = torch.eye(4)
    k1, k2 = e[[0, 0]], e[[1, 1]]
    # q equals the teacher output of its own view: orthogonal to the other view's target -> l = 2 for both pairs
    assert bc_loss(k1, k2, k1, k2).item() == pytest.approx(2.0)
    # q equals the other view's target: loss 0
    assert bc_loss(k2, k1, k1, k2).item() == pytest.approx(0.0)
    # only one pair matches: (0 + 2) / 2
    assert bc_loss(k2 * 5, k2, k1, k2).item() == pytest.approx(1.0)


def test_bc_loss_is_two_minus_two_cos_batch_mean():
    q1, q2, k1, k2 = (torch.randn(6, 8) for _ in range(4))
    want = ((2 - 2 * F.cosine_similarity(q1, k2)).mean() + (2 - 2 * F.cosine_similarity(q2, k1)).mean()) / 2
    torch.testing.assert_close(bc_loss(q1, q2, k1, k2), want)


def test_bc_loss_stops_teacher_gradient():
    k1, k2 = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    q1, q2 = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    bc_loss(q1, q2, k1, k2).backward()
    assert k1.grad is None and k2.grad is None and q1.grad is not None


def test_total_loss_weights():
    assert lut_loss(torch.tensor(2.0), torch.tensor(4.0)).item() == pytest.approx(2.0 + 0.25 * 4.0)
    assert lut_loss(torch.tensor(2.0), torch.tensor(4.0), w_mae=0.5, w_bc=1.0).item() == pytest.approx(5.0)


# ---------------------------------------------------------------- teacher update

def test_teacher_update_exact_values():
    student, teacher = tiny_lut(), tiny_lut()
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(1.0)
        for p in student.parameters():
            p.fill_(3.0)
        student.head[1].running_var.fill_(5.0)
        student.head[1].num_batches_tracked.fill_(7)
    update_teacher(teacher, student, 0.75)
    assert torch.all(teacher.blocks[0].attn.qkv.weight == 1.5)  # 0.75 * 1 + 0.25 * 3
    assert torch.all(teacher.head[1].running_var == 2.0)  # 0.75 * 1 + 0.25 * 5
    assert teacher.head[1].num_batches_tracked.item() == 7


def test_momentum_schedule_is_cosine_from_m0_to_one():
    assert momentum_at(0, 100, 0.996) == pytest.approx(0.996, abs=1e-15)
    assert momentum_at(50, 100, 0.996) == pytest.approx(0.998, abs=1e-15)
    assert momentum_at(100, 100, 0.996) == 1.0


# ---------------------------------------------------------------- names and sizes

def spec_keys(depth, decoder_depth, lut):
    keys = ["patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed", "norm.weight", "norm.bias",
            "decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed", "decoder_norm.weight",
            "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"]
    block = [f"{m}.{t}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
             for t in ("weight", "bias")]
    keys += [f"blocks.{i}.{k}" for i in range(depth) for k in block]
    keys += [f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in block]
    if lut:
        bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
        for mlp in ("head", "predictor"):
            keys += [f"{mlp}.0.weight", f"{mlp}.3.weight"] + [f"{mlp}.1.{k}" for k in bn]
    return set(keys)


@pytest.mark.parametrize("name,lut", [("lut_vit_base_patch16", True), ("mae_vit_base_patch16", False)])
def test_state_dict_keys_match_spec(name, lut):
    with torch.device("meta"):
        model = models_lut.MODELS[name]()
    assert set(model.state_dict()) == spec_keys(12, 8, lut)


@pytest.mark.parametrize("norm,keys", [
    ("BN", {"0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
            "3.weight"}),
    ("LN", {"0.weight", "1.weight", "1.bias", "3.weight"}),
    ("none", {"0.weight", "2.weight"}),
])
def test_head_indices_for_each_norm_layer(norm, keys):
    model = tiny_lut(head_norm_layer=norm)
    assert set(model.head.state_dict()) == keys == set(model.predictor.state_dict())
    assert model.head[0].bias is None


@pytest.mark.parametrize("size", ["small", "base", "large"])
def test_encoder_parameter_count_matches_timm(size):
    with torch.device("meta"):
        model = models_lut.MODELS[f"lut_vit_{size}_patch16"]()
        ref = timm.create_model(f"vit_{size}_patch16_224", num_classes=0)
    encoder = sum(p.numel() for n, p in model.named_parameters()
                  if not n.startswith(("decoder", "mask_token", "head", "predictor")))
    assert encoder == sum(p.numel() for p in ref.parameters())


def test_pos_embed_is_fixed_sincos_with_zero_cls_row():
    model = tiny_mae()
    pe = model.pos_embed[0]
    assert not model.pos_embed.requires_grad and torch.all(pe[0] == 0)
    # patch at row 1, column 2 of the 4x4 grid; first D/4 channels: sin(x * omega_i), next D/4: cos(x * omega_i)
    D, x, y = 32, 2.0, 1.0
    omega = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D / 4))
    want = torch.cat([torch.sin(x * omega), torch.cos(x * omega), torch.sin(y * omega), torch.cos(y * omega)])
    torch.testing.assert_close(pe[1 + 1 * 4 + 2].double(), want, rtol=0, atol=1e-6)
    assert get_2d_sincos_pos_embed(32, 4).shape == (16, 32)


# ---------------------------------------------------------------- precision

def test_bfloat16_autocast_gives_the_float32_losses_within_bfloat16_precision():
    model = tiny_lut()
    teacher = copy.deepcopy(model).eval()
    x1, x2, noise = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.rand(4, 16)

    def losses(dtype):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            k1, k2 = teacher.forward_teacher(x1, x2)
            out = copy.deepcopy(model)(x1, x2, noise=noise)
            loss = lut_loss(out["mim_loss"], bc_loss(out["q1"], out["q2"], k1, k2))
            mae_loss, _, _ = tiny_mae()(x1, noise=noise)
        return loss, mae_loss

    (loss, mae_loss), (ref, mae_ref) = losses(torch.bfloat16), losses(None)
    assert loss.dtype == mae_loss.dtype == torch.float32  # the losses are computed in float32
    torch.testing.assert_close(loss, ref, rtol=3e-2, atol=0)
    torch.testing.assert_close(mae_loss, mae_ref, rtol=3e-2, atol=0)
