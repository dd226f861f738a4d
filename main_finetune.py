"""Fine-tune a pre-trained encoder for image classification (SPEC §4), on one CPU/GPU or with torchrun / srun.

    torchrun --nproc_per_node=8 main_finetune.py --model vit_base_patch16 --finetune lut_b.pth \
        --data_path /imagenet --batch_size 128 --epochs 100 --dist_eval --output_dir out/ft_b

Only evaluate a fine-tuned checkpoint:

    python main_finetune.py --model vit_base_patch16 --eval --resume out/ft_b/checkpoint-best.pth --data_path /imagenet

See TRAINING.md for the recipes. main_linprobe.py shares this file's data, checkpoint and epoch-loop code.
"""
import argparse
import datetime
import json
import os
import random
import time

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, auto_augment, create_transform
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch.nn.parallel import DistributedDataParallel

import models_vit
from engine_finetune import evaluate, train_one_epoch
from util.augment import eval_transform
from util.checkpoint import find_resume_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from util.datasets import ResumableDistributedSampler, build_imagefolder, check_images, rank_shard
from util.dist import barrier, destroy_distributed, init_distributed, is_main_process, local_device
from util.logging import append_json_log, create_tb_writer
from util.lr_sched import effective_lr
from util.preemption import PreemptionHandler
from util.pretrained import load_pretrained

# SPEC §4 ViT-B recipes: the LUT authors' and MAE's differ only in the lr rule, base lr and layer decay.
RECIPES = {
    "lut": dict(lr_scale="sqrt", blr=1e-3, layer_decay=0.75),
    "mae": dict(lr_scale="linear", blr=5e-4, layer_decay=0.65),
}
LR_RULES = {"sqrt": "blr * sqrt(eff) / 8", "linear": "blr * eff / 256"}


def add_common_args(parser):
    """Flags shared with main_linprobe.py: model, pre-trained weights, schedule, data, devices, checkpoints."""
    parser.add_argument("--batch_size", type=int, help="images per GPU (effective batch = batch_size * accum_iter "
                                                        "* world size)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--accum_iter", default=1, type=int, help="micro-batches per optimizer step")

    parser.add_argument("--model", default="vit_base_patch16", choices=sorted(models_vit.MODELS))
    parser.add_argument("--input_size", default=224, type=int)
    parser.add_argument("--patch_size", default=16, type=int)
    parser.add_argument("--finetune", default="", metavar="PATH",
                        help="pre-training checkpoint to start from (ours, the LUT authors' or MAE's); "
                             "without it the encoder starts from random weights")
    parser.add_argument("--checkpoint_key", default="model", choices=["model", "model_ema"],
                        help="weights to start from: 'model' (the student; what the LUT authors fine-tune) or "
                             "'model_ema' (the LUT teacher)")

    parser.add_argument("--lr", default=None, type=float, help="absolute lr (overrides --blr)")
    parser.add_argument("--blr", type=float, help="base lr, scaled by the effective batch per --lr_scale")
    parser.add_argument("--lr_scale", choices=sorted(LR_RULES),
                        help="sqrt: blr * sqrt(eff) / 8 (LUT authors); linear: blr * eff / 256 (MAE)")
    parser.add_argument("--min_lr", type=float)
    parser.add_argument("--warmup_epochs", type=int)
    parser.add_argument("--weight_decay", type=float)
    parser.add_argument("--clip_grad", default=None, type=float, help="clip the gradient norm (default: no clipping)")

    parser.add_argument("--data_path", required=True, help="ImageFolder root with train/<class>/ and val/<class>/")
    parser.add_argument("--output_dir", default="./output_dir")
    parser.add_argument("--log_dir", default=None, help="TensorBoard folder (default: output_dir)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                        help="autocast precision (default bf16 on CUDA, none on CPU); fp16 uses a grad scaler")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--resume", default="", help="checkpoint of this script to resume from (or to --eval)")
    parser.add_argument("--no_auto_resume", action="store_false", dest="auto_resume",
                        help="do not resume from output_dir/checkpoint-last.pth when it exists")
    parser.add_argument("--eval", action="store_true", help="only evaluate the --resume checkpoint on val/")
    parser.add_argument("--dist_eval", action="store_true",
                        help="evaluate on a shard of val/ per rank (exact: no image is repeated or dropped)")
    parser.add_argument("--num_workers", default=10, type=int)
    parser.add_argument("--pin_mem", action="store_true", help="pin CPU memory for faster host-to-GPU copies")
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)
    parser.add_argument("--print_freq", default=20, type=int)


