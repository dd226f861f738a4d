"""Pre-train LUT or MAE on an image folder, on one CPU/GPU or with torchrun / srun across nodes. PRETRAIN.md has
the recipes and commands, docs/method.md the method."""
import argparse
import datetime
import itertools
import time

import torch

import models_lut
from engine_pretrain import TrainingForward, build_optimizer, build_teacher, pretrain_step, train_one_epoch
from util.augment import LUTTwoViews, mae_transform
from util.batchnorm import convert_sync_batchnorm
from util.checkpoint import (find_resume_checkpoint, last_checkpoint, load_training_state, replay_killed_epoch,
                             save_epoch)
from util.datasets import PretrainDataset, ResumableDistributedSampler, check_images
from util.sources import add_source_args, open_images
from util.dist import wrap_ddp
from util.knn import KNNEvaluator
from util.logging import create_tb_writer
from util.lr_sched import add_schedule_args, set_lr
from util.preemption import PreemptionHandler
from util.rng import seed_everything
from util.run import add_run_args, end_run, start_run, take_output_dir


def get_args_parser():
    parser = argparse.ArgumentParser("LUT / MAE pre-training", add_help=False)
    # The LUT authors' ViT-B recipe, except the epochs (1600 there).
    add_schedule_args(parser, sqrt_divisor=4, batch_size=64, epochs=400, blr=1.5e-4, min_lr=0.0, warmup_epochs=40,
                      weight_decay=0.05)

    parser.add_argument("--model", default="lut_vit_base_patch16", choices=sorted(models_lut.MODELS))
    parser.add_argument("--input_size", default=224, type=int)
    parser.add_argument("--patch_size", default=16, type=int)
    parser.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed per view")
    parser.add_argument("--norm_pix_loss", action="store_true",
                        help="reconstruct per-patch normalised pixels (on by default, as in both recipes)")
    parser.add_argument("--no_norm_pix_loss", action="store_false", dest="norm_pix_loss")
    parser.set_defaults(norm_pix_loss=True)

    lut = parser.add_argument_group("LUT")
    lut.add_argument("--w_mae", default=1.0, type=float, help="weight of the reconstruction loss")
    lut.add_argument("--w_bc", default=0.25, type=float, help="weight of the broader-context loss")
    lut.add_argument("--model_ema_decay", default=0.996, type=float, help="teacher momentum at step 0 (-> 1)")
    lut.add_argument("--depth_head", default=2, type=int, help="projector layers (0 = identity)")
    lut.add_argument("--depth_pred", default=2, type=int, help="predictor layers (0 = identity)")
    lut.add_argument("--head_mlp_dim", default=4096, type=int)
    lut.add_argument("--head_norm_layer", default="BN", choices=["BN", "LN", "none"])
    lut.add_argument("--head_act_layer", default="ReLU", choices=["ReLU", "GELU"])

    add_source_args(parser, labelled=False)
    parser.add_argument("--fast_decode", action="store_true",
                        help="LUT: decode JPEGs at 1/2, 1/4 or 1/8 scale while the shorter side stays >= input_size "
                             "(faster loading; pixels differ slightly from a full decode)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step")
    parser.add_argument("--knn_freq", default=0, type=int,
                        help="every N epochs and after the last, the student's k-NN accuracy on data_path's val split "
                             "with its train split as memory bank (both labelled); 0 = off")
    parser.add_argument("--stop_at_step", default=None, type=int,
                        help="save and exit once this many optimizer steps are done (the schedule still spans "
                             "--epochs); a later run resumes")
    add_run_args(parser)
    return parser


