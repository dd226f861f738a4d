"""Load a pre-trained encoder into a models_vit classifier: key filter, position-embedding resampling, strict checks.

Accepted files (all read with util.checkpoint.load_checkpoint, i.e. torch.load(weights_only=True)): ours
(`model` = student, `model_ema` = teacher), the LUT authors' (teacher keys prefixed `ema.`, args an
argparse.Namespace) and MAE's released checkpoints (`{'model': ...}`).
"""
import os

from timm.layers import resample_abs_pos_embed

import models_vit
from util.checkpoint import load_checkpoint, normalize_pretrained, saved_args

# The encoder's keys (docs/method.md, "State-dict keys"); the rest of a pre-training checkpoint (decoder_*,
# mask_token, the LUT projector `head.*` and `predictor.*`) is not part of the classifier.
ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
# What a classifier may lack from a pre-trained encoder: its new classification head and, with global average
# pooling, the LayerNorm after pooling that MAE's recipe trains from scratch.
NEW_PREFIXES = ("head.", "fc_norm.")


def add_encoder_args(parser, pretrained=True):
    """The flags of the scripts that evaluate an encoder: architecture, input and (`pretrained`) the pre-trained
    weights."""
    group = parser.add_argument_group("encoder")
    group.add_argument("--model", default="vit_base_patch16", choices=sorted(models_vit.MODELS))
    group.add_argument("--input_size", default=None, type=int,
                       help="image size (default: the checkpoint's training input size, else 224)")
    group.add_argument("--patch_size", default=None, type=int, help="(default: the checkpoint's patch size, else 16)")
    if not pretrained:
        return
    group.add_argument("--finetune", default="", metavar="PATH",
                       help="pre-training checkpoint (ours, the LUT authors' or MAE's); none = random weights")
    group.add_argument("--checkpoint_key", default="model",
                       help="the checkpoint's entry to load: 'model' (the student; what the LUT authors fine-tune), "
                            "'model_ema' (the LUT teacher), or e.g. 'state_dict' (MoCo v3), 'teacher' (DINO)")


def check_encoder_args(args):
    """Check the encoder flags and fill --input_size / --patch_size from the checkpoint to load when not given (the
    pre-trained one, or the fine-tuned one an --eval reads): a one-line message instead of a size mismatch later."""
    finetune = getattr(args, "finetune", "")
    if finetune and not os.path.isfile(finetune):
        raise SystemExit(f"--finetune checkpoint not found: {finetune}")
    path, key = (args.resume, "model") if getattr(args, "eval", False) else (finetune, args.checkpoint_key)
    saved, patch = {}, None
    if path:
        ckpt = load_checkpoint(path, mmap=True)
        saved = saved_args(ckpt)
        if not isinstance(ckpt.get(key), dict):
            present = sorted(k for k, v in ckpt.items() if isinstance(v, dict))
            raise SystemExit(f"{path} has no weights under {key!r}" + ("" if getattr(args, "eval", False) else
                             " (--checkpoint_key)") + f"; it has {present}")
        weight = normalize_pretrained(ckpt, key).get("patch_embed.proj.weight")
        patch = weight.shape[-1] if weight is not None else None
        if args.patch_size not in (None, patch) and patch is not None:
            raise SystemExit(f"--patch_size {args.patch_size}, but {path} has {patch}-pixel patches "
                             f"(patch_embed.proj.weight {list(weight.shape)}): leave --patch_size out")
    args.patch_size = args.patch_size or patch or 16
    args.input_size = args.input_size or saved.get("input_size", 224)
    if args.input_size % args.patch_size:
        raise SystemExit(f"--input_size {args.input_size} is not a multiple of --patch_size {args.patch_size}")


def encoder_state_dict(ckpt, checkpoint_key="model"):
    """The encoder weights of a loaded checkpoint dict, wrapper prefixes removed (util.checkpoint.normalize_pretrained).

    checkpoint_key: 'model' (student; what the LUT authors fine-tune), 'model_ema' (teacher), or the entry other
    methods keep their weights under ('state_dict', 'teacher', ...).
    """
    if ckpt.get(checkpoint_key) is None:
        present = sorted(k for k, v in ckpt.items() if isinstance(v, dict))
        raise KeyError(f"the checkpoint has no weights under --checkpoint_key {checkpoint_key!r} (it has {present})")
    state = normalize_pretrained(ckpt, checkpoint_key)
    return {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}


def resample_pos_embed(state, model):
    """Bicubically resample state['pos_embed'] ([1, 1 + h*w, D], CLS row first and kept) to the model's patch grid,
    as MAE does: F.interpolate(mode='bicubic', align_corners=False) of the [D, h, w] grid."""
    old, new = state.get("pos_embed"), model.pos_embed
    if old is None or old.shape == new.shape or old.ndim != 3 or old.shape[-1] != new.shape[-1]:
        return state  # nothing to do, or a mismatch the key check reports
    grid = model.patch_embed.grid_size
    print(f"Resampling pos_embed from {old.shape[1] - 1} to {grid[0]}x{grid[1]} patches")
    # Bicubic without antialiasing, as MAE's interpolate_pos_embed (timm's default antialiases when shrinking).
    return {**state, "pos_embed": resample_abs_pos_embed(old, new_size=list(grid), num_prefix_tokens=1,
                                                         interpolation="bicubic", antialias=False)}


def _listing(title, names):
    """One line per key, at most 40 (a wrong model size mismatches hundreds)."""
    shown = "\n".join(f"  {n}" for n in names[:40])
    more = f"\n  ... and {len(names) - 40} more" if len(names) > 40 else ""
    return f"{title} ({len(names)}):\n{shown}{more}"


def load_encoder(model, state, source="checkpoint"):
    """Copy an encoder state dict into `model` (a timm VisionTransformer); returns the keys left at initialisation.

    Only the new head and fc_norm may be missing, and only the final `norm` may go unused (when the model pools with
    fc_norm instead). Anything else — missing encoder keys, unused encoder keys, shape mismatches — raises a
    ValueError listing every offending key, before any weight is copied: a partial load is never silent.
    """
    state = resample_pos_embed(state, model)
    own = model.state_dict()
    mismatched = [f"{k}: checkpoint {list(v.shape)} vs model {list(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state and not k.startswith(NEW_PREFIXES)]
    unused = [k for k in state if k not in own and not (k.startswith("norm.") and "fc_norm.weight" in own)]
    if mismatched or missing or unused:
        parts = [_listing(title, names) for title, names in (
            ("shape mismatches", mismatched), ("missing from the checkpoint", missing),
            ("in the checkpoint but not in the model", unused)) if names]
        raise ValueError(f"{source} does not match the model (another architecture, patch size or --model?)\n"
                         + "\n".join(parts))
    result = model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return sorted(result.missing_keys)


def load_pretrained(model, path, checkpoint_key="model"):
    """Load the encoder of the pre-training checkpoint at `path` into `model`; returns the keys left to train anew."""
    state = encoder_state_dict(load_checkpoint(path), checkpoint_key)
    missing = load_encoder(model, state, source=f"{path} [{checkpoint_key}]")
    print(f"Loaded the pre-trained encoder from {path} [{checkpoint_key}]; newly initialised: {missing}")
    return missing


def load_classifier(model, path):
    """Load the weights of a fine-tuned classifier (a checkpoint of main_finetune.py or main_linprobe.py) into
    `model` strictly, or stop with a one-line message naming the first mismatch."""
    try:
        model.load_state_dict(load_checkpoint(path)["model"])
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise SystemExit(f"{path} does not fit this model ({detail}); was it trained with other --model, --nb_classes "
                         f"or pooling flags?") from None
