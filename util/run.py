"""What every entry script shares: the run flags (device, precision, seed, outputs, workers, frequencies, resume),
their checks, taking the output folder, and the start and end of a run."""
import argparse
import datetime
import fcntl
import glob
import json
import os
import socket
import time

import torch

from util.checkpoint import UnreadableCheckpoint, last_checkpoint, load_checkpoint, wait_for_saves
from util.dist import (all_reduce_sum, cpu_cores_per_rank, default_num_workers, destroy_distributed,
                       init_distributed, is_main_process, launcher_world_size, local_device)

_output_lock = None  # the open lock file of this process's output folder, held until the process ends


def add_run_args(parser, training=True):
    """The run flags; `training` adds those of the scripts that train."""
    group = parser.add_argument_group("run")
    group.add_argument("--output_dir", default="./output_dir")
    group.add_argument("--log_dir", default=None, help="TensorBoard folder (default: output_dir)")
    group.add_argument("--device", default=None, help="cuda or cpu (default: cuda where CUDA works, else cpu)")
    group.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                       help="autocast precision (default bf16 on CUDA, none on CPU); fp16 uses a grad scaler")
    group.add_argument("--seed", default=0, type=int)
    group.add_argument("--num_workers", default=None, type=int,
                       help="data-loading processes per GPU (default: this rank's CPU cores minus 2, at least 1)")
    group.add_argument("--pin_mem", action="store_true", help="pin CPU memory for faster host-to-GPU copies")
    group.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    group.set_defaults(pin_mem=True)
    group.add_argument("--dist_timeout", default=5.0, type=float,
                       help="minutes a rank waits for the others (to join, in a collective) before the job fails")
    # MAE's launcher flags (torch.distributed.launch passes --local-rank / --local_rank)
    group.add_argument("--local_rank", "--local-rank", default=None, type=int, help=argparse.SUPPRESS)
    group.add_argument("--world_size", default=None, type=int, help="processes in the job (set by the launcher)")
    group.add_argument("--dist_url", default="env://", help="process-group rendezvous (default: the launcher's)")
    if training:
        group.add_argument("--ddp_bf16_grads", action="store_true",
                           help="all-reduce gradients in bf16: half the traffic between nodes, but other numerics")
        group.add_argument("--resume", default="", help="checkpoint to resume from")
        group.add_argument("--no_auto_resume", action="store_false", dest="auto_resume",
                           help="do not resume from the last checkpoint in output_dir when there is one")
        group.add_argument("--print_freq", default=20, type=int, help="print progress every N iterations")
        group.add_argument("--save_freq", default=20, type=int,
                           help="also keep checkpoint-<epoch>.pth every N epochs (and after the last)")
        group.add_argument("--max_unreadable", default=0.001, type=float,
                           help="fraction of an epoch's images that may be unreadable (each is replaced by the next "
                                "readable one, with a warning) before the run stops")


