"""nn.Linear with its CPU float32 matmuls done by oneDNN: the same math, faster where torch's BLAS is slower.

On CPU, torch computes a float32 nn.Linear with MKL's sgemm. oneDNN, which torch also ships (its CPU fusions and
bfloat16 matmuls use it), is faster on some CPUs: on the AMD EPYC (Zen 4) of docs/performance.md, square float32
matmuls run at ~210-218 GFLOP/s through oneDNN and ~190 through torch.mm, and a ViT-S/16 LUT step is ~5 % faster.
`OneDNNLinear` sends the forward matmul (bias added inside it) and the input gradient through oneDNN and keeps the
weight gradient on torch.mm (its operands are transposed, which oneDNN would copy first). Results equal nn.Linear's
up to float32 rounding. Anywhere else (CUDA, autocast, other dtypes, torch.compile, a torch build without oneDNN) it is
nn.Linear.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from torch.autograd.function import once_differentiable

AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_LINEAR = torch.ops.mkldnn._linear_pointwise.default if AVAILABLE else None


def onednn_linear(x, weight, bias=None, gelu=False):
    """x @ weight.T + bias through oneDNN, then (gelu=True) exact GELU inside the same call;
    x: [..., K] float32 on CPU, weight: [N, K], bias: [N] or None."""
    out = _LINEAR(x.reshape(-1, x.shape[-1]), weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")
    return out.view(*x.shape[:-1], weight.shape[0])


def _use_onednn(x, weight):
    # torch.compile keeps nn.Linear: inductor lowers oneDNN's linear only for frozen (constant) weights.
    return (AVAILABLE and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


class _OneDNNLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        x_2d = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x_2d, weight)
        ctx.x_shape = x.shape
        return _LINEAR(x_2d, weight, bias, "none", [], "").view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable  # oneDNN's op has no derivative: a double backward must fail, not go silently wrong
    def backward(ctx, grad):
        x_2d, weight = ctx.saved_tensors
        grad_2d = grad.reshape(-1, grad.shape[-1])
        need_x, need_weight, need_bias = ctx.needs_input_grad
        grad_x = _LINEAR(grad_2d, weight.t(), None, "none", [], "").view(ctx.x_shape) if need_x else None
        grad_weight = grad_2d.t().mm(x_2d) if need_weight else None
        return grad_x, grad_weight, grad_2d.sum(0) if need_bias else None


class OneDNNLinear(nn.Linear):
    """nn.Linear (same parameters, state-dict keys and initialisation) whose CPU float32 matmuls run in oneDNN."""

    def forward(self, x):
        if _use_onednn(x, self.weight):
            return _OneDNNLinearFunction.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class OneDNNMlp(Mlp):
    """timm's Mlp; without autograd (the EMA teacher, feature extraction) fc1's exact GELU runs inside its matmul,
    sparing a pass over the widest activation."""

    def forward(self, x):
        if (not torch.is_grad_enabled() and _use_onednn(x, self.fc1.weight) and type(self.act) is nn.GELU
                and self.act.approximate == "none" and isinstance(self.norm, nn.Identity)):
            x = onednn_linear(x, self.fc1.weight, self.fc1.bias, gelu=True)
            return self.drop2(self.fc2(self.drop1(x)))
        return super().forward(x)


def use_onednn_linears(module):
    """Turn every plain nn.Linear inside `module` into a OneDNNLinear and every timm Mlp into a OneDNNMlp, in place
    (parameters untouched); returns `module`."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDNNLinear
        elif type(m) is Mlp:
            m.__class__ = OneDNNMlp
    return module
