"""The checkpoint format (docs/method.md, "Checkpoints"): what a run folder's checkpoints hold and are called,
crash-safe writes, in the background during training, weights_only reading, resuming, and the outputs of a finished
epoch. Every script and tool reads checkpoints through this module."""
import argparse
import concurrent.futures
import contextlib
import copy
import glob
import itertools
import json
import os
import pickle
import re
import shutil

import torch

from util.dist import all_gather_object, barrier, is_main_process
from util.rng import rng_state, seed_everything, set_rng_state

LAST, PREVIOUS = "checkpoint-last.pth", "checkpoint-previous.pth"
# Prefixes that wrappers put in front of parameter names: DDP ('module.'), the LUT authors' EMA teacher ('ema.'),
# MoCo v3 ('base_encoder.') and DINO / iBOT ('backbone.').
_WRAPPER_PREFIXES = ("module.", "ema.", "base_encoder.", "backbone.")


def last_checkpoint(output_dir):
    """The run folder's newest training state, which a restart resumes from."""
    return os.path.join(output_dir, LAST)


def write_atomically(path, write):
    """write(file) into path.tmp, then rename it to `path`, which so holds its old or new content whenever the
    process dies. A failed write (full disk, quota) removes path.tmp and stops the run in one line.

    write may also be a pair (source, write): `path` becomes a hard link to the finished file `source` (the same
    content, nothing copied), or where the file system refuses hard links, write(file) writes it."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        source, write = write if isinstance(write, tuple) else (None, write)
        if source is None or not _hard_link(source, tmp):
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = f"{e.strerror} (errno {e.errno})" if getattr(e, "errno", None) else str(e)
        raise SystemExit(f"could not write {path}: {cause}; the previous file there is untouched") from None
    # The rename itself is only durable once the directory entry is on disk.
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _hard_link(source, link):
    """Make `link` a second name of `source`; False where the file system refuses (FAT, some FUSE mounts). The
    caller then writes or renames instead, where any other failure (full disk, permissions) recurs."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(link)  # a killed run's leftover is a hard link to a checkpoint, which writing into would change
    try:
        os.link(source, link)
    except OSError:
        return False
    return True


# One writer thread, so background writes reach the disk in the order they were asked for. Its thread is joined at
# interpreter exit, so a run that dies of an exception still finishes the write in flight.
_writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
_pending = None  # the Future of the last write handed to _writer, until wait_for_saves collects it


def save_in_background(state, path, then=None, previous=None):
    """torch.save(state) into `path` (write_atomically) in the writer thread, followed there by then(the saved copy);
    returns once `state` is copied, while training goes on. previous: the file `path` replaces keeps this second name
    (a hard link, or a rename where there are none: nothing is written). The previous background save is waited for
    first (one copy in memory at a time), and its failure raised here."""
    global _pending
    wait_for_saves()
    saved = snapshot(state)

    def write():
        if previous is not None and os.path.exists(path) and not _hard_link(path, previous):
            os.replace(path, previous)
        write_atomically(path, lambda f: torch.save(saved, f))
        if then is not None:
            then(saved)
    _pending = _writer.submit(write)


def wait_for_saves():
    """Return once this process's background saves are on disk. A failed one stops the run (SystemExit naming the
    file) in the training thread at the first of: the next save, this call (load_checkpoint, load_training_state,
    end_run make it)."""
    global _pending
    pending, _pending = _pending, None
    try:
        if pending is not None:
            pending.result()
    except OSError as e:  # keeping the replaced checkpoint-last.pth failed (write_atomically's own are SystemExit)
        raise SystemExit(f"could not save a checkpoint: {e}") from None


