"""Counting host syncs on any device: the ops after which, on a GPU, the CPU waits for the GPU to finish all queued
work (a tensor's value read on the host: .item(), float(), a truth value, .tolist(), .cpu(); an output whose size
depends on the data: nonzero, boolean-mask indexing, masked_select, unique; torch.equal, which returns a Python bool;
a tensor made from Python data, torch.tensor([...]), which a GPU receives by a blocking copy).

On the CPU the same ops run, so a CPU test that counts them counts the syncs a GPU run would make:

    with SyncCounter() as syncs:
        train_one_epoch(...)
    assert not syncs.outside(ALLOWED), syncs.report()
"""
import collections
import os
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

TORCH = os.path.dirname(torch.__file__)  # torch's own frames are left out of the recorded stacks
aten = torch.ops.aten
# lift_fresh: a tensor made from Python data (torch.tensor([...])), on a GPU a blocking host-to-device copy.
SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.nonzero_static, aten.masked_select, aten.equal,
            aten.unique_consecutive, aten._unique2, aten.unique_dim, aten.repeat_interleave, aten.lift_fresh}


def _is_boolean_mask_index(func, args):
    return func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
        torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] or ()))


# Tensor methods that copy to host memory without an op the dispatcher sees on a CPU tensor; on a GPU tensor each
# waits for the GPU.
HOST_COPIES = ("tolist", "numpy", "cpu")


class SyncCounter(TorchDispatchMode):
    """Records every host-syncing op run while active, with the Python functions it was called from."""

    def __init__(self):
        super().__init__()
        self.syncs = []  # (op name, ["function (file:line)" of the Python stack outside torch, outermost first])
        self._methods = {}

    def _record(self, op):
        self.syncs.append((op, [f"{frame.name} ({os.path.basename(frame.filename)}:{frame.lineno})"
                                for frame in traceback.extract_stack()[:-2] if not frame.filename.startswith(TORCH)]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in SYNC_OPS or _is_boolean_mask_index(func, args):
            self._record(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in HOST_COPIES:
            method = self._methods[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counting(name, method))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._methods.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def _counting(self, name, method):
        def counted(tensor, *args, **kwargs):
            self._record(f"Tensor.{name}")
            return method(tensor, *args, **kwargs)
        return counted

    def outside(self, allowed):
        """The syncs none of whose callers is a function named in `allowed` (those sync on purpose, e.g. once per
        print interval)."""
        return [(op, stack) for op, stack in self.syncs
                if not any(frame.split(" ", 1)[0] in allowed for frame in stack)]

    def report(self, syncs=None):
        """Each distinct sync with its count and the innermost callers."""
        counts = collections.Counter((op, " < ".join(reversed(stack[-6:])))
                                     for op, stack in (self.syncs if syncs is None else syncs))
        return "\n".join(f"{n} x {op} in {where}" for (op, where), n in counts.most_common())
