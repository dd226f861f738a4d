"""Supervised training and evaluation of pre-trained encoders: the encoder and data flags the evaluation scripts
share, labelled data, one epoch of fine-tuning or linear probing, top-1 / top-5 evaluation, the epoch loop."""
import contextlib
import os
import time

import torch
from timm.utils import accuracy

import models_vit
from util.augment import eval_transform, normalize
from util.checkpoint import (last_checkpoint, load_checkpoint, load_training_state, normalize_pretrained,
                             replay_killed_epoch, saved_args, save_epoch)
from util.datasets import ResumableDistributedSampler, check_images, check_unreadable, labelled_splits, rank_shard
from util.dist import all_reduce_sum, autocast, wrap_ddp
from util.logging import MetricLogger, create_tb_writer
from util.lr_sched import adjust_learning_rate
from util.preemption import PreemptionHandler
from util.run import end_run
from util.sources import add_source_args


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


def add_data_args(parser):
    group = parser.add_argument_group("data and evaluation")
    add_source_args(group, labelled=True)
    group.add_argument("--nb_classes", default=None, type=int, help="number of classes (default: the data's)")
    group.add_argument("--eval", action="store_true", help="only evaluate the --resume checkpoint on val/")
    group.add_argument("--dist_eval", action="store_true",
                       help="evaluate on a shard of val/ per rank (exact: no image is repeated or dropped)")


def build_loaders(args, train_transform, device):
    """(train, val) loaders of args.data_path's labelled splits, train None with --eval; checks and sets nb_classes and
    steps_per_epoch. Training: shuffled over ranks, resumable mid-epoch; val: the whole set on every rank, or this
    rank's shard with --dist_eval."""
    try:
        transforms = {"val": eval_transform(args.input_size), **({} if args.eval else {"train": train_transform})}
        sets, classes = labelled_splits(args.data_path, transforms, args.image_column, args.label_column)
        val, train = sets["val"], sets.get("train")
        if train is not None:
            check_images(train.images)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--data_path: {e}")
    if args.nb_classes not in (None, classes):
        raise SystemExit(f"--nb_classes {args.nb_classes}, but {args.data_path}/val has {classes} classes")
    args.nb_classes = classes
    print(f"{len(train) if train else 'no'} training and {len(val)} validation images, {args.nb_classes} classes")
    pin = args.pin_mem and device.type == "cuda"
    if args.dist_eval and args.distributed:
        val = rank_shard(val, args.rank, args.world_size)
    val_loader = torch.utils.data.DataLoader(val, batch_size=args.batch_size, num_workers=args.num_workers,
                                             pin_memory=pin)
    if train is None:
        return None, val_loader
    sampler = ResumableDistributedSampler(len(train), args.world_size, args.rank, shuffle=True, seed=args.seed,
                                          with_seeds=False)
    train_loader = torch.utils.data.DataLoader(
        train, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=pin,
        drop_last=True, persistent_workers=args.num_workers > 0)
    args.steps_per_epoch = len(train_loader) // args.accum_iter
    if args.steps_per_epoch == 0:
        raise SystemExit(f"{len(train)} training images are fewer than one optimizer step "
                         f"({args.batch_size} x {args.accum_iter} x {args.world_size} ranks)")
    return train_loader, val_loader


def train_one_epoch(model, criterion, data_loader, optimizer, scaler, device, epoch, args, mixup_fn=None,
                    clip_grad=None, start_step=0, totals=None, log_writer=None, should_stop=lambda step: False):
    """Train from optimizer step `start_step` of `epoch` to its end, or until should_stop(global step).

    model: DDP-wrapped when distributed; batches: (images [B, 3, H, W], labels [B]); totals: the logger totals of the
    epoch's first part when resuming mid-epoch. Returns (epoch means over ranks, optimizer steps done, logger totals).
    """
    model.train()
    accum = args.accum_iter
    iters = args.steps_per_epoch * accum
    logger = MetricLogger(header=f"Epoch [{epoch}]", print_freq=args.print_freq, total_iters=iters, totals=totals,
                          epoch=epoch, log_writer=log_writer)
    step = start_step
    data_loader.sampler.set_epoch(epoch, start_iter=start_step * accum, batch_size=args.batch_size)
    optimizer.zero_grad(set_to_none=True)
    batches = logger.log_every(data_loader, images_per_iter=args.batch_size * args.world_size,
                               start_iter=start_step * accum)
    for it, (samples, targets) in enumerate(batches, start=start_step * accum):
        if it >= iters:
            break
        if it % accum == 0:
            logger.set(lr=adjust_learning_rate(optimizer, epoch + it / iters, args))
        samples = normalize(samples.to(device, non_blocking=True))
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        last_micro = (it + 1) % accum == 0
        # Micro-steps inside an accumulation window skip DDP's gradient all-reduce.
        with contextlib.nullcontext() if last_micro or not args.distributed else model.no_sync():
            with autocast(device, args.amp):
                loss = criterion(model(samples), targets)
            scaler.scale(loss / accum).backward()
        logger.update(loss=loss)
        if last_micro:
            if clip_grad is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if should_stop(epoch * args.steps_per_epoch + step):
                break
    unreadable = check_unreadable(data_loader.dataset, (step - start_step) * accum * args.batch_size * args.world_size,
                                  args.max_unreadable)
    return {**logger.summary(), "unreadable_images": unreadable}, step, logger.totals()


