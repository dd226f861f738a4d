"""Fine-tune a pre-trained encoder for image classification (or --eval a fine-tuned one), on one CPU/GPU or with
torchrun / srun. TRAINING.md has the recipes and commands."""
import argparse

import torch
from PIL import Image
from timm.data import Mixup, auto_augment, create_transform
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

import models_vit
from engine_finetune import add_data_args, add_encoder_args, build_loaders, check_encoder_args, evaluate, fit
from util.checkpoint import find_resume_checkpoint
from util.lr_sched import add_schedule_args, set_lr
from util.rng import seed_everything
from util.run import add_run_args, start_run, take_output_dir

# The ViT-B recipes of the LUT authors and of MAE differ only in the lr rule, base lr and layer decay.
RECIPES = {
    "lut": dict(lr_scale="sqrt", blr=1e-3, layer_decay=0.75),
    "mae": dict(lr_scale="linear", blr=5e-4, layer_decay=0.65),
}


def get_args_parser():
    parser = argparse.ArgumentParser("Fine-tuning of a pre-trained ViT for classification", add_help=False)
    # The LUT authors' ViT-B recipe: 100 epochs at an effective batch of 1024 (128 per GPU x 8 GPUs).
    add_schedule_args(parser, sqrt_divisor=8, batch_size=128, epochs=100, min_lr=1e-6, warmup_epochs=5,
                      weight_decay=0.05)
    parser.add_argument("--recipe", default="lut", choices=sorted(RECIPES),
                        help="defaults for --lr_scale / --blr / --layer_decay: lut (sqrt, 1e-3, 0.75) or "
                             "mae (linear, 5e-4, 0.65)")
    parser.add_argument("--layer_decay", type=float, help="layer-wise lr decay (lr scale decay^(depth + 1 - layer))")
    parser.add_argument("--clip_grad", default=None, type=float, help="clip the gradient norm (default: no clipping)")
    add_encoder_args(parser)
    parser.add_argument("--drop_path", default=0.1, type=float, help="stochastic depth rate")
    parser.add_argument("--global_pool", action="store_true",
                        help="classify the mean of the patch tokens followed by a new fc_norm (default)")
    parser.add_argument("--cls_token", action="store_false", dest="global_pool",
                        help="classify the CLS token after the pre-trained final norm instead")
    parser.set_defaults(global_pool=True)

    aug = parser.add_argument_group("augmentation and regularisation (timm)")
    aug.add_argument("--color_jitter", default=None, type=float, help="(unused while --aa is set)")
    aug.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy (none = off)")
    aug.add_argument("--smoothing", default=0.1, type=float, help="label smoothing")
    aug.add_argument("--reprob", default=0.25, type=float, help="random erasing probability")
    aug.add_argument("--remode", default="pixel", help="random erasing mode")
    aug.add_argument("--recount", default=1, type=int, help="random erasing count")
    aug.add_argument("--mixup", default=0.8, type=float, help="mixup alpha (0 = off)")
    aug.add_argument("--cutmix", default=1.0, type=float, help="cutmix alpha (0 = off)")
    aug.add_argument("--cutmix_minmax", default=None, type=float, nargs=2, help="cutmix box ratio bounds")
    aug.add_argument("--mixup_prob", default=1.0, type=float, help="probability of mixing a batch")
    aug.add_argument("--mixup_switch_prob", default=0.5, type=float, help="probability of cutmix over mixup")
    aug.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"])
    add_data_args(parser)
    add_run_args(parser)
    return parser


def mixup_active(args):
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def check_args(args):
    """Fine-tuning's own checks; fills --lr_scale / --blr / --layer_decay from --recipe where not given."""
    check_encoder_args(args)
    for name, value in RECIPES[args.recipe].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if mixup_active(args) and args.batch_size % 2:
        raise SystemExit(f"Mixup / CutMix pair up the images of a batch: --batch_size must be even, "
                         f"got {args.batch_size}")


