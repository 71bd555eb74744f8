"""Per-example features of a block of examples: the seam between capture and the drivers.

Because examples are independent (no batch coupling, checked by the plan), the gradient of
the *sum* over the batch with respect to example i's layer output is example i's own, so one
backward pass per output channel yields every example's factors at once. Parameters without
a rule get per-example Jacobians from the dense path.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch.func import functional_call

from .._checks import check_finite_block
from .blocks import Block, Factor, choose_form, concat_blocks, to_terms
from .dense import dense_jacobian
from .hooks import Capture, Use
from .outputs import OutputSpec
from .plan import DENSE, ModelPlan, cast_inputs, model_state

CHUNK = 2048  # examples per forward/backward pass unless the caller bounds memory tighter


def _cat(ts: List[torch.Tensor]) -> torch.Tensor:
    """Concatenate a group's calls along positions (no copy for a single call)."""
    return ts[0] if len(ts) == 1 else torch.cat(ts, 1)


def _group_factors(plan: ModelPlan, uses: List[Use], Ds: List[torch.Tensor], stacked: bool,
                   n: int) -> Dict[int, Factor]:
    """Concatenate each group's calls along positions and pick its cheaper form."""
    factors: Dict[int, Factor] = {}
    for k, g in enumerate(plan.groups):
        idx = [i for i, u in enumerate(uses) if u.group == k]
        if not idx:
            continue
        D = _cat([Ds[i] for i in idx])
        A = _cat([uses[i].a for i in idx]) if g.weight is not None else None
        f = choose_form(g, Factor(A, D, 1.0 if g.bias is not None else 0.0))
        if stacked:  # trace: the channels become one longer feature
            f.D = f.D.reshape(n, f.D.shape[1], 1, -1)
        factors[k] = f
    return factors


def _output_grads(f: torch.Tensor, ys: List[torch.Tensor]) -> List[torch.Tensor]:
    """Gradients of each output channel's batch sum w.r.t. every ``y``: ``[C, *y.shape]``
    (``y.shape`` when C = 1), one vmapped backward pass for all channels."""
    if not ys:
        return []
    n, C = f.shape
    if C == 1:
        gs = torch.autograd.grad(f.sum(), ys, allow_unused=True)
        return [torch.zeros_like(y) if g is None else g for y, g in zip(ys, gs)]
    eye = torch.eye(C, dtype=f.dtype, device=f.device).unsqueeze(1).expand(C, n, C)
    try:
        gs = torch.autograd.grad(f, ys, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
    except RuntimeError:  # an op without a batching rule: one pass per channel
        per = [torch.autograd.grad(f[:, c].sum(), ys, retain_graph=c < C - 1, allow_unused=True)
               for c in range(C)]
        gs = [None if per[0][i] is None else torch.stack([p[i] for p in per])
              for i in range(len(ys))]
    return [torch.zeros((C,) + tuple(y.shape), dtype=y.dtype, device=y.device) if g is None else g
            for y, g in zip(ys, gs)]


def extract(plan: ModelPlan, spec, state: Dict[str, torch.Tensor], x: tuple) -> Block:
    """Features of one block of examples: one backward pass per output channel."""
    with Capture(plan, copy_outputs=False) as cap, torch.enable_grad():
        out = functional_call(plan.model, state, x)
    if any(u.y._version != u.version for u in cap.uses):  # modified in place downstream
        with Capture(plan) as cap, torch.enable_grad():
            out = functional_call(plan.model, state, x)
    f = spec.rows(out)
    n, C = f.shape
    uses = cap.uses
    ys = [u.y for u in uses]
    Ds = [plan.groups[u.group].rule.d_factor(u.module, g).unsqueeze(2) if C == 1 else
          torch.stack([plan.groups[u.group].rule.d_factor(u.module, g[c]) for c in range(C)], 2)
          for u, g in zip(uses, _output_grads(f, ys))]
    block = Block(n, 1 if spec.stacked else C, _group_factors(plan, uses, Ds, spec.stacked, n))
    if plan.dense:
        G = dense_jacobian(plan, state, x, spec.rows)
        if spec.stacked:
            G = G.reshape(n, 1, -1)
        block.factors[DENSE] = Factor(None, G.unsqueeze(1), 0.0, True)
    return block


def block_from_recorded(plan: ModelPlan, cap: Capture, state: Dict[str, torch.Tensor], x: tuple,
                        cotangent: torch.Tensor) -> Block:
    """Features of the gradient of the user's own loss, from a recorded backward pass:
    one channel, ``J_i^T u_i`` with ``u_i`` the loss gradient at example i's output."""
    n = cotangent.shape[0]
    Ds = []
    for u in cap.uses:
        gy = torch.zeros_like(u.y) if u.grad is None else u.grad
        Ds.append(plan.groups[u.group].rule.d_factor(u.module, gy).unsqueeze(2))
    block = Block(n, 1, _group_factors(plan, cap.uses, Ds, False, n))
    if plan.dense:
        J = dense_jacobian(plan, state, x, lambda o: o.reshape(o.shape[0], -1))
        G = torch.einsum("nc,ncp->np", cotangent.reshape(n, -1).to(J.dtype), J)
        block.factors[DENSE] = Factor(None, G[:, None, None, :], 0.0, True)
    return block


def features(plan: ModelPlan, spec: OutputSpec, state, x, chunk: int, name: str) -> Block:
    """Features of all of ``x``, extracted ``chunk`` examples at a time and concatenated."""
    n = x[0].shape[0]
    blocks = []
    for i in range(0, n, chunk):
        b = extract(plan, spec, state, tuple(t[i:i + chunk] for t in x))
        check_finite_block(b, name)
        blocks.append(b)
    return concat_blocks(blocks)


def tangent_terms(plan: ModelPlan, spec: OutputSpec, dtype: torch.dtype, x1, x2=None,
                  chunk: Optional[int] = None):
    """Native terms of the tangent kernel of ``x1`` against ``x2`` (None: itself) at the
    model's current weights: ``(side1, side2, C)`` for ``_backend.accumulate``."""
    state = model_state(plan, dtype)
    chunk = chunk or CHUNK
    b1 = features(plan, spec, state, cast_inputs(x1, dtype), chunk, "x1")
    b2 = None if x2 is None else features(plan, spec, state, cast_inputs(x2, dtype), chunk, "x2")
    side1, side2 = to_terms(plan, b1, b2)
    return side1, side2, b1.C
