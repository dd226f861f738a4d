"""Classifier ViTs for fine-tuning, linear probing and k-NN: timm's `VisionTransformer` with the encoder keys of
models_lut.py, so loading pre-trained weights (ours, the LUT authors', MAE's) is a key filter. Pooling (docs/method.md,
6): global_pool='avg' (the patch tokens' mean, a new `fc_norm`, the final `norm` unused), 'avg' with fc_norm=False
(the mean of the final-norm patch tokens: --lut_global), or 'token' (the CLS token after the final norm)."""
from functools import partial

import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from models_lut import ENCODERS
from util.checkpoint import load_checkpoint, normalize_pretrained

# The encoder's keys (docs/method.md, "State-dict keys"); the decoder, mask token and LUT heads are left out.
ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
# What a classifier may lack: its new head and, with global pooling, MAE's fc_norm trained from scratch.
NEW_PREFIXES = ("head.", "fc_norm.")


def _factory(size):
    def build(**kwargs):
        return VisionTransformer(**{
            "patch_size": 16, **ENCODERS[size], "mlp_ratio": 4.0, "qkv_bias": True,
            "norm_layer": partial(nn.LayerNorm, eps=1e-6), "global_pool": "avg", **kwargs})
    build.__doc__ = (f"timm VisionTransformer with the ViT-{size} encoder of models_lut; keyword arguments "
                     f"(img_size, patch_size, num_classes, global_pool, fc_norm, drop_path_rate, ...) override.")
    return build


vit_tiny_patch16 = _factory("tiny")
vit_small_patch16 = _factory("small")
vit_base_patch16 = _factory("base")
vit_large_patch16 = _factory("large")

MODELS = {f"vit_{size}_patch16": globals()[f"vit_{size}_patch16"] for size in ENCODERS}


def resample_pos_embed(state, model):
    """state['pos_embed'] ([1, 1 + h*w, D], CLS row kept) resampled to the model's patch grid as MAE does:
    bicubic without antialiasing (timm's default antialiases when shrinking)."""
    old, new = state.get("pos_embed"), model.pos_embed
    if old is None or old.shape == new.shape or old.ndim != 3 or old.shape[-1] != new.shape[-1]:
        return state  # nothing to do, or a mismatch the key check reports
    grid = model.patch_embed.grid_size
    print(f"Resampling pos_embed from {old.shape[1] - 1} to {grid[0]}x{grid[1]} patches")
    return {**state, "pos_embed": resample_abs_pos_embed(old, new_size=list(grid), num_prefix_tokens=1,
                                                         interpolation="bicubic", antialias=False)}


def load_encoder(model, state, source="checkpoint"):
    """Copy an encoder state dict into `model` (a timm VisionTransformer); returns the keys left at initialisation.

    Only the new head and fc_norm may be missing, and only the final `norm` may go unused (when the model pools with
    fc_norm). Anything else raises a ValueError listing the offending keys before any weight is copied."""
    state = resample_pos_embed(state, model)
    own = model.state_dict()
    problems = {
        "shape mismatches": [f"{k}: checkpoint {list(v.shape)} vs model {list(own[k].shape)}"
                             for k, v in state.items() if k in own and v.shape != own[k].shape],
        "missing from the checkpoint": [k for k in own if k not in state and not k.startswith(NEW_PREFIXES)],
        "in the checkpoint but not in the model": [
            k for k in state if k not in own and not (k.startswith("norm.") and "fc_norm.weight" in own)],
    }
    if any(problems.values()):
        lines = [f"{source} does not match the model (another architecture, patch size or --model?)"]
        for title, names in problems.items():
            if names:  # at most 40 keys each: a wrong model size mismatches hundreds
                lines += [f"{title} ({len(names)}):"] + [f"  {n}" for n in names[:40]]
                lines += [f"  ... and {len(names) - 40} more"] if len(names) > 40 else []
        raise ValueError("\n".join(lines))
    return sorted(model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False).missing_keys)


def load_pretrained(model, path, checkpoint_key="model"):
    """Load the encoder of the pre-training checkpoint at `path` into `model`; returns the keys left to train anew."""
    state = normalize_pretrained(load_checkpoint(path), checkpoint_key)
    state = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}
    missing = load_encoder(model, state, source=f"{path} [{checkpoint_key}]")
    print(f"Loaded the pre-trained encoder from {path} [{checkpoint_key}]; newly initialised: {missing}")
    return missing


def load_classifier(model, path):
    """Load a fine-tuned classifier (main_finetune.py's or main_linprobe.py's checkpoint) into `model` strictly, or
    stop with a one-line message naming the first mismatch."""
    try:
        model.load_state_dict(load_checkpoint(path)["model"])
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise SystemExit(f"{path} does not fit this model ({detail}); was it trained with other --model, --nb_classes "
                         f"or pooling flags?") from None