def check_args(args):
    """Pre-training's own checks, before anything expensive is built; returns the images (util.sources)."""
    method = models_lut.model_class(args.model)
    if args.input_size % args.patch_size:
        raise SystemExit(f"--input_size {args.input_size} is not a multiple of --patch_size {args.patch_size}")
    try:
        models_lut.check_mask_ratio(args.mask_ratio, (args.input_size // args.patch_size) ** 2, method.num_views)
    except ValueError as e:
        raise SystemExit(f"--{e} ({args.input_size} px, patch {args.patch_size})") from None
    if args.fast_decode and method.num_views == 1:
        raise SystemExit("--fast_decode is for LUT's views (resized to the input size); MAE's random-resized crops "
                         "enlarge small regions and need the full-resolution image")
    if method.needs_teacher and args.head_norm_layer == "BN" and args.batch_size * args.world_size < 2:
        raise SystemExit("LUT's BatchNorm heads normalise each view over the images of all ranks: --batch_size must "
                         "be at least 2 on a single process (or use --head_norm_layer LN)")
    if args.knn_freq < 0:
        raise SystemExit(f"--knn_freq must not be negative (0 = off), got {args.knn_freq}")
    if args.lr_scale is None:
        args.lr_scale = "sqrt" if method.needs_teacher else "linear"  # each method's published rule
    try:
        images = open_images(args.data_path, labelled=False, image_column=args.image_column)
        check_images(images)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--data_path: {e}")
    return images


def build_model(args):
    kwargs = dict(img_size=args.input_size, patch_size=args.patch_size, norm_pix_loss=args.norm_pix_loss)
    if models_lut.model_class(args.model).needs_teacher:
        kwargs.update(depth_head=args.depth_head, depth_pred=args.depth_pred, head_mlp_dim=args.head_mlp_dim,
                      head_norm_layer=args.head_norm_layer, head_act_layer=args.head_act_layer, w_mae=args.w_mae,
                      w_bc=args.w_bc)
    return models_lut.MODELS[args.model](**kwargs)


def compile_step(accum_iter):
    """torch.compile(pretrain_step) and a function returning the line that reports dynamo's graphs. Those compiled
    after this process's first optimizer step (whose accum_iter calls saw both DDP variants, no_sync and sync) count
    as recompilations: each stalls all ranks, mostly from a guard on something that changes from step to step."""
    from torch._dynamo.utils import counters
    compiled, calls, warm = torch.compile(pretrain_step), itertools.count(), []

    def step_fn(*inputs):
        if next(calls) == accum_iter:
            warm.append(counters["stats"]["unique_graphs"])
        return compiled(*inputs)

    def report():
        graphs = counters["stats"]["unique_graphs"]
        return f"compile: {graphs} graphs, {graphs - warm[0] if warm else 0} recompilations after the first step"
    return step_fn, report


def main(args):
    """Run (or resume) the pre-training described by `args`; returns the trained (student, teacher or None), or
    (None, None) when output_dir holds the run finished."""
    device = start_run(args)
    images = check_args(args)
    if not take_output_dir(args):
        return None, None
    knn = None
    if args.knn_freq:
        try:
            knn = KNNEvaluator(args.data_path, args.input_size, args.batch_size, args.num_workers,
                               columns=dict(image_column=args.image_column, label_column=args.label_column))
        except ValueError as e:
            raise SystemExit(f"--knn_freq: {e}")

    transform = LUTTwoViews(args.input_size) if models_lut.model_class(args.model).num_views == 2 else \
        mae_transform(args.input_size)
    dataset = PretrainDataset(images, transform, draft_size=args.input_size if args.fast_decode else None)
    sampler = ResumableDistributedSampler(len(dataset), args.world_size, args.rank, shuffle=True, seed=args.seed)
    args.steps_per_epoch = len(sampler) // args.batch_size // args.accum_iter
    if args.steps_per_epoch == 0:
        raise SystemExit(f"{len(dataset)} images are fewer than one optimizer step "
                         f"({args.batch_size} x {args.accum_iter} x {args.world_size} ranks)")
    args.total_steps = args.steps_per_epoch * args.epochs
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
        pin_memory=args.pin_mem and device.type == "cuda", drop_last=True, persistent_workers=args.num_workers > 0)
    print(f"{len(dataset)} images in {args.data_path}; {args.steps_per_epoch} optimizer steps per epoch")

    seed_everything(args.seed)  # the same initial weights on every rank
    student = build_model(args).to(device)
    teacher = build_teacher(student)
    if args.distributed:
        student = convert_sync_batchnorm(student)  # per-view BN statistics over all ranks
    model = wrap_ddp(TrainingForward(student), args, device)
    print(f"student: {sum(p.numel() for p in student.parameters() if p.requires_grad) / 1e6:.2f}M trainable "
          f"parameters" + (", with an EMA teacher" if teacher is not None else ""))

    set_lr(args)
    optimizer = build_optimizer(student, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    ckpt_path = find_resume_checkpoint(args.output_dir, args.resume, args.auto_resume)
    start_epoch, start_step, totals, ckpt = load_training_state(ckpt_path, args, student, optimizer, scaler, teacher)

    log_writer = create_tb_writer(args.log_dir or args.output_dir)
    replay_killed_epoch(args, ckpt_path, ckpt, log_writer)
    preemption = PreemptionHandler(check_every=args.print_freq)

    def should_stop(global_step):
        # requested() first: it is a collective every few steps, so every rank must call it at every step.
        return preemption.requested(global_step) or (args.stop_at_step is not None
                                                     and global_step >= args.stop_at_step)

    step_fn, compile_report = compile_step(args.accum_iter) if args.compile else (pretrain_step, None)
    print(f"Start training for {args.epochs} epochs from epoch {start_epoch}, step {start_step}")
    start_time, stopped = time.time(), False
    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.time()
        stats, done, totals = train_one_epoch(model, teacher, loader, optimizer, scaler, device, epoch, args,
                                              start_step, totals, log_writer, should_stop, step_fn)
        if knn is not None and done == args.steps_per_epoch and ((epoch + 1) % args.knn_freq == 0
                                                                 or epoch + 1 == args.epochs):
            stats.update(knn(student, device, args.amp))
        save_epoch(args, student, optimizer, scaler, epoch, done, totals, log_writer, stats, teacher=teacher)
        if done == args.steps_per_epoch:
            remaining = (time.time() - epoch_start) * (args.epochs - epoch - 1)
            print(f"Epoch {epoch} done; about {datetime.timedelta(seconds=int(remaining))} left")
        if compile_report:
            print(compile_report())
        stopped = should_stop(epoch * args.steps_per_epoch + done) and epoch * args.steps_per_epoch + done < \
            args.total_steps  # a signal at the last step has nothing left to resume
        if stopped:
            print(f"Stopped at epoch {epoch}, step {done}/{args.steps_per_epoch}; "
                  f"{last_checkpoint(args.output_dir)} resumes here")
            break
        start_step, totals = 0, None
    end_run(log_writer, start_time, preemption, stopped)
    return student, teacher


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[get_args_parser()])
    main(parser.parse_args())