def snapshot(value):
    """A copy of a checkpoint's state that training cannot change, tensors copied to CPU memory: a state_dict()'s
    tensors are the parameters themselves, and optimizer.state_dict()'s the moments, which every step changes."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        copied = copy.copy(value)  # the same type and attributes (a state_dict's _metadata: module versions)
        copied.update((k, snapshot(v)) for k, v in value.items())
        return copied
    if type(value) in (list, tuple):
        return type(value)(snapshot(v) for v in value)
    return copy.deepcopy(value)


class UnreadableCheckpoint(SystemExit):
    """A truncated or corrupt checkpoint: a one-line stop, unless a restart continues past it (read_run_checkpoint)."""


def load_checkpoint(path, map_location="cpu", mmap=False):
    """torch.load(path, weights_only=True), argparse.Namespace allowed (the authors' args); anything else that needs
    unsafe unpickling is refused (pickle.UnpicklingError), a damaged file is an UnreadableCheckpoint naming it, a file
    this user may not read a one-line stop. mmap: map the file (to read a few entries of a large checkpoint)."""
    wait_for_saves()  # `path` may be this process's own checkpoint, still being written
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (FileNotFoundError, MemoryError):
        raise
    except PermissionError as e:  # not damage: the file is fine
        raise SystemExit(f"checkpoint {path} cannot be read: {e.strerror} (errno {e.errno})") from None
    except Exception as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found and isinstance(e, pickle.UnpicklingError):
            raise pickle.UnpicklingError(
                f"checkpoint {path} needs unsafe unpickling (it references {found.group(1)}), which could run "
                "arbitrary code, so it is refused. Only tensors, plain Python values and argparse.Namespace are "
                "accepted; re-save the weights from a trusted environment as a dict of tensors.") from None
        cause = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UnreadableCheckpoint(f"checkpoint {path} cannot be read, it is truncated or corrupt "
                                   f"({type(e).__name__}: {cause.strip()})") from None


def find_resume_checkpoint(output_dir, resume, auto_resume):
    """The run's checkpoint-last.pth (checkpoint-previous.pth if a kill came before it was written anew) once it wrote
    one and auto_resume is on: a requeued job continues where it stopped, not from --resume; else `resume` or None."""
    own = [p for p in (last_checkpoint(output_dir), os.path.join(output_dir, PREVIOUS)) if os.path.isfile(p)]
    if auto_resume and own:
        if resume and os.path.realpath(resume) != os.path.realpath(own[0]):
            print(f"{own[0]} exists: this run continues from it, not from --resume {resume}")
        return own[0]
    return resume or None


def save_epoch(args, model, optimizer, scaler, epoch, epoch_step, totals, log_writer, train_stats, test_stats=None,
               teacher=None, best=None):
    """Save the training state after (part of) `epoch` as checkpoint-last.pth; every rank calls it, rank 0 writes in
    the background. model: unwrapped; epoch_step: optimizer steps of `epoch` done; totals: the logger totals, kept
    mid-epoch so the resumed epoch's means cover all of it; teacher: LUT's; best: fine-tuning's dict(max_accuracy,
    best_epoch). An epoch's end also stores its log record, from which finish_epoch writes the other outputs."""
    rng = all_gather_object(rng_state())  # every rank's own random streams (augmentations, drop path, ...)
    if not is_main_process():
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "epoch": epoch, "epoch_step": epoch_step, "global_step": epoch * args.steps_per_epoch + epoch_step,
             "rng": rng, "args": vars(args)}
    if teacher is not None:
        state["model_ema"] = teacher.state_dict()
    if best is not None:
        state.update(max_accuracy=best["max_accuracy"], best_epoch=best["best_epoch"])
    path, then = last_checkpoint(args.output_dir), None
    if epoch_step < args.steps_per_epoch:
        state["epoch_totals"] = totals
    else:
        state["log_record"] = {**{f"train_{k}": v for k, v in train_stats.items()},
                               **{f"test_{k}": v for k, v in (test_stats or {}).items()}, "epoch": epoch,
                               "n_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        then = lambda saved: finish_epoch(args, saved, path, log_writer)  # noqa: E731
    save_in_background(state, path, then, os.path.join(args.output_dir, PREVIOUS))


def finish_epoch(args, state, source, log_writer, replay=False):
    """A finished epoch's outputs after its checkpoint `source` (with content `state`), in this order:
    checkpoint-<epoch>.pth (every --save_freq epochs and the last) and checkpoint-best.pth, hard links to `source`
    (else written from `state`); TensorBoard scalars; the log.txt line state["log_record"]. Rank 0 runs it in the
    writer thread, or at a restart with replay: files older than `source` are redone. The scalars and log line are
    written unless log.txt has the epoch (a kill right before the line can log scalars twice; a run continued past a
    damaged checkpoint may train a logged epoch again)."""
    record, epoch = state["log_record"], state["log_record"]["epoch"]
    names = ["checkpoint-best.pth"] if state.get("best_epoch") == epoch else []
    if (epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs:
        names.append(f"checkpoint-{epoch}.pth")
    for path in (os.path.join(args.output_dir, name) for name in names):
        if not (replay and os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(source)):
            write_atomically(path, (source, lambda f: torch.save(state, f)))
    log_path = os.path.join(args.output_dir, "log.txt")
    lines = []
    with contextlib.suppress(FileNotFoundError), open(log_path) as f:
        lines = f.read().splitlines()
    if epoch not in [json.loads(line).get("epoch") for line in lines]:
        # SummaryWriter takes scalars from any thread (a locked queue); the training thread's step scalars go on.
        if log_writer is not None:  # MAE's tags for the evaluation (perf/test_acc1, ...)
            for name, value in record.items():
                log_writer.add_scalar(f"perf/{name}" if name.startswith("test_") else f"epoch/{name}", value, epoch)
            log_writer.flush()
        text = "".join(line + "\n" for line in lines + [json.dumps(record)])
        write_atomically(log_path, lambda f: f.write(text.encode()))


def replay_killed_epoch(args, path, ckpt, log_writer):
    """At a restart from the run's own checkpoint `path`: complete its epoch's outputs, which a kill may have cut."""
    if own_checkpoint(path, args.output_dir) and ckpt.get("log_record") and is_main_process():
        finish_epoch(args, ckpt, path, log_writer, replay=True)


def own_checkpoint(path, output_dir):
    """Whether `path` is the run folder's checkpoint-last.pth or checkpoint-previous.pth (not a --resume file)."""
    names = {os.path.realpath(os.path.join(output_dir, name)) for name in (LAST, PREVIOUS)} if output_dir else ()
    return bool(path) and os.path.realpath(path) in names


def read_run_checkpoint(path, output_dir):
    """load_checkpoint(path), but a damaged checkpoint-last.pth or checkpoint-previous.pth of the run folder
    `output_dir` is continued past, so that it does not stop every requeue: the run's newest readable checkpoint
    takes its place (a warning names both, the damaged file stays as <path>.damaged). Every rank calls it."""
    try:
        ckpt, damage = load_checkpoint(path), None
    except (UnreadableCheckpoint, pickle.UnpicklingError) as e:
        ckpt, damage = None, str(e)
    damage = next((d for d in all_gather_object(damage) if d is not None), None)  # the ranks decide together
    if damage is None:
        return ckpt
    if not own_checkpoint(path, output_dir):
        raise UnreadableCheckpoint(damage)  # a --resume file: the user's to fix
    others = [p for p in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")) if not os.path.samefile(p, path)]
    for other in sorted(others, key=os.path.getmtime, reverse=True):
        with contextlib.suppress(UnreadableCheckpoint, pickle.UnpicklingError):
            ckpt = load_checkpoint(other)
            print(f"WARNING: {damage}; continuing from the newest readable checkpoint of the run, {other}")
            barrier()  # every rank has read it before rank 0 replaces the damaged file
            if is_main_process():
                names = (f"{path}.damaged" + (f".{i}" if i else "") for i in itertools.count())
                kept = next(name for name in names if not os.path.exists(name))  # earlier copies are kept
                if not _hard_link(path, kept):
                    shutil.copyfile(path, kept)
                write_atomically(path, (other, lambda f: torch.save(ckpt, f)))
            return ckpt
    raise UnreadableCheckpoint(f"{damage}, and {output_dir} holds no other readable checkpoint: restore it, or move "
                               f"it away to start this run afresh")


def load_training_state(path, args, model, optimizer, scaler, teacher=None):
    """Resume weights (and the teacher's), optimizer, scaler and RNG state from a checkpoint of the same script;
    every rank calls it. Returns (start_epoch, start_step, logger totals, checkpoint): a mid-epoch checkpoint resumes
    at its step, an end-of-epoch one at the next epoch; path None starts afresh."""
    wait_for_saves()
    barrier()  # rank 0's background save of `path` is on disk before any rank reads it
    if path is None:
        return 0, 0, None, {}
    ckpt = read_run_checkpoint(path, getattr(args, "output_dir", None))
    saved = saved_args(ckpt)
    if saved.get("model", args.model) != args.model:
        raise SystemExit(f"{path} was trained as {saved['model']}, not --model {args.model}; "
                         f"use another --output_dir or --no_auto_resume")
    try:
        model.load_state_dict(ckpt["model"])
        if teacher is not None:  # the LUT authors' teacher keys carry an 'ema.' prefix
            teacher.load_state_dict(normalize_pretrained(ckpt, "model_ema"))
    except RuntimeError as e:  # another image or patch size, another width: a size mismatch
        sizes = {k: saved.get(k) for k in ("input_size", "patch_size")}
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise SystemExit(f"{path} (trained with {sizes}) does not fit this run's model (input_size "
                         f"{args.input_size}, patch_size {args.patch_size}): {detail}; use its sizes, another "
                         f"--output_dir or --no_auto_resume") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    rng = [ckpt["rng"]] if isinstance(ckpt.get("rng"), dict) else ckpt.get("rng")  # a dict: one process's state
    if rng and len(rng) == args.world_size:
        set_rng_state(rng[args.rank])  # each rank continues its own random streams
    else:  # saved by another number of ranks: fresh streams, still one per rank
        seed_everything(args.seed + 1000 * (ckpt["epoch"] + 1) + args.rank)
    epoch, done = ckpt["epoch"], ckpt.get("epoch_step", args.steps_per_epoch)
    if done >= args.steps_per_epoch:
        print(f"Resumed from {path}: epoch {epoch} complete")
        return epoch + 1, 0, None, ckpt
    eff = args.batch_size * args.accum_iter * args.world_size
    saved_eff = saved.get("batch_size", 0) * saved.get("accum_iter", 0) * saved.get("world_size", 0)
    if saved_eff != eff:
        raise SystemExit(f"{path} stopped mid-epoch with effective batch {saved_eff}; resuming it needs the same "
                         f"batch size x accum_iter x world size (now {eff})")
    print(f"Resumed from {path}: epoch {epoch}, step {done}/{args.steps_per_epoch}")
    return epoch, done, ckpt.get("epoch_totals"), ckpt


def saved_args(ckpt):
    """The training arguments a checkpoint stores, as a dict (ours: a dict, the authors': a Namespace, MAE's: none)."""
    args = ckpt.get("args") or {}
    return vars(args) if isinstance(args, argparse.Namespace) else dict(args)


def normalize_pretrained(ckpt, key="model"):
    """State dict `ckpt[key]` without wrapper prefixes: ours, the LUT authors', MAE's, MoCo v3's ('state_dict'),
    DINO's ('teacher'), ..."""
    if not isinstance(ckpt.get(key), dict):
        raise KeyError(f"no weights under {key!r} (it has {sorted(k for k, v in ckpt.items() if isinstance(v, dict))})")
    state = {}
    for name, value in ckpt[key].items():
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        state[name] = value
    return state
