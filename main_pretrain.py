"""Pre-train LUT or MAE on an image folder, on one CPU/GPU or with torchrun / srun across nodes.

    torchrun --nproc_per_node=8 main_pretrain.py --model lut_vit_base_patch16 --data_path /imagenet \
        --batch_size 128 --accum_iter 4 --epochs 1600 --output_dir out/lut_b

See PRETRAIN.md for the recipes.
"""
import argparse
import copy
import datetime
import json
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel

import models_lut
from engine_pretrain import build_optimizer, pretrain_step, train_one_epoch
from util.augment import LUTTwoViews, mae_transform
from util.batchnorm import convert_sync_batchnorm
from util.checkpoint import find_resume_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from util.datasets import PretrainDataset, ResumableDistributedSampler, check_images, find_images
from util.dist import barrier, destroy_distributed, init_distributed, is_main_process, local_device
from util.knn import KNNEvaluator
from util.logging import append_json_log, create_tb_writer
from util.preemption import PreemptionHandler
from util.lr_sched import effective_lr


def get_args_parser():
    parser = argparse.ArgumentParser("LUT / MAE pre-training", add_help=False)
    parser.add_argument("--batch_size", default=64, type=int,
                        help="images per GPU (effective batch = batch_size * accum_iter * world size)")
    parser.add_argument("--epochs", default=400, type=int)
    parser.add_argument("--accum_iter", default=1, type=int, help="micro-batches per optimizer step")

    # Model
    parser.add_argument("--model", default="lut_vit_base_patch16", choices=sorted(models_lut.MODELS))
    parser.add_argument("--input_size", default=224, type=int)
    parser.add_argument("--patch_size", default=16, type=int)
    parser.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed per view")
    parser.add_argument("--norm_pix_loss", action="store_true",
                        help="reconstruct per-patch normalised pixels (on by default, as in both recipes)")
    parser.add_argument("--no_norm_pix_loss", action="store_false", dest="norm_pix_loss")
    parser.set_defaults(norm_pix_loss=True)

    # LUT
    parser.add_argument("--w_mae", default=1.0, type=float, help="weight of the reconstruction loss")
    parser.add_argument("--w_bc", default=0.25, type=float, help="weight of the broader-context loss")
    parser.add_argument("--model_ema_decay", default=0.996, type=float, help="teacher momentum at step 0 (-> 1)")
    parser.add_argument("--depth_head", default=2, type=int, help="projector layers (0 = identity)")
    parser.add_argument("--depth_pred", default=2, type=int, help="predictor layers (0 = identity)")
    parser.add_argument("--head_mlp_dim", default=4096, type=int)
    parser.add_argument("--head_norm_layer", default="BN", choices=["BN", "LN", "none"])
    parser.add_argument("--head_act_layer", default="ReLU", choices=["ReLU", "GELU"])

    # Optimizer and schedule
    parser.add_argument("--weight_decay", default=0.05, type=float)
    parser.add_argument("--lr", default=None, type=float, help="absolute lr (overrides --blr)")
    parser.add_argument("--blr", default=1.5e-4, type=float, help="base lr, scaled by the effective batch")
    parser.add_argument("--lr_scale", default=None, choices=["sqrt", "linear"],
                        help="sqrt: blr * sqrt(eff) / 4 (LUT default); linear: blr * eff / 256 (MAE default)")
    parser.add_argument("--min_lr", default=0.0, type=float)
    parser.add_argument("--warmup_epochs", default=40, type=int)

    # Data, devices, logging, checkpoints
    parser.add_argument("--data_path", required=True, help="ImageNet-style root (train/<class>/*) or image folder")
    parser.add_argument("--output_dir", default="./output_dir")
    parser.add_argument("--log_dir", default=None, help="TensorBoard folder (default: output_dir)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                        help="autocast precision (default bf16 on CUDA, none on CPU); fp16 uses a grad scaler")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--resume", default="", help="checkpoint to resume from")
    parser.add_argument("--no_auto_resume", action="store_false", dest="auto_resume",
                        help="do not resume from output_dir/checkpoint-last.pth when it exists")
    parser.add_argument("--save_freq", default=20, type=int, help="also keep checkpoint-<epoch>.pth every N epochs")
    parser.add_argument("--stop_at_step", default=None, type=int,
                        help="save and exit once this many optimizer steps are done (the schedule still spans "
                             "--epochs); a later run resumes")
    parser.add_argument("--print_freq", default=20, type=int)
    parser.add_argument("--knn_freq", default=0, type=int,
                        help="every N epochs and after the last, the student's k-NN accuracy on data_path/val with "
                             "data_path/train as memory bank (both labelled ImageFolders); 0 = off")
    parser.add_argument("--num_workers", default=10, type=int)
    parser.add_argument("--pin_mem", action="store_true", help="pin CPU memory for faster host-to-GPU copies")
    parser.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)
    parser.add_argument("--fast_decode", action="store_true",
                        help="LUT: decode JPEGs at 1/2, 1/4 or 1/8 scale while the shorter side stays >= input_size "
                             "(faster loading; pixels differ slightly from a full decode, see docs/performance.md)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step")
    return parser


