"""Learning-rate rules: the lr from --blr and the effective batch, and the per-iteration warm-up + cosine schedule."""
import math


def effective_lr(args, eff_batch, divisor=4):
    """Absolute lr: args.lr if given, else from args.blr and the effective batch (batch * accum_iter * world_size).

    args.lr_scale 'sqrt': blr * sqrt(eff_batch) / divisor (LUT authors; divisor 4 pre-training, 8 fine-tuning);
    'linear': blr * eff_batch / 256 (MAE). The two agree at eff_batch 4096 with divisor 4, and 1024 with divisor 8.
    """
    if args.lr is not None:
        return args.lr
    if args.lr_scale == "sqrt":
        return args.blr * math.sqrt(eff_batch) / divisor
    if args.lr_scale == "linear":
        return args.blr * eff_batch / 256
    raise ValueError(f"--lr_scale must be 'sqrt' or 'linear', got {args.lr_scale!r}")


def adjust_learning_rate(optimizer, epoch, args):
    """Set and return the lr at fractional `epoch` (epoch + iteration / iterations per epoch).

    Linear warm-up from 0 to args.lr over args.warmup_epochs, then a half-cycle cosine down to args.min_lr at
    args.epochs. Each param group gets lr * group['lr_scale'] (layer-wise decay in fine-tuning), default 1.
    """
    if epoch < args.warmup_epochs:
        lr = args.lr * epoch / args.warmup_epochs
    elif epoch >= args.epochs:
        lr = args.min_lr
    else:
        progress = (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs)
        lr = args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
