"""Learning-rate rules: the schedule flags, the lr from --blr and the effective batch, and the per-iteration
warm-up + cosine schedule."""
import math

LR_RULES = {"sqrt": "blr * sqrt(eff) / {divisor}", "linear": "blr * eff / 256"}


def add_schedule_args(parser, sqrt_divisor, **defaults):
    """The optimisation flags of a training script; `defaults` (batch_size=..., epochs=..., ...) are its recipe."""
    group = parser.add_argument_group("schedule")
    group.add_argument("--batch_size", type=int, help="images per GPU (effective batch = batch_size * accum_iter "
                                                      "* world size)")
    group.add_argument("--epochs", type=int)
    group.add_argument("--accum_iter", default=1, type=int, help="micro-batches per optimizer step")
    group.add_argument("--lr", default=None, type=float, help="absolute lr (overrides --blr)")
    group.add_argument("--blr", type=float, help="base lr, scaled by the effective batch per --lr_scale")
    group.add_argument("--lr_scale", choices=sorted(LR_RULES),
                       help=f"sqrt: {LR_RULES['sqrt'].format(divisor=sqrt_divisor)} (LUT authors); "
                            f"linear: {LR_RULES['linear']} (MAE)")
    group.add_argument("--min_lr", type=float, help="lr at the end of the cosine")
    group.add_argument("--warmup_epochs", type=int, help="linear warm-up from 0")
    group.add_argument("--weight_decay", type=float)
    parser.set_defaults(sqrt_divisor=sqrt_divisor, **defaults)


def effective_lr(args, eff_batch, divisor=4):
    """args.lr if given, else from args.blr and the effective batch (batch * accum_iter * world_size): 'sqrt'
    blr * sqrt(eff_batch) / divisor (LUT authors: divisor 4 pre-training, 8 fine-tuning), 'linear' blr * eff_batch /
    256 (MAE). The two agree at eff_batch 4096 with divisor 4, and 1024 with divisor 8."""
    if args.lr is not None:
        return args.lr
    if args.lr_scale == "sqrt":
        return args.blr * math.sqrt(eff_batch) / divisor
    return args.blr * eff_batch / 256


def set_lr(args):
    """Set args.lr from the flags and the effective batch of this run, and print how it was derived."""
    eff_batch = args.batch_size * args.accum_iter * args.world_size
    given = args.lr is not None
    args.lr = effective_lr(args, eff_batch, args.sqrt_divisor)
    rule = "--lr" if given else LR_RULES[args.lr_scale].format(divisor=args.sqrt_divisor) + f" with blr {args.blr:.3e}"
    print(f"effective batch {eff_batch} = {args.batch_size} x {args.accum_iter} accum x {args.world_size} ranks; "
          f"lr {args.lr:.3e} ({rule})")


def adjust_learning_rate(optimizer, epoch, args):
    """Set and return the lr at fractional `epoch`: linear warm-up from 0 over args.warmup_epochs, then a half-cycle
    cosine to args.min_lr at args.epochs. Each param group gets lr * group['lr_scale'] (default 1)."""
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