def get_args_parser():
    parser = argparse.ArgumentParser("Fine-tuning of a pre-trained ViT for classification", add_help=False)
    add_common_args(parser)
    parser.add_argument("--recipe", default="lut", choices=sorted(RECIPES),
                        help="defaults for --lr_scale / --blr / --layer_decay: lut (sqrt, 1e-3, 0.75) or "
                             "mae (linear, 5e-4, 0.65)")
    parser.add_argument("--layer_decay", type=float, help="layer-wise lr decay (lr scale decay^(depth + 1 - layer))")
    parser.add_argument("--drop_path", default=0.1, type=float, help="stochastic depth rate")
    parser.add_argument("--global_pool", action="store_true",
                        help="classify the mean of the patch tokens followed by a new fc_norm (default)")
    parser.add_argument("--cls_token", action="store_false", dest="global_pool",
                        help="classify the CLS token after the pre-trained final norm instead")
    parser.set_defaults(global_pool=True)

    # Augmentation and regularisation (timm): RandAugment, random erasing, Mixup / CutMix, label smoothing.
    parser.add_argument("--color_jitter", default=None, type=float, help="(unused while --aa is set)")
    parser.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy (none = off)")
    parser.add_argument("--smoothing", default=0.1, type=float, help="label smoothing")
    parser.add_argument("--reprob", default=0.25, type=float, help="random erasing probability")
    parser.add_argument("--remode", default="pixel", help="random erasing mode")
    parser.add_argument("--recount", default=1, type=int, help="random erasing count")
    parser.add_argument("--mixup", default=0.8, type=float, help="mixup alpha (0 = off)")
    parser.add_argument("--cutmix", default=1.0, type=float, help="cutmix alpha (0 = off)")
    parser.add_argument("--cutmix_minmax", default=None, type=float, nargs=2, help="cutmix box ratio bounds")
    parser.add_argument("--mixup_prob", default=1.0, type=float, help="probability of mixing a batch")
    parser.add_argument("--mixup_switch_prob", default=0.5, type=float, help="probability of cutmix over mixup")
    parser.add_argument("--mixup_mode", default="batch", choices=["batch", "pair", "elem"])
    # SPEC §4 LUT ViT-B recipe: 100 epochs at an effective batch of 1024 (128 per GPU x 8 GPUs).
    parser.set_defaults(batch_size=128, epochs=100, min_lr=1e-6, warmup_epochs=5, weight_decay=0.05)
    return parser


def mixup_active(args):
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def check_args(args):
    """Validate the flags shared with main_linprobe.py before anything expensive is built; fills --amp."""
    if args.input_size % args.patch_size:
        raise SystemExit(f"--input_size {args.input_size} is not a multiple of --patch_size {args.patch_size}")
    if args.batch_size < 1 or args.accum_iter < 1 or args.epochs < 1:
        raise SystemExit("--batch_size, --accum_iter and --epochs must be positive")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but CUDA is not available (use --device cpu)")
    if args.amp is None:
        args.amp = "bf16" if args.device.startswith("cuda") else "none"
    if args.amp == "fp16" and not args.device.startswith("cuda"):
        raise SystemExit("--amp fp16 needs CUDA; use --amp bf16 or none on CPU")
    if args.eval and not args.resume:
        raise SystemExit("--eval evaluates the checkpoint given with --resume PATH")
    for flag in ("finetune", "resume"):
        path = getattr(args, flag)
        if path and not os.path.isfile(path):
            raise SystemExit(f"--{flag} checkpoint not found: {path}")


def posterize(img, bits_to_keep, **kwargs):
    """timm's RandAugment posterize, also for 0 bits: 'inc1' policies ask for 0 bits at magnitude 10 (reached with
    --aa rand-m9-mstd0.5-inc1), which Pillow >= 13 refuses; older Pillow returned a black image, as this does."""
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def train_transform(args):
    """timm's training transform (SPEC §5): RandomResizedCrop + flip, RandAugment, normalisation, random erasing."""
    transform = create_transform(
        args.input_size, is_training=True, color_jitter=args.color_jitter,
        auto_augment=None if args.aa in ("", "none") else args.aa, interpolation="bicubic",
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    for op in (op for t in transform.transforms for op in getattr(t, "ops", [])):
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize
    return transform


def check_finetune_args(args):
    """Fine-tuning's own flags: fills --lr_scale / --blr / --layer_decay from --recipe where not given."""
    for name, value in RECIPES[args.recipe].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if mixup_active(args) and args.batch_size % 2:
        raise SystemExit(f"Mixup / CutMix pair up the images of a batch: --batch_size must be even, "
                         f"got {args.batch_size}")


def build_datasets(args, train_transform):
    """(train, val) ImageFolders of args.data_path; sets args.nb_classes. Fails with a clear message on bad data."""
    try:
        train = build_imagefolder(args.data_path, "train", train_transform)
        val = build_imagefolder(args.data_path, "val", eval_transform(args.input_size))
        check_images([path for path, _ in train.samples])
    except (OSError, ValueError) as e:
        raise SystemExit(f"--data_path: {e}")
    if train.classes != val.classes:
        raise SystemExit(f"--data_path: {args.data_path}/train and {args.data_path}/val have different classes")
    args.nb_classes = len(train.classes)
    return train, val


def build_loaders(args, train_set, val_set, device):
    """Training loader (shuffled, split over ranks, drop_last) and validation loader (the whole set on every rank,
    or one shard per rank with --dist_eval)."""
    # torch's DistributedSampler split, able to skip the batches a preempted run already trained on.
    sampler = ResumableDistributedSampler(len(train_set), args.world_size, args.rank, shuffle=True, seed=args.seed,
                                          with_seeds=False)
    pin = args.pin_mem and device.type == "cuda"
    train_loader = torch.utils.data.DataLoader(
        train_set, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=pin,
        drop_last=True, persistent_workers=args.num_workers > 0)
    args.steps_per_epoch = len(train_loader) // args.accum_iter
    if args.steps_per_epoch == 0:
        raise SystemExit(f"{len(train_set)} training images are fewer than one optimizer step "
                         f"({args.batch_size} x {args.accum_iter} x {args.world_size} ranks)")
    if args.dist_eval and args.distributed:
        val_set = rank_shard(val_set, args.rank, args.world_size)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size, num_workers=args.num_workers,
                                             pin_memory=pin)
    return train_loader, val_loader


