"""Stop cleanly on SLURM's time-limit / preemption signal: checkpoint at a step boundary, then requeue.

SLURM (and submitit's `--signal`) sends SIGUSR2 some time before it kills a job. submitit's own handler would call
the job's `checkpoint()` at once, from inside whatever the training step is doing. The handler here only records the
signal; the training loop asks `requested(step)` after every optimizer step, all ranks agree on the step at which to
stop, the loop saves a consistent checkpoint (mid-epoch, with the data position), and only then `requeue()` hands
over to the previous handler (submitit's, which requeues the job) or exits."""
import signal
import sys

import torch

from util.dist import all_reduce_sum, get_world_size


class PreemptionHandler:
    def __init__(self, check_every=10, signum=signal.SIGUSR2):
        # check_every: with several ranks the flag is all-reduced every this many optimizer steps (a collective per
        # step would synchronise the GPU every step); a single process checks every step for free.
        self.signum, self.check_every = signum, check_every
        self.received = self.stopping = False
        self.previous = signal.signal(signum, self._record)

    def _record(self, signum, frame):
        self.received = True  # no print here: a handler that writes to stdout mid-print raises a reentrant error

    def requested(self, global_step):
        """True once every rank should stop after `global_step`; call it on all ranks after each optimizer step."""
        if self.stopping:
            return True
        if get_world_size() == 1:
            self.stopping = self.received
        elif global_step % self.check_every == 0:
            self.stopping = all_reduce_sum(torch.tensor(float(self.received))).item() > 0
        if self.stopping:
            print(f"{signal.Signals(self.signum).name} received: stopping after optimizer step {global_step}")
        return self.stopping

    def ignore(self):
        """Once the run is complete: a late signal has nothing to save. SIG_IGN, because Python's exit resets its own
        handlers to the default action, under which the signal would kill the process and SLURM mark the job FAILED."""
        signal.signal(self.signum, signal.SIG_IGN)

    def requeue(self):
        """After the checkpoint is written: let the previous handler requeue the job (submitit), or exit."""
        if callable(self.previous):
            self.previous(self.signum, None)  # submitit: requeues from rank 0 and exits there; returns elsewhere
        sys.exit(0)  # 0 on the other ranks, so that srun does not kill rank 0 while it requeues