@torch.no_grad()
def evaluate(model, data_loader, device, amp="none", reduce=False, classes=None, header="Test:"):
    """dict(acc1, acc5 (%), loss (mean cross-entropy), count) of `model` on `data_loader`; the model is unwrapped,
    not DDP, since the ranks' shards may differ in length.

    reduce: the loader holds this rank's shard (--dist_eval); counts are summed over ranks, so the result is exactly
    the whole set's. classes: the indices of the competing logits, which the labels index, e.g. ImageNet-R's 200."""
    model.eval()
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    # loss sum, top-1 hits, top-5 hits, images; float64 keeps the counts exact.
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for images, targets in MetricLogger(header=header, print_freq=50).log_every(data_loader):
        images = normalize(images.to(device, non_blocking=True))
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
            output = model(images)
        output = output.float() if classes is None else output[:, classes].float()
        acc1, acc5 = accuracy(output, targets, topk=(1, 5))
        n = targets.shape[0]
        # timm's accuracy is a percentage of this batch: back to hit counts (rounding removes float error).
        counts = [criterion(output, targets).double(), (acc1.double() * n / 100).round(),
                  (acc5.double() * n / 100).round(), torch.tensor(n, dtype=torch.float64, device=device)]
        totals += torch.stack(counts)
    if reduce:
        totals = all_reduce_sum(totals)
    loss, hits1, hits5, count = totals.tolist()
    stats = dict(acc1=100 * hits1 / count, acc5=100 * hits5 / count, loss=loss / count, count=int(count))
    print(f"Accuracy on {stats['count']} test images: top-1 {stats['acc1']:.3f}% ({int(hits1)}/{int(count)}), "
          f"top-5 {stats['acc5']:.3f}%, loss {stats['loss']:.4f}")
    return stats


def fit(args, model, optimizer, criterion, train_loader, val_loader, device, ckpt_path, mixup_fn=None,
        clip_grad=None):
    """The epoch loop of fine-tuning and linear probing: resume from ckpt_path (None: start), then per epoch train,
    evaluate on val/, keep the best top-1 and save. model: unwrapped, on `device`. A preemption stops at an optimizer
    step all ranks agree on; the position is saved and the requeued run goes on from there."""
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    start_epoch, start_step, totals, ckpt = load_training_state(ckpt_path, args, model, optimizer, scaler)
    best = dict(max_accuracy=ckpt.get("max_accuracy", 0.0), best_epoch=ckpt.get("best_epoch"))
    ddp_model = wrap_ddp(model, args, device)
    log_writer = create_tb_writer(args.log_dir or args.output_dir)
    replay_killed_epoch(args, ckpt_path, ckpt, log_writer)
    preemption = PreemptionHandler(check_every=args.print_freq)
    dist_eval = args.dist_eval and args.distributed

    print(f"Start training for {args.epochs} epochs from epoch {start_epoch}, step {start_step}")
    start_time, stopped = time.time(), False
    for epoch in range(start_epoch, args.epochs):
        train_stats, done, totals = train_one_epoch(ddp_model, criterion, train_loader, optimizer, scaler, device,
                                                    epoch, args, mixup_fn, clip_grad, start_step, totals,
                                                    log_writer, preemption.requested)
        test_stats = {}
        if done == args.steps_per_epoch:
            test_stats = evaluate(model, val_loader, device, args.amp, dist_eval)
            if test_stats["acc1"] > best["max_accuracy"]:
                best = dict(max_accuracy=test_stats["acc1"], best_epoch=epoch)
            print(f"Max accuracy: {best['max_accuracy']:.2f}%")
        save_epoch(args, model, optimizer, scaler, epoch, done, totals, log_writer, train_stats, test_stats,
                   best=best)
        if done < args.steps_per_epoch:
            print(f"Stopped at epoch {epoch}, step {done}/{args.steps_per_epoch}; "
                  f"{last_checkpoint(args.output_dir)} resumes here")
        stopped = done < args.steps_per_epoch or (preemption.requested(epoch * args.steps_per_epoch + done)
                                                  and epoch + 1 < args.epochs)  # after the last: nothing to resume
        if stopped:
            break
        start_step, totals = 0, None
    end_run(log_writer, start_time, preemption, stopped)
