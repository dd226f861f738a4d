"""One epoch of MAE or LUT pre-training (docs/method.md), resumable at any optimizer step.

`pretrain_step` (the losses of one micro-batch) and `apply_gradients` (optimizer step and teacher update) are the
whole computation of a training step; `train_one_epoch` adds data, schedules and logging around them, and
tools/benchmark.py times exactly these functions. The model computes the method (forward_train), whichever it is."""
import contextlib
import copy

import torch
from timm.optim import param_groups_weight_decay

from util.augment import pretrain_views_on_device
from util.datasets import augmentation_seed, check_unreadable
from util.dist import autocast
from util.ema import momentum_at, update_teacher
from util.lr_sched import adjust_learning_rate
from util.logging import MetricLogger


def masking_noise(args, epoch, micro_step, batch_size, num_patches, device):
    """Masking noise [batch_size, L] for this rank, a pure function of (seed, epoch, micro step).

    The noise of the whole global batch is drawn and rank r keeps rows r::world_size: the sampler deals samples the
    same way, so each image gets the same mask whatever the number of ranks, and a resumed run draws the same masks."""
    g = torch.Generator(device=device)
    g.manual_seed(augmentation_seed(args.seed, epoch, micro_step))  # the same hash as the augmentations' seeds
    noise = torch.rand(batch_size * args.world_size, num_patches, generator=g, device=device)
    return noise[args.rank::args.world_size]


class TrainingForward(torch.nn.Module):
    """The student with its forward_train as forward: DDP all-reduces the gradients of what runs through the forward
    of the module it wraps, so this is what DDP wraps. It holds no weights of its own."""

    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, views, mask_ratio, noise, targets):
        return self.student.forward_train(views, mask_ratio, noise, targets)


def build_teacher(student):
    """The EMA teacher of a student that needs one (LUT): its copy in eval mode, without gradients; else None."""
    return copy.deepcopy(student).eval().requires_grad_(False) if student.needs_teacher else None


def pretrain_step(model, teacher, views, noise, args):
    """The student's forward_train dict for one micro-batch under the --amp autocast, e.g. dict(loss, mim, bc) for
    LUT. model: TrainingForward(student), DDP-wrapped when distributed; teacher: the EMA copy in eval mode, or None;
    views: as many [B, 3, H, W] batches as the student's num_views; noise: [B, L] masking noise."""
    with autocast(views[0].device, args.amp):
        targets = teacher.forward_teacher(*views) if teacher is not None else None
        return model(views, args.mask_ratio, noise, targets)


def build_optimizer(student, args, device):
    """AdamW (0.9, 0.95), weight decay on weights with ndim >= 2 only; fused: one kernel for all parameters."""
    # By keyword: timm's third positional parameter is weight_decay_exclude_1d, not the no-decay list.
    param_groups = param_groups_weight_decay(student, args.weight_decay,
                                             no_weight_decay_list=student.no_weight_decay())
    return torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type in ("cuda", "cpu"))


def apply_gradients(optimizer, scaler, student, teacher, momentum):
    """Optimizer step on the accumulated gradients, then (LUT) the teacher's EMA update with `momentum`."""
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if student.needs_teacher:
        update_teacher(teacher, student, momentum)


def train_one_epoch(model, teacher, data_loader, optimizer, scaler, device, epoch, args, start_step=0, totals=None,
                    log_writer=None, should_stop=lambda step: False, step_fn=pretrain_step):
    """Train from optimizer step `start_step` of `epoch` to its end, or until should_stop(global step).

    An epoch is args.steps_per_epoch optimizer steps of args.accum_iter micro-batches. model: TrainingForward(student),
    DDP-wrapped when distributed; teacher: the EMA copy, or None; step_fn: pretrain_step or its torch.compile;
    totals: the logger totals of the epoch's first part when resuming mid-epoch.
    Returns (epoch means, optimizer steps of the epoch done, logger totals)."""
    model.train()
    student = getattr(model, "module", model).student  # DDP keeps the module it wraps in .module
    accum, micro_per_epoch = args.accum_iter, args.steps_per_epoch * args.accum_iter
    logger = MetricLogger(header=f"Epoch [{epoch}]", print_freq=args.print_freq, total_iters=micro_per_epoch,
                          totals=totals, epoch=epoch, log_writer=log_writer, tb_prefix="train_")
    step = start_step
    data_loader.sampler.set_epoch(epoch, start_iter=start_step * accum, batch_size=args.batch_size)
    optimizer.zero_grad(set_to_none=True)
    batches = logger.log_every(data_loader, images_per_iter=args.batch_size * args.world_size,
                               start_iter=start_step * accum)
    for micro, batch in enumerate(batches, start=start_step * accum):
        if micro >= micro_per_epoch:
            break
        if micro % accum == 0:
            logger.set(lr=adjust_learning_rate(optimizer, epoch + micro / micro_per_epoch, args))
        views = pretrain_views_on_device(batch, device)
        noise = masking_noise(args, epoch, micro, views[0].shape[0], student.num_patches, device)

        last_micro = (micro + 1) % accum == 0
        # Micro-steps inside an accumulation window skip DDP's gradient all-reduce.
        with contextlib.nullcontext() if last_micro or not args.distributed else model.no_sync():
            terms = step_fn(model, teacher, views, noise, args)
            scaler.scale(terms["loss"] / accum).backward()
        logger.update(**terms)
        if last_micro:
            global_step = epoch * args.steps_per_epoch + step
            momentum = momentum_at(global_step, args.total_steps, args.model_ema_decay)
            apply_gradients(optimizer, scaler, student, teacher, momentum)
            if student.needs_teacher:
                logger.set(momentum=momentum)
            step += 1
            if should_stop(global_step + 1):
                break
    unreadable = check_unreadable(data_loader.dataset, (step - start_step) * accum * args.batch_size * args.world_size,
                                  args.max_unreadable)
    return {**logger.summary(), "unreadable_images": unreadable}, step, logger.totals()
