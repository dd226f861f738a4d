"""What every entry script shares: the run flags (device, precision, seed, output folders, data-loader workers,
print and save frequencies, resuming), their checks, the start of a run and the outputs of each finished epoch."""
import datetime
import os
import random
import time

import numpy as np
import torch

from util.checkpoint import finish_epoch
from util.dist import destroy_distributed, init_distributed, is_main_process, local_device
from util.logging import create_tb_writer


def add_run_args(parser, training=True):
    """The run flags; `training` adds those of the scripts that train (resume, print and save frequencies)."""
    group = parser.add_argument_group("run")
    group.add_argument("--output_dir", default="./output_dir")
    group.add_argument("--log_dir", default=None, help="TensorBoard folder (default: output_dir)")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                       help="autocast precision (default bf16 on CUDA, none on CPU); fp16 uses a grad scaler")
    group.add_argument("--seed", default=0, type=int)
    group.add_argument("--num_workers", default=10, type=int, help="data-loading processes per GPU")
    group.add_argument("--pin_mem", action="store_true", help="pin CPU memory for faster host-to-GPU copies")
    group.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    group.set_defaults(pin_mem=True)
    if training:
        group.add_argument("--resume", default="", help="checkpoint to resume from")
        group.add_argument("--no_auto_resume", action="store_false", dest="auto_resume",
                           help="do not resume from output_dir/checkpoint-last.pth when it exists")
        group.add_argument("--print_freq", default=20, type=int, help="print progress every N iterations")
        group.add_argument("--save_freq", default=20, type=int,
                           help="also keep checkpoint-<epoch>.pth every N epochs (and after the last)")


def check_run_args(args):
    """Refuse bad run flags with a one-line message before anything is built; fills the --amp default."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but CUDA is not available (use --device cpu)")
    if args.amp is None:
        args.amp = "bf16" if args.device.startswith("cuda") else "none"
    if args.amp == "fp16" and not args.device.startswith("cuda"):
        raise SystemExit("--amp fp16 needs CUDA; use --amp bf16 or none on CPU")
    for name in ("batch_size", "epochs", "accum_iter", "print_freq", "save_freq"):
        if getattr(args, name, 1) < 1:
            raise SystemExit(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("num_workers", "warmup_epochs"):
        if getattr(args, name, 0) < 0:
            raise SystemExit(f"--{name} must not be negative, got {getattr(args, name)}")
    if getattr(args, "resume", "") and not os.path.isfile(args.resume):
        raise SystemExit(f"--resume {args.resume} is not a checkpoint file")


def start_run(args):
    """Check the run flags, join the launcher's process group (args.rank, args.world_size, args.distributed) and
    return the torch.device this process computes on."""
    check_run_args(args)
    init_distributed(args)
    return local_device(args)


def seed_everything(seed):
    """Seed torch, numpy and python's `random` (timm's RandAugment and random erasing draw from the last)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def open_outputs(args, ckpt):
    """Create the output folder and the TensorBoard writer (rank 0; None elsewhere). `ckpt`: the checkpoint the run
    resumes from ({} for none); if it ended an epoch, that epoch's outputs are completed (see finish_epoch)."""
    if is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
    log_writer = create_tb_writer(args.log_dir or args.output_dir)
    if ckpt.get("log_record"):
        finish_epoch(args, ckpt["log_record"], ckpt.get("best_epoch") == ckpt["epoch"], log_writer)
    return log_writer


def end_run(log_writer, start_time, preemption):
    """Close the logs, leave the process group and, after a preemption signal, requeue (see util/preemption)."""
    if log_writer is not None:
        log_writer.close()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    destroy_distributed()
    if preemption.stopping:
        preemption.requeue()
