"""nn.Linear with its CPU float32 matmuls done by oneDNN: the same math, faster where torch's BLAS is slower.

On CPU, torch computes a float32 nn.Linear with MKL's sgemm. oneDNN, which torch also ships (its CPU fusions and
bfloat16 matmuls use it), is faster on some CPUs: on the AMD EPYC (Zen 4) of docs/performance.md, square float32
matmuls run at 210-220 GFLOP/s through oneDNN and 190-200 through torch.mm, and a ViT-S/16 LUT step is 3-5 %
faster.
`OneDNNLinear` sends the forward matmul (bias added inside it) and the input gradient through oneDNN and keeps the
weight gradient on torch.mm (its operands are transposed, which oneDNN would copy first). Results equal nn.Linear's
up to float32 rounding, eager or under torch.compile. Anywhere else (CUDA, autocast, other dtypes, a torch build
without oneDNN) it is nn.Linear.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_LINEAR = torch.ops.mkldnn._linear_pointwise.default if AVAILABLE else None


# A custom op, so that torch.compile calls it as it is (inductor lowers oneDNN's own op only for constant weights).
@torch.library.custom_op("lut::onednn_linear", mutates_args=())
def _linear_2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gelu: bool) -> torch.Tensor:
    return _LINEAR(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")


@_linear_2d.register_fake
def _(x, weight, bias, gelu):
    return x.new_empty(x.shape[0], weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias, ctx.gelu = inputs
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad):
    if ctx.gelu:
        raise RuntimeError("onednn_linear(gelu=True) has no backward; use it without autograd")
    x, weight = ctx.saved_tensors
    need_x, need_weight, need_bias, _ = ctx.needs_input_grad
    grad_x = _linear_2d(grad, weight.t(), None, False) if need_x else None
    grad_weight = grad.t().mm(x) if need_weight else None
    return grad_x, grad_weight, grad.sum(0) if need_bias else None, None


_linear_2d.register_autograd(_backward, setup_context=_setup_context)


def onednn_linear(x, weight, bias=None, gelu=False):
    """x @ weight.T + bias through oneDNN, then (gelu=True, no autograd) exact GELU inside the same call;
    x: [..., K] float32 on CPU, weight: [N, K], bias: [N] or None."""
    return _linear_2d(x.reshape(-1, x.shape[-1]), weight, bias, gelu).view(*x.shape[:-1], weight.shape[0])


def _use_onednn(x, weight):
    return (AVAILABLE and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))


class OneDNNLinear(nn.Linear):
    """nn.Linear (same parameters, state-dict keys and initialisation) whose CPU float32 matmuls run in oneDNN."""

    def forward(self, x):
        if _use_onednn(x, self.weight):
            return onednn_linear(x, self.weight, self.bias)
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
