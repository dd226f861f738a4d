"""Checkpoints: crash-safe saving, safe (weights_only) loading, pre-trained weight extraction, RNG state.

A checkpoint is a dict of tensors and plain Python values (SPEC §6), so torch.load(weights_only=True) reads it.
"""
import argparse
import os
import pickle
import random
import re

import numpy as np
import torch

# Prefixes that wrappers put in front of parameter names: DDP ('module.') and the LUT authors' EMA teacher ('ema.').
_WRAPPER_PREFIXES = ("module.", "ema.")


def save_checkpoint(state, path):
    """torch.save(state, path) atomically: `path` holds either the previous or the new checkpoint, even if the
    process is killed mid-write (the new one is written to `path`.tmp in the same directory, then renamed)."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # The rename itself is only durable once the directory entry is on disk.
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path, map_location="cpu"):
    """torch.load(path, weights_only=True) with argparse.Namespace allowed (the authors' checkpoints store args so).

    Anything else that needs unsafe unpickling is refused with an error naming the file; there is no fallback.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if not (isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e)):
            e.add_note(f"while reading checkpoint {path}")  # truncated or corrupt files: say which one
            raise
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" (it references {found.group(1)})" if found else ""
        raise pickle.UnpicklingError(
            f"checkpoint {path} needs unsafe unpickling{what}, which could run arbitrary code, so it is refused. "
            "Only tensors, plain Python values and argparse.Namespace are accepted; re-save the weights from a "
            "trusted environment as a dict of tensors.") from None


def find_resume_checkpoint(output_dir, resume, auto_resume):
    """The checkpoint to resume from: `resume` if given (it must exist), else output_dir/checkpoint-last.pth when
    auto_resume is on and that file exists (requeued jobs restart with unchanged arguments), else None."""
    if resume:
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"--resume checkpoint not found: {resume}")
        return resume
    last = os.path.join(output_dir, "checkpoint-last.pth") if output_dir else None
    if auto_resume and last and os.path.isfile(last):
        return last
    return None


def normalize_pretrained(ckpt, key="model"):
    """State dict `ckpt[key]` with 'module.' / 'ema.' prefixes removed.

    Reads ours ({'model', 'model_ema', 'optimizer', ...}), the LUT authors' ('model_ema' keys prefixed 'ema.') and
    MAE's released files ({'model': ...}); key is 'model' (student) or 'model_ema' (teacher).
    """
    if key not in ckpt:
        raise KeyError(f"checkpoint has no {key!r} entry; it has {sorted(ckpt)}")
    state = {}
    for name, value in ckpt[key].items():
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        state[name] = value
    return state


def rng_state():
    """This process's torch / CUDA (current device) / numpy / Python RNG states, as weights_only-loadable values."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "numpy": (np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss),
        "python": random.getstate(),
    }


def set_rng_state(state):
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