def set_seed(args):
    # Each rank draws different augmentations; DDP copies rank 0's initial weights to the others.
    seed = args.seed + args.rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)  # timm's RandAugment and random erasing draw from python's random


def set_lr(args):
    eff_batch = args.batch_size * args.accum_iter * args.world_size
    args.lr = effective_lr(args, eff_batch, divisor=8)
    print(f"effective batch {eff_batch} = {args.batch_size} x {args.accum_iter} accum x {args.world_size} ranks; "
          f"lr {args.lr:.3e} ({LR_RULES[args.lr_scale]} with blr {args.blr:.3e}, unless --lr was given)")


def resume(path, args, model, optimizer, scaler):
    """Load a checkpoint of this script; returns (start epoch, start step in it, best top-1 so far, epoch totals).

    A checkpoint written at a preemption signal resumes mid-epoch, after the batches already trained on, with the
    logger totals of the epoch's first part (None otherwise)."""
    ckpt = load_checkpoint(path)
    saved = ckpt.get("args") or {}
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
    if saved.get("model", args.model) != args.model:
        raise SystemExit(f"{path} was trained as {saved['model']}, not --model {args.model}; "
                         f"use another --output_dir or --no_auto_resume")
    model.load_state_dict(ckpt["model"])
    if args.eval:
        return 0, 0, 0.0, None
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    epoch, done = ckpt["epoch"], ckpt.get("epoch_step", args.steps_per_epoch)
    if done < args.steps_per_epoch:
        print(f"Resumed from {path}: epoch {epoch}, step {done}/{args.steps_per_epoch}")
        return epoch, done, ckpt["max_accuracy"], ckpt.get("epoch_totals")
    print(f"Resumed from {path}: epoch {epoch} complete, best top-1 {ckpt['max_accuracy']:.2f}%")
    return epoch + 1, 0, ckpt["max_accuracy"], None


def report(stats):
    print(f"Accuracy on {stats['count']} test images: top-1 {stats['acc1']:.3f}% "
          f"({round(stats['acc1'] * stats['count'] / 100)}/{stats['count']}), top-5 {stats['acc5']:.3f}%, "
          f"loss {stats['loss']:.4f}")


