"""Analysis and export tools: attention distance, spectrum, reconstructions, attention maps, timm export."""
import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors import safe_open

import models_lut
from runs import ROOT as REPO

sys.path.insert(0, os.path.join(REPO, "tools"))
from analysis import (FeatureSpectrum, attention_weights, denormalize, effective_rank, load_model,  # noqa: E402
                      mean_attention_distance, predicted_pixels, reconstruction_rows)
TOOLS = ("attention_distance", "spectrum", "reconstruct", "attention_maps", "export_timm")
# A tiny LUT as the pre-training script builds it: 32 px images, 4 px patches, 2 blocks.
TINY = dict(img_size=32, patch_size=4, depth=2)


def run_tool(name, *argv):
    """Run tools/<name>.py's main on argv in this process (as `python tools/<name>.py argv` would)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(tool.get_args_parser().parse_args([str(a) for a in argv]))


def perturbed(model, seed):
    """The model with every floating tensor shifted by noise: a stand-in for a trained teacher that differs."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def demo_dir(demo):
    return demo / "val"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Our LUT checkpoint (student, distinct teacher, args dict), an MAE checkpoint as MAE releases them and one as
    our pre-training script writes them (no teacher)."""
    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    lut = models_lut.lut_vit_tiny_patch16(**TINY, head_mlp_dim=64, norm_pix_loss=True)
    torch.save({"model": lut.state_dict(), "model_ema": perturbed(lut, 1), "epoch": 0,
                "args": {"model": "lut_vit_tiny_patch16", "input_size": 32, "patch_size": 4, "norm_pix_loss": True}},
               out / "lut.pth")
    mae = models_lut.mae_vit_tiny_patch16(**TINY)
    torch.save({"model": mae.state_dict()}, out / "mae.pth")
    torch.save({"model": mae.state_dict(), "model_ema": None, "args": {"model": "mae_vit_tiny_patch16"}},
               out / "mae_ours.pth")
    return dict(lut=out / "lut.pth", mae=out / "mae.pth", mae_ours=out / "mae_ours.pth")


def attention_with_cls(patch_attention, to_cls=0.0):
    """[1, 1, 1 + L, 1 + L] attention whose patch queries give `to_cls` to CLS and scale `patch_attention` [L, L]."""
    L = patch_attention.shape[0]
    attn = torch.zeros(1, 1, L + 1, L + 1, dtype=torch.float64)
    attn[0, 0, 0, :] = 1.0 / (L + 1)
    attn[0, 0, 1:, 0] = to_cls
    attn[0, 0, 1:, 1:] = (1 - to_cls) * patch_attention
    return attn


# ---------------------------------------------------------------- attention distance

def test_uniform_attention_distance_is_the_mean_distance_between_patch_centres():
    # 2 x 3 grid of 4 px patches; the 36 ordered pairs are 6 at offset 0, 8 at 1, 4 at 2 (same row) and 6 at 1,
    # 8 at sqrt(2), 4 at sqrt(5) (other row) patches, so the mean distance is 4 * (22 + 8 sqrt 2 + 4 sqrt 5) / 36.
    uniform = torch.full((6, 6), 1 / 6, dtype=torch.float64)
    distance = mean_attention_distance(attention_with_cls(uniform), (2, 3), patch_size=4)
    assert distance.shape == (1, 1)
    assert distance.item() == pytest.approx((22 + 8 * math.sqrt(2) + 4 * math.sqrt(5)) / 9, rel=1e-12)


def test_attention_only_to_self_has_distance_zero():
    self_only = torch.eye(16, dtype=torch.float64)
    assert mean_attention_distance(attention_with_cls(self_only), (4, 4), patch_size=16).item() == 0.0


def test_attention_to_cls_is_renormalised_away_unless_asked_to_keep_it():
    uniform = torch.full((6, 6), 1 / 6, dtype=torch.float64)
    full = mean_attention_distance(attention_with_cls(uniform), (2, 3), 4)
    half_to_cls = attention_with_cls(uniform, to_cls=0.5)
    torch.testing.assert_close(mean_attention_distance(half_to_cls, (2, 3), 4), full)
    torch.testing.assert_close(mean_attention_distance(half_to_cls, (2, 3), 4, renormalize=False), full / 2)


def test_recomputed_attention_weights_reproduce_the_fused_attention_output():
    torch.manual_seed(0)
    block = models_lut.mae_vit_tiny_patch16(**TINY).blocks[1]
    x = torch.randn(2, 5, 192)
    weights = attention_weights(block, x)
    assert weights.shape == (2, 3, 5, 5)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, 3, 5))
    v = block.attn.qkv(block.norm1(x)).reshape(2, 5, 3, 3, 64)[:, :, 2].transpose(1, 2)  # [B, heads, N, head_dim]
    mixed = block.attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 192))
    with torch.no_grad():
        torch.testing.assert_close(mixed, block.attn(block.norm1(x)), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- spectrum

def test_effective_rank_of_k_equal_singular_values_is_k():
    assert effective_rank(torch.tensor([2.5, 2.5, 2.5, 0.0, 0.0])) == pytest.approx(3.0, rel=1e-6)
    q1, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    rank5 = q1[:, :8] @ torch.diag(torch.tensor([3.0] * 5 + [0.0] * 3, dtype=torch.float64)) @ q2.T
    spectrum = FeatureSpectrum(8)
    spectrum.update(rank5)
    assert effective_rank(spectrum.singular_values(center=False)) == pytest.approx(5.0, rel=1e-6)


def test_spectrum_is_sorted_and_matches_svdvals_of_the_stacked_features():
    torch.manual_seed(0)
    features = torch.randn(300, 12) * torch.logspace(0, -2, 12) + 3.0
    spectrum = FeatureSpectrum(12)
    for batch in features.split(64):
        spectrum.update(batch)
    raw, centred = spectrum.singular_values(center=False), spectrum.singular_values()
    x = features.double()
    torch.testing.assert_close(raw, torch.linalg.svdvals(x), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(centred, torch.linalg.svdvals(x - x.mean(dim=0)), rtol=1e-6, atol=1e-8)
    assert torch.all(centred[:-1] >= centred[1:])


# ---------------------------------------------------------------- reconstruction

def test_prediction_equal_to_the_normalised_target_renders_the_original_pixels():
    torch.manual_seed(0)
    model = models_lut.MaskedAutoencoderViT(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    imgs = torch.randn(2, 3, 16, 16)
    target = model.patchify(imgs)
    normalised = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
    torch.testing.assert_close(model.unpatchify(predicted_pixels(model, imgs, normalised, True)), imgs,
                               atol=1e-5, rtol=1e-5)
    mask = (torch.rand(2, 16) < 0.75).float()
    rows = reconstruction_rows(model, imgs, normalised, mask, norm_pix_loss=True)
    assert rows.shape == (8, 3, 16, 16)
    original, reconstruction, pasted = rows[0::4], rows[2::4], rows[3::4]
    torch.testing.assert_close(original, denormalize(imgs))
    torch.testing.assert_close(reconstruction, original, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pasted, original, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- checkpoints and export

def test_load_model_reads_the_authors_and_maes_checkpoint_formats(tmp_path, demo_dir, checkpoints):
    ours = torch.load(checkpoints["lut"], weights_only=True)
    authors = {"model": ours["model"], "model_ema": {"ema." + k: v for k, v in ours["model_ema"].items()},
               "args": argparse.Namespace(model="lut_vit_tiny_patch16", norm_pix_loss=True, input_size=32)}
    torch.save(authors, tmp_path / "authors.pth")
    teacher, info = load_model(tmp_path / "authors.pth", "model_ema")
    assert info == dict(name="lut_vit_tiny_patch16", norm_pix_loss=True, has_decoder=True)
    torch.testing.assert_close(teacher.blocks[1].attn.qkv.weight, ours["model_ema"]["blocks.1.attn.qkv.weight"])

    encoder_only = {k: v for k, v in torch.load(checkpoints["mae"], weights_only=True)["model"].items()
                    if not k.startswith(("decoder_", "mask_token"))}
    torch.save({"model": encoder_only}, tmp_path / "mae_pretrain.pth")
    mae, info = load_model(tmp_path / "mae_pretrain.pth")
    assert info["has_decoder"] is False and info["norm_pix_loss"] is None
    assert mae.blocks[0].attn.num_heads == 3  # 192-d encoder, 64-d heads
    with pytest.raises(ValueError, match="no 'model_ema' weights"):
        load_model(checkpoints["mae_ours"], "model_ema")
    with pytest.raises(ValueError, match="no decoder"):
        run_tool("reconstruct", "--checkpoint", tmp_path / "mae_pretrain.pth", "--data_path", demo_dir,
                 "--norm_pix_loss", "--output_dir", tmp_path)


@pytest.mark.parametrize("key", ["model", "model_ema"])
def test_encoder_exported_to_timm_gives_our_features(tmp_path, checkpoints, key):
    out = tmp_path / "encoder.safetensors"
    run_tool("export_timm", "--checkpoint", checkpoints["lut"], "--checkpoint_key", key, "--output", out)
    ours, _ = load_model(checkpoints["lut"], key)
    imgs = torch.randn(2, 3, 32, 32)
    via_cfg = timm.create_model("vit_tiny_patch16_224", pretrained=True, **TINY,
                                pretrained_cfg_overlay=dict(file=str(out), num_classes=0))
    via_path = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY, checkpoint_path=str(out))
    with torch.no_grad():
        expected = ours.forward_encoder(imgs)
        torch.testing.assert_close(via_cfg.eval().forward_features(imgs), expected)
        torch.testing.assert_close(via_path.eval().forward_features(imgs), expected)
    with safe_open(str(out), "pt") as f:  # the file names its source, not the machine's folders
        assert f.metadata()["source"] == "lut.pth"


# ---------------------------------------------------------------- tools end to end on the demo data

def test_attention_distance_tool_writes_json_plot_and_tensorboard(tmp_path, demo_dir, checkpoints):
    run_tool("attention_distance", "--checkpoints", checkpoints["mae"], checkpoints["lut"], "--labels", "MAE", "LUT",
             "--data_path", demo_dir, "--num_images", 8, "--output_dir", tmp_path, "--log_dir", tmp_path / "tb")
    results = json.loads((tmp_path / "attention_distance.json").read_text())
    assert list(results) == ["MAE", "LUT"]
    per_head = torch.tensor(results["LUT"]["per_head"])
    assert per_head.shape == (2, 3) and results["LUT"]["num_images"] == 8
    # Distances lie between 0 and the grid's diagonal (8 x 8 patches of 4 px).
    assert torch.all(per_head > 0) and torch.all(per_head < 4 * 7 * math.sqrt(2))
    assert (tmp_path / "attention_distance.png").stat().st_size > 0
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))


def test_spectrum_tool_writes_json_and_plot_for_student_and_teacher(tmp_path, demo_dir, checkpoints):
    run_tool("spectrum", "--checkpoints", checkpoints["lut"], checkpoints["lut"], "--checkpoint_key", "model",
             "model_ema", "--data_path", demo_dir, "--num_images", 16, "--output_dir", tmp_path)
    results = json.loads((tmp_path / "spectrum.json").read_text())
    label = f"{checkpoints['lut'].parent.name}/lut"  # default label: folder/file
    assert list(results) == [label, label + " (teacher)"]
    student = results[label]
    assert len(student["pooled"]["singular_values"]) == 16 and len(student["tokens"]["singular_values"]) == 192
    assert 1 <= student["tokens"]["effective_rank"] <= 192
    assert (tmp_path / "spectrum.png").stat().st_size > 0


def test_reconstruct_tool_writes_an_image_grid(tmp_path, demo_dir, checkpoints):
    run_tool("reconstruct", "--checkpoint", checkpoints["lut"], "--data_path", demo_dir, "--num_images", 3,
             "--mask_ratio", 0.5, "--output_dir", tmp_path)
    from PIL import Image
    with Image.open(tmp_path / "reconstructions_mask50.png") as grid:
        # 3 rows of 4 images, 32 px enlarged 4x to 128 px, 2 px padding.
        assert grid.size == (4 * 130 + 2, 3 * 130 + 2)


def test_attention_maps_tool_writes_one_png_per_image(tmp_path, demo_dir, checkpoints):
    run_tool("attention_maps", "--checkpoints", checkpoints["mae"], checkpoints["lut"], "--data_path", demo_dir,
             "--num_images", 2, "--queries", "0.5,0.5", "0,1", "--layer", 0, "--output_dir", tmp_path)
    pngs = sorted(p for p in os.listdir(tmp_path) if p.startswith("attention_maps_"))
    assert len(pngs) == 2
    from PIL import Image
    with Image.open(tmp_path / pngs[0]) as grid:
        # 2 checkpoints x 2 queries rows; image, head mean and 3 heads per row.
        assert grid.size == (5 * 130 + 2, 4 * 130 + 2)


def test_tools_run_as_scripts_from_any_folder(tmp_path):
    # As `python tools/<name>.py` from another folder: the script's folder first on sys.path, the repository not.
    script = ("import runpy, sys\n"
              f"sys.path[0] = {REPO!r} + '/tools'\n"
              f"for name in {TOOLS!r}:\n"
              f"    sys.argv = [name, '--help']\n"
              "    try:\n"
              f"        runpy.run_path({REPO!r} + f'/tools/{{name}}.py', run_name='__main__')\n"
              "    except SystemExit as e:\n"
              "        assert e.code == 0, name\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("usage:") == len(TOOLS)
