"""One epoch of supervised training (fine-tuning or linear probing) and top-1 / top-5 evaluation."""
import contextlib

import torch
from timm.utils import accuracy

from engine_pretrain import NonFiniteGuard
from util.dist import all_reduce_sum, autocast
from util.logging import MetricLogger
from util.lr_sched import adjust_learning_rate

def train_one_epoch(model, criterion, data_loader, optimizer, scaler, device, epoch, args, mixup_fn=None,
                    log_writer=None, start_step=0, should_stop=lambda step: False, totals=None):
    """Train from optimizer step `start_step` of `epoch` to its end, or until should_stop(global step) says so.

    Per-iteration lr schedule, optional Mixup / CutMix, gradient accumulation, AMP. model: DDP-wrapped when
    distributed; the batches are (images [B, 3, H, W], labels [B]); an epoch is args.steps_per_epoch optimizer steps.
    totals: the logger totals of the epoch's first part when resuming mid-epoch (see MetricLogger).
    Returns (dict of epoch means averaged over ranks plus the last lr, optimizer steps of the epoch done,
    the logger totals to save with a mid-epoch checkpoint).
    """
    model.train()
    accum = args.accum_iter
    iters = args.steps_per_epoch * accum
    logger = MetricLogger(header=f"Epoch [{epoch}]", print_freq=args.print_freq, total_iters=iters, totals=totals)
    guard = NonFiniteGuard(device)
    step = start_step
    optimizer.zero_grad(set_to_none=True)
    batches = logger.log_every(data_loader, images_per_iter=args.batch_size * args.world_size,
                               start_iter=start_step * accum)
    for it, (samples, targets) in enumerate(batches, start=start_step * accum):
        if it >= iters:
            break
        global_step = epoch * args.steps_per_epoch + step
        if it % accum == 0:
            lr = adjust_learning_rate(optimizer, epoch + it / iters, args)
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        with autocast(device, args.amp):
            loss = criterion(model(samples), targets)

        last_micro = (it + 1) % accum == 0
        # Micro-steps inside an accumulation window skip DDP's gradient all-reduce.
        sync = contextlib.nullcontext() if last_micro or not args.distributed else model.no_sync()
        with sync:
            scaler.scale(loss / accum).backward()
        guard.update(global_step, dict(loss=loss))
        logger.update(loss=loss)
        if last_micro:
            if args.clip_grad is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            logger.set(lr=lr)
            step += 1
        if (it + 1) % args.print_freq == 0:
            guard.check()
            if log_writer is not None:
                log_writer.add_scalar("train/loss", loss.item(), global_step)  # rank 0's batch
                log_writer.add_scalar("train/lr", lr, global_step)
        if last_micro and should_stop(global_step + 1):
            break
    guard.check()
    return logger.summary(), step, logger.totals()


@torch.no_grad()
def evaluate(model, data_loader, device, amp="none", reduce=False):
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of `model` on `data_loader` (images, labels).

    reduce: the loader holds this rank's shard of the data (--dist_eval); counts are summed over ranks, so the result
    equals a single-process evaluation of the whole set. model: unwrapped (not DDP), since shards may differ in length.
    Returns dict(acc1, acc5, loss, count).
    """
    model.eval()
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    # loss sum, top-1 hits, top-5 hits, images; float64 keeps the counts exact.
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for images, targets in MetricLogger(header="Test:", print_freq=50).log_every(data_loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp):
            output = model(images)
        output = output.float()
        acc1, acc5 = accuracy(output, targets, topk=(1, 5))
        n = targets.shape[0]
        # timm's accuracy is a percentage of this batch: back to hit counts (rounding removes float error).
        totals += torch.stack([criterion(output, targets).double(), (acc1.double() * n / 100).round(),
                               (acc5.double() * n / 100).round(), torch.tensor(n, dtype=torch.float64,
                                                                                device=device)])
    if reduce:
        totals = all_reduce_sum(totals)
    loss, hits1, hits5, count = totals.tolist()
    return dict(acc1=100 * hits1 / count, acc5=100 * hits5 / count, loss=loss / count, count=int(count))