def check_args(args):
    """Validate flags and data before anything expensive is built; returns the image paths."""
    is_lut = args.model.startswith("lut")
    if args.input_size % args.patch_size:
        raise SystemExit(f"--input_size {args.input_size} is not a multiple of --patch_size {args.patch_size}")
    if not 0 < args.mask_ratio < 1:
        raise SystemExit(f"--mask_ratio must be in (0, 1), got {args.mask_ratio}")
    if args.fast_decode and not is_lut:
        raise SystemExit("--fast_decode is for LUT's views (resized to the input size); MAE's random-resized crops "
                         "enlarge small regions and need the full-resolution image")
    if is_lut and args.mask_ratio < 0.5:
        raise SystemExit(f"LUT needs --mask_ratio >= 0.5 (the two views' visible patches are disjoint), "
                         f"got {args.mask_ratio}")
    if args.batch_size < 1 or args.accum_iter < 1 or args.epochs < 1:
        raise SystemExit("--batch_size, --accum_iter and --epochs must be positive")
    if is_lut and args.head_norm_layer == "BN" and args.batch_size * args.world_size < 2:
        raise SystemExit("LUT's BatchNorm heads normalise each view over the images of all ranks: --batch_size must "
                         "be at least 2 on a single process (or use --head_norm_layer LN)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but CUDA is not available (use --device cpu)")
    if args.amp is None:
        args.amp = "bf16" if args.device.startswith("cuda") else "none"
    if args.amp == "fp16" and not args.device.startswith("cuda"):
        raise SystemExit("--amp fp16 needs CUDA; use --amp bf16 or none on CPU")
    if args.lr_scale is None:
        args.lr_scale = "sqrt" if is_lut else "linear"
    try:
        paths = find_images(args.data_path)
        check_images(paths)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--data_path: {e}")
    return paths


def build_model(args):
    kwargs = dict(img_size=args.input_size, patch_size=args.patch_size, norm_pix_loss=args.norm_pix_loss)
    if args.model.startswith("lut"):
        kwargs.update(depth_head=args.depth_head, depth_pred=args.depth_pred, head_mlp_dim=args.head_mlp_dim,
                      head_norm_layer=args.head_norm_layer, head_act_layer=args.head_act_layer)
    return models_lut.MODELS[args.model](**kwargs)