def check_run_args(args):
    """One-line refusals of bad run flags before anything is built; fills the --device and --amp defaults."""
    if args.device is None:
        if not torch.cuda.is_available() and launcher_world_size() > 1:
            raise SystemExit(f"{launcher_world_size()} processes but CUDA is not usable here (torch "
                             f"{torch.__version__}, CUDA {torch.version.cuda}): fix the driver or the torch install, "
                             f"or pass --device cpu to train on CPU processes")
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but CUDA is not available (use --device cpu)")
    if args.amp is None:
        args.amp = "bf16" if args.device.startswith("cuda") else "none"
    if args.amp == "fp16" and not args.device.startswith("cuda"):
        raise SystemExit("--amp fp16 needs CUDA; use --amp bf16 or none on CPU")
    for name in ("batch_size", "epochs", "accum_iter", "print_freq", "save_freq"):
        if getattr(args, name, 1) < 1:
            raise SystemExit(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("num_workers", "warmup_epochs", "max_unreadable"):
        if (getattr(args, name, 0) or 0) < 0:
            raise SystemExit(f"--{name} must not be negative, got {getattr(args, name)}")
    if getattr(args, "resume", "") and not os.path.isfile(args.resume):
        raise SystemExit(f"--resume {args.resume} is not a checkpoint file")


def start_run(args):
    """Check the run flags, join the launcher's process group, set the workers; returns this process's device."""
    check_run_args(args)
    init_distributed(args)
    set_num_workers(args)
    return local_device(args)


def set_num_workers(args):
    """Fill the --num_workers default from this rank's CPU cores, say both, and warn when the workers and the main
    process outnumber the cores: then they take turns, and the GPU waits for data."""
    cores = cpu_cores_per_rank()
    if args.num_workers is None:
        args.num_workers = default_num_workers(cores)
    print(f"{cores} CPU cores per rank, {args.num_workers} DataLoader workers per rank")
    if args.num_workers + 1 > cores and args.num_workers > default_num_workers(cores):
        print(f"WARNING: --num_workers {args.num_workers} and the main process share {cores} CPU cores: use "
              f"--num_workers {default_num_workers(cores)}, or give each rank more cores (SLURM: --cpus-per-task)")


def take_output_dir(args):
    """False when output_dir holds this run finished, else True once the folder is this run's, after printing, as
    MAE does, the code's folder and every argument; every rank calls it."""
    if run_is_finished(args):
        destroy_distributed()
        return False
    lock_output_dir(args.output_dir)
    print(f"job dir: {os.path.dirname(os.path.dirname(os.path.realpath(__file__)))}")
    print(json.dumps(vars(args), indent=1, default=str))
    return True


def run_is_finished(args):
    """True, after saying so, when all --epochs are trained and the last epoch's outputs written: a re-run of a
    finished job exits without touching anything."""
    last, log = last_checkpoint(args.output_dir), os.path.join(args.output_dir, "log.txt")
    if not (args.auto_resume and os.path.isfile(last) and os.path.isfile(log)):
        return False
    try:
        record = load_checkpoint(last, mmap=True).get("log_record") or {}
    except UnreadableCheckpoint:
        return False  # the restart continues past it (util.checkpoint.read_run_checkpoint)
    if record.get("epoch", -1) + 1 < args.epochs:
        return False
    with open(log) as f:
        if record["epoch"] not in [json.loads(line).get("epoch") for line in f]:
            return False  # killed before the last epoch's outputs were complete: the run completes them
    print(f"{args.output_dir} holds this run, finished: {args.epochs} epochs trained, nothing to do")
    return True


def lock_output_dir(output_dir):
    """Make this run the only writer of `output_dir`, or stop every rank naming the run that holds it. Rank 0's flock
    on output_dir/.lock dies with the process, so a dead run never blocks a restart; its leftover *.tmp go."""
    global _output_lock
    holder = None
    if is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        f = open(os.path.join(output_dir, ".lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
        except OSError as e:  # a file system without locks (Lustre without -o flock, NFS without lockd)
            print(f"WARNING: cannot lock {output_dir} ({e.strerror}): make sure no other run writes there")
        else:
            f.truncate(0)
            f.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
            f.flush()
            _output_lock = f
            for tmp in glob.glob(os.path.join(output_dir, "*.tmp")):
                os.remove(tmp)
    if all_reduce_sum(float(holder is not None)) > 0:  # every rank stops, not only rank 0
        raise SystemExit(f"--output_dir {output_dir} is in use by another run ({holder or 'see rank 0'}): wait for "
                         f"it to end or stop it, or use another --output_dir")


def end_run(log_writer, start_time, preemption, stopped):
    """Wait for the background checkpoint save (raising its failure), close the logs, leave the process group (the
    other ranks wait there for rank 0's save) and, when a preemption signal `stopped` the run before its end,
    requeue; else ignore that signal."""
    wait_for_saves()
    if log_writer is not None:
        log_writer.close()
    print(f"Training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    destroy_distributed()
    if stopped and preemption.stopping:
        preemption.requeue()
    preemption.ignore()
