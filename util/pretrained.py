"""Load a pre-trained encoder into a models_vit classifier: key filter, position-embedding resampling, strict checks.

Reads ours (`model` = student, `model_ema` = teacher), the LUT authors' (teacher keys prefixed `ema.`) and MAE's
released checkpoints (`{'model': ...}`), all with util.checkpoint.load_checkpoint (weights_only).
"""
import os

from timm.layers import resample_abs_pos_embed

import models_vit
from util.checkpoint import load_checkpoint, normalize_pretrained, saved_args

# The encoder's keys (docs/method.md, "State-dict keys"); the decoder, mask token and LUT heads are left out.
ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
# What a classifier may lack: its new head and, with global pooling, MAE's fc_norm trained from scratch.
NEW_PREFIXES = ("head.", "fc_norm.")


def add_encoder_args(parser, pretrained=True):
    """Architecture and input flags; `pretrained` adds the pre-trained weights to load."""
    group = parser.add_argument_group("encoder")
    group.add_argument("--model", default="vit_base_patch16", choices=sorted(models_vit.MODELS))
    group.add_argument("--input_size", default=None, type=int,
                       help="image size (default: the checkpoint's training input size, else 224)")
    group.add_argument("--patch_size", default=None, type=int, help="(default: the checkpoint's patch size, else 16)")
    if pretrained:
        group.add_argument("--finetune", default="", metavar="PATH",
                           help="pre-training checkpoint (ours, the LUT authors' or MAE's); none = random weights")
        group.add_argument("--checkpoint_key", default="model",
                           help="the checkpoint's entry to load: 'model' (the student; what the LUT authors "
                                "fine-tune), 'model_ema' (the LUT teacher), or e.g. 'state_dict' (MoCo v3), "
                                "'teacher' (DINO)")


def check_encoder_args(args):
    """Fill --input_size / --patch_size from the checkpoint to load (the pre-trained one, or the classifier an --eval
    reads) when not given; one-line messages for a missing file or entry and for sizes that do not fit."""
    finetune, evaluating = getattr(args, "finetune", ""), getattr(args, "eval", False)
    if finetune and not os.path.isfile(finetune):
        raise SystemExit(f"--finetune checkpoint not found: {finetune}")
    if evaluating and not args.resume:
        raise SystemExit("--eval evaluates the checkpoint given with --resume PATH")
    path, key = (args.resume, "model") if evaluating else (finetune, args.checkpoint_key)
    saved, patch = {}, None
    if path:
        ckpt = load_checkpoint(path, mmap=True)
        saved = saved_args(ckpt)
        try:
            weight = normalize_pretrained(ckpt, key).get("patch_embed.proj.weight")
        except KeyError as e:
            hint = "" if evaluating else "; choose one with --checkpoint_key"
            raise SystemExit(f"{path}: {e.args[0]}{hint}") from None
        patch = weight.shape[-1] if weight is not None else None
        if args.patch_size not in (None, patch) and patch is not None:
            raise SystemExit(f"--patch_size {args.patch_size}, but {path} has {patch}-pixel patches "
                             f"(patch_embed.proj.weight {list(weight.shape)}): leave --patch_size out")
    args.patch_size = args.patch_size or patch or 16
    args.input_size = args.input_size or saved.get("input_size", 224)
    if args.input_size % args.patch_size:
        raise SystemExit(f"--input_size {args.input_size} is not a multiple of --patch_size {args.patch_size}")


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
    fc_norm). Anything else raises a ValueError listing the offending keys before any weight is copied.
    """
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
