"""LARS (You et al., 2017, "Large Batch Training of Convolutional Networks"), for MAE's linear-probing protocol."""
import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step for each weight matrix is rescaled by a layer-wise trust ratio.

    For a parameter w with ndim > 1 and gradient g: u = g + weight_decay * w, then
    u <- u * trust_coefficient * ||w|| / ||u|| (left as is when either norm is 0). Biases and other 1-d parameters
    take the plain gradient with no decay and no rescaling. Then m <- momentum * m + u and w <- w - lr * m."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    # Computed on the device with torch.where: no host sync per parameter.
                    ratio = torch.where((w_norm > 0) & (u_norm > 0),
                                        group["trust_coefficient"] * w_norm / u_norm, torch.ones_like(w_norm))
                    update = update * ratio
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf = self.state[p]["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
