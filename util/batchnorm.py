"""BatchNorm1d whose batch statistics span all ranks, for CPU / gloo runs (torch's SyncBatchNorm is CUDA-only): the
LUT projector and predictor statistics must cover the global batch under DDP."""
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce


class SyncBatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d on [N, C] or [N, C, L] whose training-mode mean / var are those of the batch of all ranks; the
    state-dict keys are BatchNorm1d's, so checkpoints load into either.

    With one rank, or when it uses running stats, it is exactly nn.BatchNorm1d. Gradients follow
    torch.nn.SyncBatchNorm (the differentiable all_reduce sums them over ranks in backward): each rank's input
    gradient is that of the sum of all ranks' losses, so DDP-averaged parameters get the gradient of the mean loss.
    """

    def forward(self, x):
        use_batch_stats = self.training or not self.track_running_stats
        if not (use_batch_stats and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        # Half-precision inputs are normalised in float32, like torch's batch norm kernels do.
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        sums = all_reduce(torch.cat([xf.sum(dims), xf.new_tensor([xf.numel() // xf.shape[1]])]))
        count = sums[-1]
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)} "
                             f"on each of {dist.get_world_size()} ranks")
        mean = sums[:-1] / count
        centered = xf - mean.view(shape)
        # Two passes (mean, then squared deviations) avoid the cancellation of E[x^2] - E[x]^2.
        var = all_reduce((centered * centered).sum(dims)) / count
        if self.training and self.track_running_stats:
            with torch.no_grad():  # nn.BatchNorm1d's update, with the unbiased variance of the global batch
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var * count / (count - 1)).to(self.running_var.dtype), momentum)
        y = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module, device):
    """Replace every nn.BatchNorm1d in `module` by a cross-rank BatchNorm: torch.nn.SyncBatchNorm on CUDA (which
    converts all BatchNorm layers), else SyncBatchNorm1d. The parameter objects are reused, so an optimizer built
    before the conversion still updates them."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
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
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module
