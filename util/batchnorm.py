"""BatchNorm1d whose batch statistics span all ranks, on any device and process group (gloo, NCCL): the LUT projector
and predictor statistics, and the linear probe's, must cover the global batch under DDP."""
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable (the gradient is the sum over ranks too); functional collectives, which
    torch.compile traces into the graph (torch.distributed.nn's all_reduce breaks it)."""

    @staticmethod
    def forward(ctx, x):
        return funcol.all_reduce(x, "sum", dist.group.WORLD)

    @staticmethod
    def backward(ctx, grad):
        return funcol.all_reduce(grad.contiguous(), "sum", dist.group.WORLD)


def all_reduce(x):
    return _AllReduceSum.apply(x)


class SyncBatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d on [N, C] or [N, C, L] whose training-mode mean / var are those of the batch of all ranks; the
    state-dict keys are BatchNorm1d's, so checkpoints load into either.

    Without a process group, or when it uses running stats, it is exactly nn.BatchNorm1d. Across ranks it makes no
    host sync (two all-reduces of C + 1 and C numbers, no data-dependent branch), so the CPU keeps queueing GPU work;
    a global batch of one sample, for which BatchNorm is undefined, is refused by the scripts before training.
    Gradients follow torch.nn.SyncBatchNorm (the all-reduce sums them over ranks in backward): each rank's input
    gradient is that of the sum of all ranks' losses, so DDP-averaged parameters get the gradient of the mean loss."""

    def forward(self, x):
        use_batch_stats = self.training or not self.track_running_stats
        if not (use_batch_stats and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        # Half-precision inputs are normalised in float32, like torch's batch norm kernels do.
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        # The count travels with the sums: ranks may hold batches of different sizes.
        sums = all_reduce(torch.cat([xf.sum(dims), xf.new_full((1,), xf.numel() // xf.shape[1])]))
        count = sums[-1]
        mean = sums[:-1] / count
        centered = xf - mean.view(shape)
        # Two passes (mean, then squared deviations) avoid the cancellation of E[x^2] - E[x]^2.
        var = all_reduce((centered * centered).sum(dims)) / count
        if self.training and self.track_running_stats:
            with torch.no_grad():  # nn.BatchNorm1d's update, with the unbiased variance of the global batch
                self.num_batches_tracked.add_(1)
                # momentum None: the cumulative average, its weight a tensor (float(num_batches_tracked) would sync)
                momentum = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var * count / (count - 1)).to(self.running_var.dtype), momentum)
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module):
    """Replace every nn.BatchNorm1d in `module` by SyncBatchNorm1d, on every device. The parameter and buffer
    objects are reused, so an optimizer built before the conversion still updates them."""
    if type(module) is nn.BatchNorm1d:
        sync = SyncBatchNorm1d(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            sync.weight, sync.bias = module.weight, module.bias
        if module.track_running_stats:
            sync.running_mean, sync.running_var = module.running_mean, module.running_var
            sync.num_batches_tracked = module.num_batches_tracked
        return sync.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module
