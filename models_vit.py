"""Classifier ViTs for fine-tuning, linear probing and k-NN evaluation (docs/method.md): timm's `VisionTransformer`.

The encoder keys (`patch_embed.proj.*`, `cls_token`, `pos_embed`, `blocks.{i}.*`, `norm.*`) are those of the
pre-training encoders in models_lut.py, so loading pre-trained weights is a key filter (util/pretrained.py).

    global_pool='avg' (default): mean of the patch tokens, then a new LayerNorm `fc_norm`; the final `norm` is
        dropped, so the checkpoint's `norm.*` goes unused (MAE's fine-tuning, and its --global_pool linear probe).
    global_pool='avg', fc_norm=False: mean of the final-norm patch tokens (the LUT global vector: --lut_global).
    global_pool='token': the CLS token after the final norm (MAE's --cls_token fine-tuning and default probe).
"""
from functools import partial

import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from models_lut import ENCODERS


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
