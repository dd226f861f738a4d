"""Export a pre-trained encoder (student or teacher) as a timm VisionTransformer state dict in safetensors format.

    python tools/export_timm.py --checkpoint lut.pth --checkpoint_key model --output lut_vit_base.safetensors

timm's keys for a ViT with CLS token and final norm (global_pool='token'), no classifier. Checks that timm loads it
strictly and reproduces our forward_encoder, then prints the timm.create_model call (also in the file's metadata).
For global_pool='avg', load it with timm.models.load_checkpoint(model, path, strict=False); see docs/tools.md.
"""
import json
import os

import timm
import torch
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from analysis import load_model, tool_parser  # first: it puts the repository root on sys.path
import models_lut
from util.augment import eval_crop_pct
from models_vit import ENCODER_PREFIXES


def get_args_parser():
    parser = tool_parser(__doc__, many_checkpoints=False)
    parser.add_argument("--output", required=True, metavar="PATH.safetensors", help="file to write")
    return parser


def timm_architecture(model):
    """(timm model name, keyword overrides) that build timm's VisionTransformer with our encoder's shape: the
    vit_<size>_patch16_224 of the same width, plus whatever differs from it."""
    embed_dim = model.pos_embed.shape[-1]
    ours = dict(embed_dim=embed_dim, depth=len(model.blocks), num_heads=model.blocks[0].attn.num_heads,
                patch_size=model.patch_embed.patch_size[0], img_size=model.patch_embed.img_size[0],
                in_chans=model.in_chans, mlp_ratio=model.blocks[0].mlp.fc1.out_features / embed_dim)
    size = next((s for s, e in models_lut.ENCODERS.items() if e["embed_dim"] == embed_dim), "base")
    reference = dict(models_lut.ENCODERS[size], patch_size=16, img_size=224, in_chans=3, mlp_ratio=4.0)
    return f"vit_{size}_patch16_224", {k: v for k, v in ours.items() if v != reference[k]}


@torch.no_grad()
def main(args):
    if not args.output.endswith(".safetensors"):
        raise ValueError(f"--output must end in .safetensors (timm picks the loader by extension), got {args.output}")
    model, info = load_model(args.checkpoint, args.checkpoint_key, args.model)
    timm_name, timm_kwargs = timm_architecture(model)
    metadata = dict(source=os.path.basename(args.checkpoint), checkpoint_key=args.checkpoint_key, model=info["name"],
                    timm_model=timm_name, timm_kwargs=json.dumps(timm_kwargs))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    # timm's VisionTransformer (global_pool='token', no head) has our encoder's key names
    state = {k: v.cpu().contiguous() for k, v in model.state_dict().items() if k.startswith(ENCODER_PREFIXES)}
    save_file(state, args.output, metadata=metadata)
    print(f"wrote {args.checkpoint_key} encoder of {info['name']} from {args.checkpoint} to {args.output}")
    # Our evaluation view (util.augment.eval_transform): bicubic resize, centre crop, ImageNet mean and std.
    img_size = model.patch_embed.img_size[0]
    overlay = dict(file=args.output, num_classes=0, crop_pct=eval_crop_pct(img_size), mean=IMAGENET_DEFAULT_MEAN,
                   std=IMAGENET_DEFAULT_STD, interpolation="bicubic")
    if img_size != 224:
        overlay["input_size"] = (3, img_size, img_size)
    timm_model = timm.create_model(timm_name, pretrained=True, num_classes=0, **timm_kwargs,
                                   pretrained_cfg_overlay=overlay)
    imgs = torch.randn(2, model.in_chans, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(0))
    diff = (timm_model.eval().forward_features(imgs) - model.forward_encoder(imgs)).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"timm's {timm_name} loaded {args.output} but its features differ from ours by {diff:.2e}")
    print(f"checked: timm's {timm_name} loads it strictly and matches our features (max difference {diff:.1e})")
    kwargs = "".join(f", {k}={v!r}" for k, v in timm_kwargs.items())
    overlay_text = ", ".join(f"{k}={v!r}" for k, v in overlay.items())
    print(f"use it with:\n  timm.create_model({timm_name!r}, pretrained=True{kwargs},\n"
          f"                    pretrained_cfg_overlay=dict({overlay_text}))")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
