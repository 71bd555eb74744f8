"""The dense path: per-example Jacobians (torch.func) of the parameters no rule covers."""
from __future__ import annotations

import contextlib
from typing import Callable, Dict

import torch
from torch.func import functional_call, jacrev, vmap

from .plan import ModelPlan


def _vmap_friendly_attention():
    """The math kernel of scaled_dot_product_attention: the fused CPU kernels have no vmap
    batching rule and fall back to a per-example loop (1.6x slower on tiny-transformer)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def dense_jacobian(plan: ModelPlan, state: Dict[str, torch.Tensor], x: tuple,
                   rows: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``[n, C, P_dense]`` per-example Jacobians of ``rows(model(x))`` w.r.t. the dense params."""
    names = plan.dense
    fixed = {k: v.detach() for k, v in state.items() if k not in names}
    dense = {k: state[k].detach() for k in names}

    def single(dp, *xs):
        out = functional_call(plan.model, {**fixed, **dp}, tuple(t.unsqueeze(0) for t in xs))
        return rows(out)[0]

    with _vmap_friendly_attention():
        jac = vmap(jacrev(single), in_dims=(None,) + (0,) * len(x))(dense, *x)
    n = x[0].shape[0]
    C = jac[names[0]].shape[1]
    return torch.cat([jac[k].reshape(n, C, -1) for k in names], 2)
