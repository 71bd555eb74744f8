"""Backward formulas that vmap batches, for the ops whose own backward torch runs once per
output channel in the backward pass batched over channels (``extract._output_grads``).

``autograd.grad(..., is_grads_batched=True)`` runs on torch's legacy vmap, whose batching
rules lack ``gelu_backward``, ``tanh_backward``, ``_softmax_backward_data`` and
``native_batch_norm_backward``: each falls back to a loop over the channels and a stack (the
GPT-2-style trace row: 150 ms of a 1 s call). The same derivatives as pointwise products and
sums batch as one op each. Left to torch, measured: layer norm (the formula costs more than the
loop at d = 32), convolutions (the transposed convolution loops as well; functorch's vmap
batches both, but was slower in all: depthwise row 354 -> 463 ms), ``masked_fill`` (its
batched forms loop too, but for a product with the mask, which turns an infinite gradient at a
masked entry into NaN).

Only captures whose backward pass is batched use them (``OpCapture(batched=True)``); the
forward values are the op's own, and the gradients agree with torch's to rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd import Function


class _Gelu(Function):
    @staticmethod
    def forward(ctx, x, approximate):
        ctx.save_for_backward(x)
        ctx.approximate = approximate
        return F.gelu(x, approximate=approximate)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if ctx.approximate == "tanh":
            k = math.sqrt(2 / math.pi)
            t = torch.tanh(k * (x + 0.044715 * x**3))
            d = 0.5 * (1 + t) + 0.5 * k * x * (1 - t * t) * (1 + 3 * 0.044715 * x * x)
        else:
            d = 0.5 * (1 + torch.erf(x * math.sqrt(0.5))) + x * torch.exp(-0.5 * x * x) * (
                1 / math.sqrt(2 * math.pi)
            )
        return g * d, None


class _Tanh(Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _Softmax(Function):
    @staticmethod
    def forward(ctx, x, dim):
        y = torch.softmax(x, dim)
        ctx.save_for_backward(y)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        gy = g * y
        return gy - y * gy.sum(ctx.dim, keepdim=True), None


class _BatchNormEval(Function):
    """Eval-mode batch norm by parameters (or none), differentiated for its input only: the
    capture's factors give the parameters' per-example gradients (they come in detached).
    The input's gradient is the output's times ``w / sqrt(var + eps)`` per channel."""

    @staticmethod
    def forward(ctx, x, mean, var, w, b, eps):
        scale = torch.rsqrt(var + eps) if w is None else w * torch.rsqrt(var + eps)
        ctx.save_for_backward(scale.reshape((1, -1) + (1,) * (x.dim() - 2)))
        return F.batch_norm(x, mean, var, w, b, False, 0.0, eps)

    @staticmethod
    def backward(ctx, g):
        (scale,) = ctx.saved_tensors
        return g * scale, None, None, None, None, None


def norm(op: str, a: dict):
    """The output of the norm ``op`` on the arguments ``a`` (weight and bias: parameters of
    the capture, frozen or None) through ``_BatchNormEval``; None where it does not apply
    (another norm, training mode, an input that needs no gradient)."""
    x = a["input"]
    if not (isinstance(x, torch.Tensor) and x.requires_grad and x.is_floating_point()):
        return None
    w, b = (None if a.get(k) is None else a[k].detach() for k in ("weight", "bias"))
    if op == "batch_norm" and not a.get("training") and a.get("running_var") is not None:
        return _BatchNormEval.apply(
            x, a["running_mean"], a["running_var"], w, b, a.get("eps", 1e-5)
        )
    return None


def _wants(mode, x) -> bool:
    """Whether ``x`` is a floating activation that autograd tracks and no argument is a
    parameter (a parameter passed to an op without a rule goes the default way, which
    records it as touched)."""
    return (
        mode.batched
        and isinstance(x, torch.Tensor)
        and x.requires_grad
        and x.is_floating_point()
        and mode.ref(x) is None
    )


def _gelu(mode, func, args, kwargs):
    x = args[0] if args else kwargs.get("input")
    approximate = args[1] if len(args) > 1 else kwargs.get("approximate", "none")
    if not _wants(mode, x):
        return NotImplemented
    return _Gelu.apply(x, approximate)


def _tanh(mode, func, args, kwargs):
    x = args[0] if args else kwargs.get("input")
    if len(args) > 1 or kwargs.keys() - {"input"} or not _wants(mode, x):
        return NotImplemented
    return _Tanh.apply(x)


def _softmax(mode, func, args, kwargs):
    x = args[0] if args else kwargs.get("input")
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    rest = args[2:] if func is not F.softmax else args[3:]
    dtype = kwargs.get("dtype")
    if not isinstance(dim, int) or rest or dtype is not None or not _wants(mode, x):
        return NotImplemented
    return _Softmax.apply(x, dim)


HANDLERS = {
    F.gelu: _gelu,
    torch.tanh: _tanh,
    torch.Tensor.tanh: _tanh,
    F.softmax: _softmax,
    torch.softmax: _softmax,
    torch.Tensor.softmax: _softmax,
}
