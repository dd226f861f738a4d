"""Running the entry scripts from tests (micro models, one thread per process) and comparing what they write."""
import json
import os
import signal
import subprocess
import sys

import torch

from util.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO_PRETRAIN = os.path.join(ROOT, "tests", "micro_pretrain.py")
MICRO_FINETUNE = os.path.join(ROOT, "tests", "micro_finetune.py")
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
# One thread per process: these models are tiny, and several OpenMP threads per process on a small shared machine
# spin-wait for each other.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(cmd, check=True, timeout=900, env=None):
    """Run a command (a list; items are turned into strings) from the repository root, with ENV and `env` in its
    environment; returns the process."""
    cmd = [str(c) for c in cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**ENV, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def epoch_log(out):
    """The records of output_dir/log.txt."""
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def assert_same_state(a, b):
    """Bitwise equality of nested dicts / lists of tensors and plain values (state dicts, optimizer states)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    elif torch.is_tensor(a):
        assert torch.equal(a, b)
    else:
        assert a == b


def assert_same_training_state(path_a, path_b):
    """Two checkpoints hold bitwise the same weights, teacher, optimizer state and position."""
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert a.keys() == b.keys()
    for key in ("model", "model_ema", "optimizer"):
        if key in a:
            assert_same_state(a[key], b[key])
    assert (a["epoch"], a["epoch_step"], a.get("global_step")) == (b["epoch"], b["epoch_step"], b.get("global_step"))


def install_kill_point(spec):
    """Kill tests: SIGKILL this process right before or after its n-th atomic write of a file, spec
    "before|after:<file name>:<n>" (e.g. "after:checkpoint-last.pth:2"). Every output file is written through
    util.checkpoint.write_atomically, so every file event of a run can be a kill point."""
    import util.checkpoint
    when, name, nth = spec.split(":")
    write, seen = util.checkpoint.write_atomically, []

    def write_atomically(path, fn):
        if os.path.basename(path) == name:
            seen.append(path)
        hit = len(seen) == int(nth) and os.path.basename(path) == name
        if hit and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        write(path, fn)
        if hit and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    util.checkpoint.write_atomically = write_atomically