def fit(args, model, optimizer, criterion, train_loader, val_loader, device, mixup_fn=None):
    """The epoch loop shared with main_linprobe.py: (auto-)resume or --eval, then train, evaluate on val/, and save
    checkpoint-last.pth every epoch and checkpoint-best.pth on a new best top-1.

    model: unwrapped, on `device`. Returns the last evaluation's dict(acc1, acc5, loss, count) plus max_accuracy.
    """
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    start_epoch, start_step, max_accuracy, totals = 0, 0, 0.0, None
    ckpt_path = find_resume_checkpoint(args.output_dir, args.resume, args.auto_resume and not args.eval)
    if ckpt_path:
        start_epoch, start_step, max_accuracy, totals = resume(ckpt_path, args, model, optimizer, scaler)
    reduce = args.dist_eval and args.distributed
    if args.eval:
        stats = evaluate(model, val_loader, device, args.amp, reduce)
        report(stats)
        return {**stats, "max_accuracy": stats["acc1"]}

    ddp_model = model
    if args.distributed:
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
    log_writer = create_tb_writer(args.log_dir or args.output_dir)

    def save(name, epoch, epoch_step, totals=None):
        if is_main_process():
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "epoch": epoch, "epoch_step": epoch_step, "max_accuracy": max_accuracy, "rng": rng_state(),
                     "args": vars(args)}
            if epoch_step < args.steps_per_epoch:  # mid-epoch: the resumed run's epoch means cover the whole epoch
                state["epoch_totals"] = totals
            save_checkpoint(state, os.path.join(args.output_dir, name))
        barrier()

    preemption = PreemptionHandler(check_every=args.print_freq)
    print(f"Start training for {args.epochs} epochs from epoch {start_epoch}, step {start_step}")
    start_time = time.time()
    stats = {}
    for epoch in range(start_epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch, start_iter=start_step * args.accum_iter, batch_size=args.batch_size)
        train_stats, done, epoch_totals = train_one_epoch(ddp_model, criterion, train_loader, optimizer, scaler,
                                                          device, epoch, args, mixup_fn, log_writer, start_step,
                                                          preemption.requested, totals)
        start_step, totals = 0, None
        if done < args.steps_per_epoch:  # preempted mid-epoch: keep the position, evaluate after the requeue
            save("checkpoint-last.pth", epoch, done, epoch_totals)
            print(f"Stopped at epoch {epoch}, step {done}/{args.steps_per_epoch}; checkpoint-last.pth resumes here")
            break
        stats = evaluate(model, val_loader, device, args.amp, reduce)
        report(stats)
        is_best = stats["acc1"] > max_accuracy
        max_accuracy = max(max_accuracy, stats["acc1"])
        print(f"Max accuracy: {max_accuracy:.2f}%")
        save("checkpoint-last.pth", epoch, done)
        if is_best:
            save("checkpoint-best.pth", epoch, done)
        if log_writer is not None:
            for name, value in {**{f"train_{k}": v for k, v in train_stats.items()},
                                **{f"test_{k}": v for k, v in stats.items()}}.items():
                log_writer.add_scalar(f"epoch/{name}", value, epoch)
            log_writer.flush()
        append_json_log(args.output_dir, {**{f"train_{k}": v for k, v in train_stats.items()},
                                          **{f"test_{k}": v for k, v in stats.items()}, "epoch": epoch})
        if preemption.requested(epoch * args.steps_per_epoch + done):
            break
    if log_writer is not None:
        log_writer.close()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    if preemption.stopping:
        destroy_distributed()
        preemption.requeue()
    return {**stats, "max_accuracy": max_accuracy}


def build_model(args, resuming):
    model = models_vit.MODELS[args.model](
        img_size=args.input_size, patch_size=args.patch_size, num_classes=args.nb_classes,
        drop_path_rate=args.drop_path, global_pool="avg" if args.global_pool else "token")
    if args.finetune and not resuming:
        load_pretrained(model, args.finetune, args.checkpoint_key)
        # MAE's choice: a near-zero head, so early gradients do not wreck the pre-trained features.
        trunc_normal_(model.head.weight, std=2e-5)
    elif not resuming:
        print("No --finetune checkpoint: training from random weights")
    return model


def build_optimizer(args, model, device):
    """AdamW (0.9, 0.999) with layer-wise lr decay: parameter group lr_scale = layer_decay^(depth + 1 - layer), layer
    0 being the embeddings (patch_embed, cls_token, pos_embed), i the i-th block, depth + 1 fc_norm and the head.
    No weight decay on biases, norms, cls_token and pos_embed."""
    param_groups = param_groups_layer_decay(model, args.weight_decay, model.no_weight_decay(),
                                            layer_decay=args.layer_decay)
    # The fused kernel (CUDA and CPU) updates all parameters in one pass, the same math as the per-tensor loop.
    return torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.999), fused=device.type in ("cuda", "cpu"))


def main(args):
    """Fine-tune (or with --eval only evaluate) as `args` describes; returns the last evaluation's stats."""
    init_distributed(args)
    check_args(args)
    check_finetune_args(args)
    device = local_device(args)
    print(f"job dir: {os.path.dirname(os.path.realpath(__file__))}")
    set_seed(args)

    train_set, val_set = build_datasets(args, train_transform(args))
    train_loader, val_loader = build_loaders(args, train_set, val_set, device)
    print(f"{len(train_set)} training and {len(val_set)} validation images, {args.nb_classes} classes")
    print(json.dumps(vars(args), indent=1, default=str))

    resuming = bool(args.resume or find_resume_checkpoint(args.output_dir, "", args.auto_resume))
    model = build_model(args, resuming).to(device)
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    mixup_fn = None
    if mixup_active(args):
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)
        criterion = SoftTargetCrossEntropy()  # Mixup already smooths its soft targets
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    set_lr(args)
    optimizer = build_optimizer(args, model, device)
    stats = fit(args, model, optimizer, criterion, train_loader, val_loader, device, mixup_fn)
    destroy_distributed()
    return stats


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[get_args_parser()])
    main(parser.parse_args())
