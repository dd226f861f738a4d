"""Distributed setup for torchrun, SLURM `srun` (one task per GPU) or a single process, plus small collectives."""
import builtins
import datetime
import os
import socket
import subprocess

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

_builtin_print = builtins.print


def slurm_first_host(nodelist):
    """First host of a SLURM node list such as 'node[03-05]' (the job's rank-0 node)."""
    return subprocess.check_output(["scontrol", "show", "hostnames", nodelist], text=True).split()[0]


def launcher_env(env, first_host=slurm_first_host):
    """Rank layout from the launcher's environment: None for a plain process, else RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT (strings for os.environ). torchrun's variables win (torchrun inside a SLURM allocation);
    SLURM's count only inside a job step (srun sets SLURM_STEP_ID): a batch script itself is one process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        return {"LOCAL_RANK": "0", **{k: env[k] for k in keys if k in env}}
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        return {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env["SLURM_LOCALID"],
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"]),
            # Every task of the job derives the same port; jobs sharing a node rarely collide.
            "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + int(env["SLURM_JOB_ID"]) % 20000),
        }
    return None


def init_distributed(args):
    """Join the launcher's process group (nccl for --device cuda, else gloo; none for one process); sets args.rank,
    args.world_size, args.gpu (the CUDA device index, see cuda_index), args.distributed. A rank waits --dist_timeout
    minutes for the others in any collective. MAE's --local_rank, --world_size (checked) and --dist_url are
    honoured. Only rank 0 prints afterwards."""
    layout = launcher_env(os.environ)
    if layout is None and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        print(f"A SLURM allocation of {os.environ['SLURM_NTASKS']} tasks, but this process was not started by srun: "
              f"running as one process (start one task per GPU with srun, or use torchrun)", flush=True)
    if layout is not None and "LOCAL_RANK" not in os.environ and getattr(args, "local_rank", None) is not None:
        layout["LOCAL_RANK"] = str(args.local_rank)
    world_size = int(layout["WORLD_SIZE"]) if layout else 1
    if getattr(args, "world_size", None) not in (None, world_size):
        raise SystemExit(f"--world_size {args.world_size} but the launcher started {world_size} process(es)")
    local_rank = int(layout["LOCAL_RANK"]) if layout else 0
    cuda = args.device.startswith("cuda")
    args.gpu = cuda_index(local_rank, torch.cuda.device_count()) if cuda else local_rank
    if world_size == 1:
        args.rank, args.world_size, args.distributed = 0, 1, False
        setup_for_distributed(True)
        return
    os.environ.update(layout)
    args.rank, args.world_size, args.distributed = int(layout["RANK"]), world_size, True
    url = getattr(args, "dist_url", "env://")
    where = f"{layout.get('MASTER_ADDR')}:{layout.get('MASTER_PORT')}" if url == "env://" else url
    timeout = datetime.timedelta(minutes=getattr(args, "dist_timeout", 5))
    print(f"| rank {args.rank} of {world_size} ({socket.gethostname()}, local rank {local_rank}"
          f"{f', cuda:{args.gpu}' if cuda else ''}) joining the process group at {where}; waiting up to {timeout} "
          f"for the other ranks", flush=True)
    if cuda:
        torch.cuda.set_device(args.gpu)
    try:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=url, rank=args.rank, world_size=world_size,
                                timeout=timeout, device_id=torch.device("cuda", args.gpu) if cuda else None)
        dist.barrier()
    except dist.DistError as e:
        raise SystemExit(f"rank {args.rank}: not all {world_size} ranks joined at {where} within {timeout} "
                         f"(--dist_timeout): {str(e).splitlines()[0]}") from None
    print(f"| rank {args.rank}: all {world_size} ranks joined ({dist.get_backend()})", flush=True)
    setup_for_distributed(args.rank == 0)


def cuda_index(local_rank, visible):
    """The CUDA device of the process with this local rank, given how many devices it sees: cuda:<local rank> when
    every process sees all GPUs of its node (torchrun, srun with --gpus-per-node), cuda:0 when each sees only its
    own (srun --gpus-per-task=1, or CUDA_VISIBLE_DEVICES set per process)."""
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise SystemExit(f"local rank {local_rank} but this process sees {visible} CUDA devices (CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most {visible} processes per "
                         f"node, or give each process one GPU")
    return local_rank


def launcher_world_size():
    layout = launcher_env(os.environ, first_host=lambda nodelist: "")
    return int(layout["WORLD_SIZE"]) if layout else 1


_patient_group = None  # run_on_rank0_first's gloo group, made at its first use


def destroy_distributed():
    """Leave the process group on every rank: exiting while in one can SIGABRT as gloo's threads are torn down."""
    global _patient_group
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # and run_on_rank0_first's group with it
    _patient_group = None


