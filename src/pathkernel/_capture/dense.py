"""The dense path: per-example Jacobians of the parameters no rule covers.

``torch.func``'s ``vmap(jacrev)`` computes them for a whole block at once. Modules it cannot
vmap (a packed-sequence RNN: its fused kernel has no batching rule, custom autograd
functions without a vmap rule) fall back to ``jacrev`` one example at a time, and where that
fails too, to plain autograd, one backward pass per example and output. The verdict is
remembered per model so the failing attempt is made once.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Dict

import torch
from torch.func import jacrev, vmap

from .plan import ModelPlan

# model -> the first method that worked: "vmap", "loop" or "autograd"
_METHOD: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_METHODS = ("vmap", "loop", "autograd")


def math_attention():
    """The math kernel of scaled_dot_product_attention: the fused kernels have no vmap
    batching rule (a per-example loop, 1.6x slower on tiny-transformer; before torch 2.3 an
    error)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        try:
            return torch.backends.cuda.sdp_kernel(
                enable_flash=False, enable_math=True, enable_mem_efficient=False
            )
        except (AttributeError, TypeError):
            return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def dense_jacobian(
    plan: ModelPlan,
    state: Dict[str, torch.Tensor],
    x: tuple,
    rows: Callable[..., torch.Tensor],
    ys: tuple = (),
) -> torch.Tensor:
    """``[n, C, P_dense]`` per-example Jacobians of ``rows(model(x), ys)`` w.r.t. the dense
    params (``ys``: the block's targets, batch first, sliced per example like the inputs)."""
    names = plan.dense
    fixed = {k: v.detach() for k, v in state.items() if k not in names}
    dense = {k: state[k].detach() for k in names}
    start = _METHODS.index(_METHOD.get(plan.model, "vmap"))
    err = None
    for method in _METHODS[start:]:
        try:
            jac = _JACOBIAN[method](plan, fixed, dense, x, ys, rows)
        except RuntimeError as e:  # no batching rule, an in-place op under vmap, ...
            err = e
            continue
        _METHOD[plan.model] = method
        n = x[0].shape[0]
        return torch.cat([jac[k].reshape(n, jac[k].shape[1], -1) for k in names], 2)
    raise err


def _single(plan, fixed, rows, k):
    """One example's rows: ``xs`` holds its ``k`` inputs, then its targets."""

    def f(dp, *xs):
        one = tuple(t.unsqueeze(0) for t in xs)
        out = plan.forward({**fixed, **dp}, one[:k])
        return rows(out, one[k:])[0]

    return f


def _by_vmap(plan, fixed, dense, x, ys, rows):
    xs = x + ys
    with math_attention():
        f = jacrev(_single(plan, fixed, rows, len(x)))
        return vmap(f, in_dims=(None,) + (0,) * len(xs))(dense, *xs)


def _by_loop(plan, fixed, dense, x, ys, rows):
    f = jacrev(_single(plan, fixed, rows, len(x)))
    per = [f(dense, *(t[i] for t in x + ys)) for i in range(x[0].shape[0])]
    return {k: torch.stack([p[k] for p in per]) for k in dense}


def _by_autograd(plan, fixed, dense, x, ys, rows):
    out = {k: [] for k in dense}
    for i in range(x[0].shape[0]):
        dp = {k: v.detach().requires_grad_(True) for k, v in dense.items()}
        with torch.enable_grad():
            o = plan.forward({**fixed, **dp}, tuple(t[i : i + 1] for t in x))
            o = rows(o, tuple(t[i : i + 1] for t in ys))[0]
            per = [
                torch.autograd.grad(
                    o[c], list(dp.values()), retain_graph=c < o.shape[0] - 1, allow_unused=True
                )
                for c in range(o.shape[0])
            ]
        for j, k in enumerate(dp):
            out[k].append(
                torch.stack([torch.zeros_like(dp[k]) if p[j] is None else p[j] for p in per])
            )
    return {k: torch.stack(v) for k, v in out.items()}


_JACOBIAN = {"vmap": _by_vmap, "loop": _by_loop, "autograd": _by_autograd}
