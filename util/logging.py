"""Training logs: a console MetricLogger that does not sync the GPU every step and stops on non-finite losses, and
TensorBoard."""
import datetime
import math
import os
import resource
import time

import torch
from torch.utils.tensorboard import SummaryWriter

from util.dist import all_reduce_mean, is_main_process


def max_memory_mb():  # peak CUDA tensor memory when CUDA is in use, else the process's peak resident set
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KB


class NonFiniteLossError(RuntimeError):
    pass


class MetricLogger:
    """Averages scalars over iterations and prints one line every `print_freq` iterations (and at the last one).

    update(loss=t) adds device tensors without .item(), so the GPU is synchronised only when a line is printed; the
    window's means are then averaged over ranks, checked to be finite (else NonFiniteLossError on every rank, before
    any checkpoint is written) and, with a `log_writer`, written to TensorBoard as `<tb_prefix><name>` against
    epoch_1000x (MAE's x-axis). set(lr=x) records a value shown and logged as is. summary() gives the epoch means
    over ranks and the last set() values. totals: what totals() returned for the first part of an epoch (mid-epoch
    checkpoint), so that after a resume the epoch means cover the whole epoch."""

    def __init__(self, header="", print_freq=20, total_iters=None, totals=None, epoch=0, log_writer=None,
                 tb_prefix=""):
        self.header, self.print_freq, self.total_iters = header, print_freq, total_iters
        self.epoch, self.log_writer, self.tb_prefix = epoch, log_writer, tb_prefix
        self._window, self._window_count = {}, {}  # name -> sum of values since the last print, and their count
        self._total = dict(totals["sum"]) if totals else {}  # name -> sum over flushed windows of mean * count
        self._total_count = dict(totals["count"]) if totals else {}
        self._last_avg, self._values, self._iter = {}, {}, 0

    def update(self, **values):
        """Add one observation per name: a 0-d tensor (any device, kept there) or a number."""
        for name, value in values.items():
            # float32 sums: a bf16 running sum would round away small losses after a few steps.
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            self._window[name] = self._window.get(name, 0.0) + value
            self._window_count[name] = self._window_count.get(name, 0) + 1

    def set(self, **values):
        self._values.update({name: float(v) for name, v in values.items()})

    def _flush(self):
        """Average the window over ranks (one collective, one host sync), check it and fold it into the totals."""
        names = [n for n in self._window if self._window_count[n]]
        if not names:
            return
        device = next((v.device for v in self._window.values() if torch.is_tensor(v)), torch.device("cpu"))
        means = torch.stack([torch.as_tensor(self._window[n] / self._window_count[n], dtype=torch.float64,
                                             device=device) for n in names])
        means = all_reduce_mean(means).tolist()
        if not all(math.isfinite(m) for m in means):
            terms = ", ".join(f"{n} {m:.4g}" for n, m in zip(names, means))
            raise NonFiniteLossError(f"{self.header}: non-finite loss in the iterations up to {self._iter} ({terms}); "
                                     f"stopping without saving, the last checkpoint is untouched")
        for name, mean in zip(names, means):
            count = self._window_count[name]
            self._total[name] = self._total.get(name, 0.0) + mean * count
            self._total_count[name] = self._total_count.get(name, 0) + count
            self._last_avg[name] = mean
            self._window[name], self._window_count[name] = 0.0, 0

    def summary(self):
        """Means over everything logged so far (over ranks: a collective), plus the last set() values."""
        self._flush()
        return {**{n: self._total[n] / self._total_count[n] for n in self._total}, **self._values}

    def totals(self):
        """The running sums and counts behind summary()'s means (plain numbers, for a checkpoint); a collective."""
        self._flush()
        return {"sum": dict(self._total), "count": dict(self._total_count)}

    def log_every(self, iterable, images_per_iter=None, start_iter=0):
        """Yield from `iterable`, printing progress. Iterations are numbered from `start_iter` (mid-epoch resume);
        the total is total_iters if given, else start_iter + len(iterable). images_per_iter (global) gives img/s."""
        total = self.total_iters or start_iter + len(iterable)
        width = len(str(total))
        start = window_start = end = time.time()
        data_time, window_iters, done = 0.0, 0, 0
        for i, item in enumerate(iterable, start=start_iter):
            data_time += time.time() - end
            yield item
            window_iters += 1
            done += 1
            self._iter = i + 1
            if (i + 1) % self.print_freq == 0 or i + 1 == total:
                self._flush()  # waits for the GPU, so the window's wall time is the true compute time
                now = time.time()
                iter_time = (now - window_start) / window_iters
                eta = datetime.timedelta(seconds=int(iter_time * (total - i - 1)))
                parts = [f"{self.header} [{i + 1:>{width}}/{total}]", f"eta {eta}"]
                parts += [f"{n} {self._last_avg[n]:.4f} ({self._total[n] / self._total_count[n]:.4f})"
                          for n in self._last_avg]
                parts += [f"{n} {v:.4g}" for n, v in self._values.items()]
                if images_per_iter:
                    parts.append(f"img/s {images_per_iter / iter_time:.1f}")
                parts += [f"time {iter_time:.3f}", f"data {data_time / window_iters:.3f}",
                          f"mem {max_memory_mb():.0f}MB"]
                print("  ".join(parts), flush=True)
                if self.log_writer is not None:
                    epoch_1000x = int(1000 * (self.epoch + (i + 1) / total))
                    for name, value in {**{self.tb_prefix + n: v for n, v in self._last_avg.items()},
                                        **self._values}.items():
                        self.log_writer.add_scalar(name, value, epoch_1000x)
                window_start, data_time, window_iters = now, 0.0, 0
            end = time.time()
        total_time = time.time() - start
        print(f"{self.header} total time {datetime.timedelta(seconds=int(total_time))} "
              f"({total_time / max(done, 1):.3f} s / it)", flush=True)


def create_tb_writer(log_dir):
    """TensorBoard SummaryWriter for log_dir on rank 0; None on other ranks or without a log_dir."""
    if not log_dir or not is_main_process():
        return None
    os.makedirs(log_dir, exist_ok=True)
    return SummaryWriter(log_dir=log_dir)
