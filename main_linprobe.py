"""Linear probing of a frozen pre-trained encoder, MAE's protocol (SPEC §4), on one CPU/GPU or with torchrun / srun.

The encoder is frozen; only BatchNorm (no affine) + a linear layer on its features are trained, with LARS, no
weight decay, RandomResizedCrop + flip. Features are the CLS token after the final norm (--global_pool: the mean of
the final-norm patch tokens instead).

    torchrun --nproc_per_node=8 main_linprobe.py --model vit_base_patch16 --finetune lut_b.pth \
        --data_path /imagenet --batch_size 512 --accum_iter 4 --dist_eval --output_dir out/lin_b

Checkpoints, auto-resume, --eval and --dist_eval work as in main_finetune.py. See TRAINING.md.
"""
import argparse
import json
import os

import torch
import torchvision.transforms as T
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_

import main_finetune
import models_vit
from util.batchnorm import convert_sync_batchnorm
from util.checkpoint import find_resume_checkpoint
from util.dist import destroy_distributed, init_distributed, local_device
from util.lars import LARS
from util.pretrained import load_pretrained


def get_args_parser():
    parser = argparse.ArgumentParser("Linear probing of a frozen pre-trained ViT", add_help=False)
    main_finetune.add_common_args(parser)
    parser.add_argument("--global_pool", action="store_true",
                        help="probe the mean of the final-norm patch tokens instead of the CLS token")
    # MAE's protocol: 90 epochs at an effective batch of 16384 (512 per GPU x accum 4 x 8 GPUs), lr = 0.1 * eff / 256.
    parser.set_defaults(batch_size=512, epochs=90, blr=0.1, lr_scale="linear", min_lr=0.0, warmup_epochs=10,
                        weight_decay=0.0)
    return parser


def build_model(args, resuming):
    """Frozen ViT encoder + BatchNorm1d(affine=False) + Linear; only the head trains."""
    model = models_vit.MODELS[args.model](
        img_size=args.input_size, patch_size=args.patch_size, num_classes=args.nb_classes,
        global_pool="avg" if args.global_pool else "token", fc_norm=False)
    if args.finetune and not resuming:
        load_pretrained(model, args.finetune, args.checkpoint_key)
    elif not resuming:
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
    """Linear-probe (or with --eval only evaluate) as `args` describes; returns the last evaluation's stats."""
    init_distributed(args)
    main_finetune.check_args(args)
    device = local_device(args)
    print(f"job dir: {os.path.dirname(os.path.realpath(__file__))}")
    main_finetune.set_seed(args)

    train_transform = T.Compose([
        T.RandomResizedCrop(args.input_size, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])
    train_set, val_set = main_finetune.build_datasets(args, train_transform)
    train_loader, val_loader = main_finetune.build_loaders(args, train_set, val_set, device)
    print(f"{len(train_set)} training and {len(val_set)} validation images, {args.nb_classes} classes")
    print(json.dumps(vars(args), indent=1, default=str))

    resuming = bool(args.resume or find_resume_checkpoint(args.output_dir, "", args.auto_resume))
    model = build_model(args, resuming).to(device)
    if args.distributed:
        model = convert_sync_batchnorm(model, device)  # the probe's BatchNorm sees the global batch
    print(f"{args.model}: {sum(p.numel() for p in model.head.parameters())} trainable parameters (the head)")

    main_finetune.set_lr(args)
    optimizer = LARS(model.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    stats = main_finetune.fit(args, model, optimizer, torch.nn.CrossEntropyLoss(), train_loader, val_loader, device)
    destroy_distributed()
    return stats


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[get_args_parser()])
    main(parser.parse_args())
