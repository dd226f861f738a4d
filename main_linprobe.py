"""Linear probing of a frozen pre-trained encoder, MAE's protocol, on one CPU/GPU or with torchrun / srun.

Only BatchNorm (no affine) + a linear layer on the encoder's features are trained, with LARS, no weight decay, MAE's
RandomResizedCrop + flip. Features are the CLS token after the final norm; --global_pool: MAE's fresh, frozen fc_norm
on the mean of the pre-norm patch tokens; --lut_global: the mean of the final-norm patch tokens. Checkpoints,
auto-resume, --eval and --dist_eval are main_finetune.py's; TRAINING.md has the commands."""
import argparse

import torch
from timm.layers import trunc_normal_

import models_vit
from engine_finetune import add_data_args, add_encoder_args, build_loaders, check_encoder_args, evaluate, fit
from util.augment import linprobe_transform
from util.batchnorm import convert_sync_batchnorm
from util.checkpoint import find_resume_checkpoint
from util.lars import LARS
from util.lr_sched import add_schedule_args, set_lr
from util.rng import seed_everything
from util.run import add_run_args, start_run, take_output_dir


def get_args_parser():
    parser = argparse.ArgumentParser("Linear probing of a frozen pre-trained ViT", add_help=False)
    # MAE's protocol: 90 epochs at an effective batch of 16384 (512 per GPU x accum 4 x 8 GPUs), lr = 0.1 * eff / 256.
    add_schedule_args(parser, sqrt_divisor=8, batch_size=512, epochs=90, blr=0.1, lr_scale="linear", min_lr=0.0,
                      warmup_epochs=10, weight_decay=0.0)
    add_encoder_args(parser)
    pool = parser.add_mutually_exclusive_group()
    pool.add_argument("--global_pool", action="store_true",
                      help="MAE's global pooling instead of the CLS token: the mean of the patch tokens before the "
                           "final norm, through a new LayerNorm fc_norm (frozen at its initialisation)")
    pool.add_argument("--lut_global", action="store_true",
                      help="LUT's global vector instead of the CLS token: the mean of the final-norm patch tokens "
                           "(what LUT's broader-context loss trains)")
    add_data_args(parser)
    add_run_args(parser)
    return parser


def build_model(args, pretrained):
    """Frozen ViT encoder + BatchNorm1d(affine=False) + Linear; only the head trains."""
    model = models_vit.MODELS[args.model](
        img_size=args.input_size, patch_size=args.patch_size, num_classes=args.nb_classes,
        global_pool="avg" if args.global_pool or args.lut_global else "token", fc_norm=args.global_pool)
    if pretrained and args.finetune:
        models_vit.load_pretrained(model, args.finetune, args.checkpoint_key)
    elif pretrained:
        print("No --finetune checkpoint: probing a randomly initialised encoder (a baseline)")
    trunc_normal_(model.head.weight, std=0.01)
    # Normalising the features without learned scale or shift makes the probe insensitive to their scale, which
    # differs a lot between pre-training methods (MAE's protocol).
    model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6),
                                     model.head)
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    return model


def main(args):
    """Linear-probe (or with --eval only evaluate) as `args` describes."""
    device = start_run(args)
    check_encoder_args(args)
    if not (args.eval or take_output_dir(args)):
        return
    seed_everything(args.seed + args.rank)  # each rank its own crops
    train_loader, val_loader = build_loaders(args, linprobe_transform(args.input_size), device)

    ckpt_path = None if args.eval else find_resume_checkpoint(args.output_dir, args.resume, args.auto_resume)
    model = build_model(args, pretrained=not (args.eval or ckpt_path)).to(device)
    if args.distributed:
        model = convert_sync_batchnorm(model)  # the probe's BatchNorm sees the global batch
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{args.model}: {n_parameters} trainable parameters (the head)")
    if args.eval:
        models_vit.load_classifier(model, args.resume)
        return evaluate(model, val_loader, device, args.amp, args.dist_eval and args.distributed)

    set_lr(args)
    optimizer = LARS(model.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    fit(args, model, optimizer, torch.nn.CrossEntropyLoss(), train_loader, val_loader, device, ckpt_path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[get_args_parser()])
    main(parser.parse_args())