def posterize(img, bits_to_keep, **kwargs):
    """timm's RandAugment posterize, also for 0 bits: 'inc1' policies ask for 0 bits at magnitude 10 (reached with
    --aa rand-m9-mstd0.5-inc1), which Pillow >= 13 refuses; older Pillow returned a black image, as this does."""
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def train_transform(args):
    """timm's training transform: RandomResizedCrop + flip, RandAugment, normalisation, random erasing."""
    transform = create_transform(
        args.input_size, is_training=True, color_jitter=args.color_jitter,
        auto_augment=None if args.aa in ("", "none") else args.aa, interpolation="bicubic",
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    for op in (op for t in transform.transforms for op in getattr(t, "ops", [])):
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize
    return transform


def build_model(args, pretrained):
    model = models_vit.MODELS[args.model](
        img_size=args.input_size, patch_size=args.patch_size, num_classes=args.nb_classes,
        drop_path_rate=args.drop_path, global_pool="avg" if args.global_pool else "token")
    if pretrained and args.finetune:
        models_vit.load_pretrained(model, args.finetune, args.checkpoint_key)
        # MAE's choice: a near-zero head, so early gradients do not wreck the pre-trained features.
        trunc_normal_(model.head.weight, std=2e-5)
    elif pretrained:
        print("No --finetune checkpoint: training from random weights")
    return model


def param_groups_lrd(model, weight_decay, layer_decay):
    """Parameter groups with layer-wise lr decay, MAE's rule (which the LUT authors use too): layer 0 is cls_token,
    pos_embed and patch_embed, block i is layer i + 1, everything else (norm, fc_norm, head) layer depth + 1; a
    parameter of layer l gets lr_scale = layer_decay^(depth + 1 - l). No weight decay on 1-D parameters, cls_token and
    pos_embed. (timm's param_groups_layer_decay puts the final norm with the last block instead.)"""
    top = len(model.blocks) + 1
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            layer = top
        no_decay = p.ndim == 1 or name in model.no_weight_decay()
        group = groups.setdefault((layer, no_decay), dict(params=[], weight_decay=0.0 if no_decay else weight_decay,
                                                          lr_scale=layer_decay ** (top - layer)))
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(args, model, device):
    """AdamW (0.9, 0.999) with MAE's layer-wise lr decay; fused: one kernel for all parameters."""
    param_groups = param_groups_lrd(model, args.weight_decay, args.layer_decay)
    return torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.999), fused=device.type in ("cuda", "cpu"))


def build_criterion(args):
    """(mixup_fn or None, loss): Mixup / CutMix with soft-target cross-entropy (the targets come smoothed), else
    label smoothing or plain cross-entropy."""
    if not mixup_active(args):
        if args.smoothing > 0:
            return None, LabelSmoothingCrossEntropy(smoothing=args.smoothing)
        return None, torch.nn.CrossEntropyLoss()
    mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                     prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                     label_smoothing=args.smoothing, num_classes=args.nb_classes)
    return mixup_fn, SoftTargetCrossEntropy()


def main(args):
    """Fine-tune (or with --eval only evaluate) as `args` describes."""
    device = start_run(args)
    check_args(args)
    if not (args.eval or take_output_dir(args)):
        return
    seed_everything(args.seed + args.rank)  # each rank its own augmentations; DDP copies rank 0's initial weights
    train_loader, val_loader = build_loaders(args, train_transform(args), device)

    ckpt_path = None if args.eval else find_resume_checkpoint(args.output_dir, args.resume, args.auto_resume)
    model = build_model(args, pretrained=not (args.eval or ckpt_path)).to(device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.model}: {n_parameters / 1e6:.2f}M parameters")
    if args.eval:
        models_vit.load_classifier(model, args.resume)
        return evaluate(model, val_loader, device, args.amp, args.dist_eval and args.distributed)

    mixup_fn, criterion = build_criterion(args)
    set_lr(args)
    optimizer = build_optimizer(args, model, device)
    fit(args, model, optimizer, criterion, train_loader, val_loader, device, ckpt_path, mixup_fn,
        args.clip_grad)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[get_args_parser()])
    main(parser.parse_args())