def resume(path, args, student, teacher, optimizer, scaler):
    """Load a training checkpoint; returns (start_epoch, start_step, epoch totals) — a mid-epoch checkpoint resumes
    mid-epoch, with the logger totals of the epoch's first part (None otherwise)."""
    ckpt = load_checkpoint(path)
    saved = ckpt.get("args", {})
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved
    if saved.get("model", args.model) != args.model:
        raise SystemExit(f"{path} was trained as {saved['model']}, not --model {args.model}; "
                         f"use another --output_dir or --no_auto_resume")
    student.load_state_dict(ckpt["model"])
    if teacher is not None:
        teacher.load_state_dict(ckpt["model_ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    epoch, done = ckpt["epoch"], ckpt.get("epoch_step", args.steps_per_epoch)
    if done < args.steps_per_epoch:
        eff = args.batch_size * args.accum_iter * args.world_size
        saved_eff = saved.get("batch_size", 0) * saved.get("accum_iter", 0) * saved.get("world_size", 0)
        if saved_eff != eff:
            raise SystemExit(f"{path} stopped mid-epoch with effective batch {saved_eff}; resuming it needs the "
                             f"same batch size x accum_iter x world size (now {eff})")
        print(f"Resumed from {path}: epoch {epoch}, step {done}/{args.steps_per_epoch}")
        return epoch, done, ckpt.get("epoch_totals")
    print(f"Resumed from {path}: epoch {epoch} complete")
    return epoch + 1, 0, None


def main(args):
    """Run (or resume) the pre-training described by `args`; returns the trained (student, teacher or None)."""
    init_distributed(args)
    paths = check_args(args)
    device = local_device(args)
    knn = None
    if args.knn_freq:
        try:
            knn = KNNEvaluator(args.data_path, args.input_size, args.batch_size, args.num_workers)
        except ValueError as e:
            raise SystemExit(f"--knn_freq: {e}")
    is_lut = args.model.startswith("lut")
    print(f"job dir: {os.path.dirname(os.path.realpath(__file__))}")
    print(json.dumps(vars(args), indent=1, default=str))

    transform = LUTTwoViews(args.input_size) if is_lut else mae_transform(args.input_size)
    dataset = PretrainDataset(paths, transform, draft_size=args.input_size if args.fast_decode else None)
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

    torch.manual_seed(args.seed)
    student = build_model(args)
    teacher = None
    if is_lut:
        teacher = copy.deepcopy(student).eval().requires_grad_(False).to(device)
    student.to(device)
    model = student
    if args.distributed:
        model = convert_sync_batchnorm(student, device)  # per-view BN statistics over all ranks
        student = model
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    print(f"student: {sum(p.numel() for p in student.parameters() if p.requires_grad) / 1e6:.2f}M trainable "
          f"parameters" + (", with an EMA teacher" if is_lut else ""))

    eff_batch = args.batch_size * args.accum_iter * args.world_size
    args.lr = effective_lr(args, eff_batch, divisor=4)
    rule = {"sqrt": "blr * sqrt(eff) / 4", "linear": "blr * eff / 256"}[args.lr_scale]
    print(f"effective batch {eff_batch} = {args.batch_size} x {args.accum_iter} accum x {args.world_size} ranks; "
          f"lr {args.lr:.3e} ({rule} with blr {args.blr:.3e}, unless --lr was given)")

    optimizer = build_optimizer(student, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    start_epoch, start_step, totals = 0, 0, None
    ckpt_path = find_resume_checkpoint(args.output_dir, args.resume, args.auto_resume)
    if ckpt_path:
        start_epoch, start_step, totals = resume(ckpt_path, args, student, teacher, optimizer, scaler)

    if is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
    log_writer = create_tb_writer(args.log_dir or args.output_dir)

    def save(name, epoch, epoch_step, totals=None):
        if is_main_process():
            state = {
                "model": student.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "epoch_step": epoch_step, "global_step": epoch * args.steps_per_epoch + epoch_step,
                "rng": rng_state(), "args": vars(args),
            }
            if epoch_step < args.steps_per_epoch:  # mid-epoch: the resumed run's epoch means cover the whole epoch
                state["epoch_totals"] = totals
            if is_lut:
                state["model_ema"] = teacher.state_dict()
            save_checkpoint(state, os.path.join(args.output_dir, name))
        barrier()

    preemption = PreemptionHandler(check_every=args.print_freq)

    def should_stop(global_step):
        # requested() first: it is a collective every few steps, so every rank must call it at every step.
        return preemption.requested(global_step) or (args.stop_at_step is not None
                                                     and global_step >= args.stop_at_step)

    step_fn = torch.compile(pretrain_step) if args.compile else pretrain_step
    print(f"Start training for {args.epochs} epochs from epoch {start_epoch}, step {start_step}")
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch, start_iter=start_step * args.accum_iter, batch_size=args.batch_size)
        epoch_start = time.time()
        stats, done, totals = train_one_epoch(model, teacher, loader, optimizer, scaler, device, epoch, args,
                                              start_step=start_step, log_writer=log_writer, should_stop=should_stop,
                                              step_fn=step_fn, totals=totals)
        save("checkpoint-last.pth", epoch, done, totals)
        if done == args.steps_per_epoch:
            if (epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs:
                save(f"checkpoint-{epoch}.pth", epoch, done)
            if knn is not None and ((epoch + 1) % args.knn_freq == 0 or epoch + 1 == args.epochs):
                stats.update(knn(student, device, args.amp))
            if log_writer is not None:
                for name, value in stats.items():
                    log_writer.add_scalar(f"epoch/{name}", value, epoch)
                log_writer.flush()
            append_json_log(args.output_dir, {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch})
            remaining = (time.time() - epoch_start) * (args.epochs - epoch - 1)
            print(f"Epoch {epoch} done; about {datetime.timedelta(seconds=int(remaining))} left")
        start_step, totals = 0, None
        if should_stop(epoch * args.steps_per_epoch + done):
            print(f"Stopped at epoch {epoch}, step {done}/{args.steps_per_epoch}; "
                  f"{os.path.join(args.output_dir, 'checkpoint-last.pth')} resumes here")
            break

    if log_writer is not None:
        log_writer.close()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    destroy_distributed()
    if preemption.stopping:
        preemption.requeue()
    return student, teacher


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[get_args_parser()])
    main(parser.parse_args())