def local_device(args):
    """The torch.device this process computes on: 'cuda:<args.gpu>' for --device cuda, else args.device."""
    return torch.device("cuda", args.gpu) if args.device.startswith("cuda") else torch.device(args.device)


def cpu_cores_per_rank(environ=os.environ):
    """The CPU cores this process has for itself: those it may run on (its affinity: the job's cgroup, srun's
    binding), shared with the other local ranks under torchrun, at most SLURM's --cpus-per-task in an srun task."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if "LOCAL_WORLD_SIZE" in environ:  # torchrun: its local ranks inherit the same affinity
        return max(1, cores // int(environ["LOCAL_WORLD_SIZE"]))
    if "SLURM_STEP_ID" in environ and "SLURM_CPUS_PER_TASK" in environ:  # without binding, a task sees the node
        return min(cores, int(environ["SLURM_CPUS_PER_TASK"]))
    return cores


def default_num_workers(cores):
    """DataLoader workers for a rank with `cores` cores: all but one for the main process, which queues the GPU's
    work, and one for the pin-memory thread and the rest of the system; at least one."""
    return max(1, cores - 2)


def wrap_ddp(model, args, device):
    """DDP with the gradients as views into its all-reduce buckets (no second copy of them); --ddp_bf16_grads
    all-reduces them in bf16 (half the traffic between nodes, other numerics)."""
    if not args.distributed:
        return model
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  gradient_as_bucket_view=True)
    if getattr(args, "ddp_bf16_grads", False):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
        ddp.register_comm_hook(None, bf16_compress_hook)
    return ddp


def autocast(device, amp):
    """torch.autocast on `device` for --amp 'bf16' / 'fp16'; a disabled one for 'none'."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def setup_for_distributed(is_master):
    """Silence print() on non-master ranks; print(..., force=True) still prints."""
    def print(*a, force=False, **kw):
        if is_master or force:
            _builtin_print(*a, **kw)
    builtins.print = print


def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process():
    return get_rank() == 0


def barrier():
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(x):
    """Sum over ranks of a floating tensor (any shape) or a float, returned as the same kind; x itself on one rank."""
    if get_world_size() == 1:
        return x
    # nccl only reduces CUDA tensors, so CPU values travel through the current GPU.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if not torch.is_tensor(x):
        return all_reduce_sum(torch.tensor(float(x), dtype=torch.float64, device=device)).item()
    t = x.detach().to(device, copy=True)
    dist.all_reduce(t)
    return t.to(x.device)


def all_reduce_mean(x):
    """Mean over ranks, like all_reduce_sum."""
    return x if get_world_size() == 1 else all_reduce_sum(x) / get_world_size()


def run_on_rank0_first(fn):
    """fn() on rank 0, then on the other ranks, which wait for it however long it takes (a gloo group without
    --dist_timeout's limit): rank 0 builds what the others then read, such as a cached data index. An error of rank
    0's is raised on every rank: there as it was, on the others as the same type with its message where it takes one,
    else as a SystemExit with the message."""
    global _patient_group
    if get_world_size() == 1:
        return fn()
    if _patient_group is None:
        _patient_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=30))
    result, error = None, None
    if get_rank() == 0:
        try:
            result = fn()
        except (Exception, SystemExit) as e:
            error = e
    box = [None if error is None else (type(error), str(error.code if isinstance(error, SystemExit) else error))]
    dist.broadcast_object_list(box, src=0, group=_patient_group)
    if error is not None:
        raise error
    if box[0] is not None:
        kind, message = box[0]
        try:
            error = kind(message)
        except Exception:  # a type that needs more than a message (UnicodeDecodeError, ...)
            error = SystemExit(f"{kind.__name__}: {message}")
        raise error
    return result if get_rank() == 0 else fn()


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects); [obj] on one process."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
