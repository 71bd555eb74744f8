"""Per-example features of a block of examples: the seam between capture and the drivers.

One forward pass records the uses of the factored parameters (``ops.OpCapture``). Because
examples are independent (no batch coupling, checked by the plan and the probe), the gradient
of the *sum* over the batch with respect to example i's part of an op output is example i's
own, so one backward pass per output channel (vmapped over channels) yields every example's
factors at once. Parameters without a rule get per-example Jacobians from the dense path.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch

from .._checks import check_finite_block
from .blocks import (
    Block,
    Factor,
    choose_form,
    concat_blocks,
    materialize,
    materialized_size,
    materializes,
    to_terms,
    wants_materialized,
)
from .dense import dense_jacobian, math_attention
from .layout import Layout
from .ops import MATRIX_OPS, OpCapture, Use
from .outputs import OutputSpec
from .plan import DENSE, ModelPlan, Trace, cast_inputs, model_state
from .projection import SAMPLE, fit
from .rules import (
    bias_grads,
    direct_conv_grads,
    elementwise_grads,
    live_positions,
    matrix_factors,
    one_hot,
    weight_grads,
)

CHUNK = 2048  # examples per forward/backward pass unless the caller bounds memory tighter


class TraceMismatch(ValueError):
    """The forward pass did not apply the parameters as when the model was probed."""


def param_ids(plan: ModelPlan, state: Dict[str, torch.Tensor]) -> Dict[int, str]:
    return {id(state[n]): n for n in plan.params}


def run_captured(
    plan: ModelPlan, state, x: tuple, trace: Trace, batched: bool = False
) -> Tuple[torch.Tensor, List[Use]]:
    """The model output and its uses, recorded under the trace's layouts. ``batched``: the
    backward pass to come is batched over output channels (``OpCapture``)."""
    n = x[0].shape[0]
    ids = param_ids(plan, state)
    # the math attention kernel: the fused ones have no batching rule for the backward
    # passes vmapped over output channels
    with torch.enable_grad(), math_attention():
        with OpCapture(ids, n, trace.expand, batched=batched) as cap:
            out = plan.forward(state, x)
        if any(u.y._version != u.version for u in cap.uses):  # modified in place downstream
            with OpCapture(ids, n, trace.expand, copy_outputs=True, batched=batched) as cap:
                out = plan.forward(state, x)
    check_trace(cap.uses, trace)
    return out, cap.uses


def check_trace(uses: List[Use], trace: Trace) -> None:
    if [u.signature() for u in uses] != trace.signatures:
        raise TraceMismatch(
            "model: its parameters were applied by other operations than when it was probed "
            "(the forward pass depends on the data?); use implementation='dense'"
        )


def _output_grads(f: torch.Tensor, ys: List[torch.Tensor]) -> List[torch.Tensor]:
    """Gradients of each output channel's batch sum w.r.t. every ``y``: ``[C, *y.shape]``,
    one vmapped backward pass for all channels."""
    if not ys:
        return []
    n, C = f.shape
    if C == 1:
        gs = torch.autograd.grad(f.sum(), ys, allow_unused=True, retain_graph=True)
        return [
            torch.zeros_like(y).unsqueeze(0) if g is None else g.unsqueeze(0)
            for y, g in zip(ys, gs)
        ]
    eye = torch.eye(C, dtype=f.dtype, device=f.device).unsqueeze(1).expand(C, n, C)
    try:
        gs = torch.autograd.grad(
            f, ys, grad_outputs=eye, is_grads_batched=True, allow_unused=True, retain_graph=True
        )
    except RuntimeError:  # an op without a batching rule: one pass per channel
        per = [
            torch.autograd.grad(f[:, c].sum(), ys, retain_graph=True, allow_unused=True)
            for c in range(C)
        ]
        gs = [
            None if per[0][i] is None else torch.stack([p[i] for p in per]) for i in range(len(ys))
        ]
    return [
        torch.zeros((C,) + tuple(y.shape), dtype=y.dtype, device=y.device) if g is None else g
        for y, g in zip(ys, gs)
    ]


def _direct(plan: ModelPlan, k: int, use: Use, lay: Layout, g, n: int, stacked: bool):
    """A convolution group's materialized factor straight from its input and output
    gradient (``rules.direct_conv_grads``), where the group would be materialized anyway;
    else None."""
    grp = plan.groups[k]
    if grp.uses != 1 or grp.conv_groups != 1 or (plan.projection and k in plan.projection.dims):
        return None
    if use.op != "conv" or use.x is None or not use.x.is_floating_point():
        return None
    S = g[0, 0, 0].numel() if g.dim() >= 4 else 0
    da = use.x.shape[1] * math.prod(use.ctx["kernel"])
    if not S or not materializes(grp, S, da, g.shape[2], g.shape[0], stacked):
        return None
    Z = direct_conv_grads(use, lay, n, g, grp.bias is not None)
    return None if Z is None else Factor(None, Z.reshape(n, 1, g.shape[0], -1), 0.0, True)


def _add_weight_grads(G: Optional[torch.Tensor], A, D, args) -> torch.Tensor:
    """``G [n, C, P]`` plus one use's per-example weight gradients (in place when given)."""
    n, C = D.shape[0], D.shape[2]
    into = None if G is None else G.view(n, C, *args[0])
    return weight_grads(A, D, *args, into=into).reshape(n, C, -1)


def _tied_groups(plan: ModelPlan, uses: List[Tuple[Use, Layout, torch.Tensor]]) -> set:
    """The sum groups that are a weight ``[V, d]`` used by embeddings and by output heads
    ``h W^T`` only (a tied GPT-2 head): they keep both uses' factors (``Factor.tied``)."""
    roles: Dict[int, set] = {}
    for use, _, _ in uses:
        for role, ref in (("weight", use.weight), ("bias", use.bias)):
            k = None if ref is None else plan.group_of.get(ref.name)
            if k is None or plan.groups[k].kind != "sum":
                continue
            if role == "weight" and use.op == "embedding":
                kind = "embedding"
            elif (
                role == "weight"
                and use.op in ("linear", "matmul", "addmm")
                and not ref.transposed
                and ref.rows is None
                and len(plan.groups[k].shape) == 2
            ):
                kind = "head"
            else:
                kind = "other"
            roles.setdefault(k, set()).add(kind)
    proj = plan.projection
    return {
        k
        for k, r in roles.items()
        if r == {"embedding", "head"} and not (proj is not None and k in proj.dims)
    }


def group_factors(
    plan: ModelPlan,
    uses: List[Tuple[Use, Layout, torch.Tensor]],
    n: int,
    stacked: bool = False,
    deferred: Optional[Set[int]] = None,
) -> Dict[int, Factor]:
    """Each group's factor from its uses (use, layout, output gradient ``[C, *y.shape]``).
    ``deferred``: a set to add the plain matrix groups to that are better materialized;
    they are left factored (``Block.deferred``)."""
    cache: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
    proj = plan.projection
    tied = _tied_groups(plan, uses)
    ties: Dict[int, Tuple[list, list]] = {}  # a tied weight's embedding and head factors

    def ad(i: int, use: Use, lay: Layout, g: torch.Tensor, rows: int):
        if i not in cache:
            cache[i] = matrix_factors(use, lay, n, g, rows)
        return cache[i]

    def rows_of(use: Use) -> int:
        if use.weight is None:
            return use.y.shape[-1]
        p = plan.params[use.weight.name]
        return p.shape[1] if use.weight.transposed else p.shape[0]

    parts: Dict[int, list] = {}
    # a sum group's weight gradient over its matrix uses, added up in place: the uses with
    # token inputs last, so that they add their rows into the others' sum
    summed: Dict[int, torch.Tensor] = {}
    tokens: list = []
    materialized: Dict[int, Factor] = {}  # convolutions' gradients computed directly
    for i, (use, lay, g) in enumerate(uses):
        for role, ref in (("weight", use.weight), ("bias", use.bias)):
            k = None if ref is None else plan.group_of.get(ref.name)
            if k is None:
                continue
            grp = plan.groups[k]
            if grp.kind == "matrix":
                if role == "weight":
                    direct = _direct(plan, k, use, lay, g, n, stacked)
                    if direct is not None:
                        materialized[k] = direct
                    else:
                        parts.setdefault(k, []).append(ad(i, use, lay, g, rows_of(use)))
                continue
            p = plan.params[ref.name]
            projected = proj is not None and k in proj.dims
            if use.op not in MATRIX_OPS:
                G = elementwise_grads(use, role, lay, n, g, p.shape)
            else:
                A, D = ad(i, use, lay, g, rows_of(use))
                if role == "bias":
                    G = bias_grads(use, D, p.numel())
                elif k in tied:
                    ties.setdefault(k, ([], []))[0 if use.op == "embedding" else 1].append((A, D))
                    continue
                elif projected and use.ctx.get("groups", 1) == 1:  # a tied weight's use
                    parts.setdefault(k, []).append(
                        proj.use_part(k, A, D, ref.transposed, p.shape[0])
                    )
                    continue
                elif not projected:
                    args = (p.shape, ref.transposed, p.shape[0], use.ctx.get("groups", 1))
                    if A.dtype == torch.long:
                        tokens.append((k, A, D, args))
                    else:
                        summed[k] = _add_weight_grads(summed.get(k), A, D, args)
                    continue
                else:
                    G = weight_grads(
                        A, D, p.shape, ref.transposed, p.shape[0], use.ctx.get("groups", 1)
                    ).reshape(n, D.shape[2], -1)
            parts.setdefault(k, []).append(proj.param_part(k, G, p.shape) if projected else G)
    for k, A, D, args in tokens:
        summed[k] = _add_weight_grads(summed.get(k), A, D, args)
    for k, G in summed.items():
        parts.setdefault(k, []).insert(0, G)
    factors: Dict[int, Factor] = dict(materialized)
    for k, (emb, head) in ties.items():
        A, D = live_positions(
            torch.cat([a for a, _ in head], 1), torch.cat([d for _, d in head], 1)
        )
        factors[k] = Factor(
            torch.cat([a for a, _ in emb], 1),
            torch.cat([d for _, d in emb], 1),
            0.0,
            False,
            Factor(A, D, 0.0),
        )
    for k, ps in parts.items():
        grp = plan.groups[k]
        if grp.kind == "sum":
            G = ps[0]
            for p in ps[1:]:
                G = G + p
            factors[k] = Factor(None, G.unsqueeze(1), 0.0, True)
            continue
        As = [a for a, _ in ps]
        if any(a.dtype == torch.long for a in As) and not all(a.dtype == torch.long for a in As):
            dt = ps[0][1].dtype
            As = [one_hot(a, grp.vocab, dt) if a.dtype == torch.long else a for a in As]
        A = As[0] if len(As) == 1 else torch.cat(As, 1)
        D = ps[0][1] if len(ps) == 1 else torch.cat([d for _, d in ps], 1)
        f = Factor(A, D, 1.0 if grp.bias is not None else 0.0)
        if proj is not None and k in proj.dims:
            factors[k] = Factor(None, proj.matrix_group(k, grp, f).unsqueeze(1), 0.0, True)
        elif deferred is not None and grp.conv_groups == 1 and wants_materialized(grp, f, stacked):
            factors[k] = f
            deferred.add(k)
        else:
            factors[k] = choose_form(grp, f, stacked)
    return factors


def extract(
    plan: ModelPlan,
    spec: OutputSpec,
    state: Dict[str, torch.Tensor],
    x: tuple,
    channels: Optional[slice] = None,
    defer: bool = False,
) -> Block:
    """Features of one block of examples (``channels``: a slice of the output channels);
    ``x`` ends with the targets where ``spec`` has them. ``defer``: the groups better
    materialized are left factored, in ``Block.deferred``."""
    n = x[0].shape[0]
    x, ys = spec.split(x)

    def rows(o, ys=ys):
        f = spec.rows(o, ys)
        return f if channels is None else f[:, channels]

    factors: Dict[int, Factor] = {}
    deferred: Set[int] = set()
    C = None
    if plan.groups:
        trace = plan.trace_for(x)
        if trace is None:
            raise TraceMismatch("model: inputs of this shape were not probed")
        out, uses = run_captured(plan, state, x, trace, spec.many)
        f = rows(out)
        C = f.shape[1]
        keep = [
            (u, trace.layouts[i])
            for i, u in enumerate(uses)
            if trace.layouts[i] is not None and any(nm in plan.group_of for nm in u.names())
        ]
        grads = _output_grads(f, [u.y for u, _ in keep])
        factors = group_factors(
            plan,
            [(u, lay, g) for (u, lay), g in zip(keep, grads)],
            n,
            spec.stacked,
            deferred if defer else None,
        )
    if plan.dense:
        G = dense_jacobian(plan, state, x, rows, ys)
        C = G.shape[1]
        if plan.projection is not None and DENSE in plan.projection.dims:
            G = _project_dense(plan, G)
        factors[DENSE] = Factor(None, G.unsqueeze(1), 0.0, True)
    return Block(n, C, factors, deferred)


def _project_dense(plan: ModelPlan, G: torch.Tensor) -> torch.Tensor:
    """The dense group's projection: each parameter's own functionals, summed."""
    out, i = None, 0
    for name in plan.dense:
        p = plan.params[name]
        part = plan.projection.param_part(DENSE, G[..., i : i + p.numel()], p.shape, name + ":")
        out = part if out is None else out + part
        i += p.numel()
    return out


def fit_projection(plan: ModelPlan, spec: OutputSpec, state, x: tuple, k: int, seed: int) -> None:
    """Split ``k`` over the plan's groups by their gradient norms on the first examples of
    ``x`` (the weights ``state``; ``x`` cast and with its targets), and adopt that sketch."""
    plan.projection = None
    # one example at a time: exact features can be large (a tied embedding's gradient is
    # materialized), and only their norms are kept
    blocks = (
        extract(plan, spec, state, tuple(t[i : i + 1] for t in x))
        for i in range(min(SAMPLE, x[0].shape[0]))
    )
    plan.projection = fit(plan, k, seed, blocks)


def features(
    plan: ModelPlan,
    spec: OutputSpec,
    state,
    x,
    chunk: int,
    name: str,
    channels: Optional[slice] = None,
    defer: bool = False,
) -> Block:
    """Features of all of ``x``, extracted ``chunk`` examples at a time and concatenated."""
    n = x[0].shape[0]
    blocks = []
    for i in range(0, n, chunk):
        b = extract(plan, spec, state, tuple(t[i : i + chunk] for t in x), channels, defer)
        check_finite_block(b, name)
        blocks.append(b)
    return concat_blocks(blocks)


FEATURE_BUDGET = 1 << 29  # bytes of features held at once before the channels are chunked


def channel_chunks(
    plan: ModelPlan,
    spec: OutputSpec,
    x: tuple,
    n_total: int,
    dtype: torch.dtype,
    budget: int = FEATURE_BUDGET,
) -> List[Optional[slice]]:
    """Output channels in chunks whose features for ``n_total`` examples fit ``budget``
    (trace only: it sums over channels; other modes keep every channel at once)."""
    if not spec.stacked:
        return [None]
    x, _ = spec.split(x)
    one = tuple(t[:1] for t in x)
    trace = plan.trace_for(one) if plan.groups else None
    key = (tuple(plan.dense), tuple(tuple(g.names) for g in plan.groups))
    if trace is not None and key in trace.sizes:
        per, C = trace.sizes[key]
    else:
        per, C = _sizes(plan, spec, cast_inputs(one, dtype), model_state(plan, dtype))
        if trace is not None:
            trace.sizes[key] = (per, C)
    per_bytes = max(1, per * torch.finfo(dtype).bits // 8)
    cc = max(1, budget // (n_total * per_bytes))
    if cc >= C:
        return [None]
    return [slice(c, min(C, c + cc)) for c in range(0, C, cc)]


def _sizes(plan: ModelPlan, spec: OutputSpec, one: tuple, state) -> Tuple[int, int]:
    """Per example and channel, the elements kept: the output gradients of every use, and the
    larger of the factored and materialized forms of every group (an upper bound); and the
    output channels. From a pass on the one example ``one``."""
    per = sum(plan.params[n].numel() for n in plan.dense)
    if plan.groups:
        out, uses = run_captured(plan, state, one, plan.trace_for(one))
        per += sum(u.y.numel() for u in uses)
        sizes = {k: 0 for k in range(len(plan.groups))}
        for u in uses:
            k = plan.group_of.get(u.weight.name) if u.weight is not None else None
            if k is not None and plan.groups[k].kind == "matrix":
                sizes[k] += u.y.numel()
        per += sum(max(s, plan.group_size(k)) for k, s in sizes.items())
    else:
        with torch.no_grad():
            out = plan.forward(state, one)
    return per, spec.rows(out).shape[1]


def tangent_batches(
    plan: ModelPlan,
    spec: OutputSpec,
    dtype: torch.dtype,
    x1,
    x2=None,
    chunk: Optional[int] = None,
    channels: Optional[slice] = None,
    at_once: bool = False,
):
    """Native terms of the tangent kernel of ``x1`` against ``x2`` (None: itself) at the
    model's current weights, ``(side1, side2, C)`` for ``_backend.accumulate``, in batches to
    accumulate one after the other: first every group but those better materialized, then
    each of those alone, materialized into one buffer (per side) that the next reuses. A
    layer's per-example gradients then exist one layer at a time, and a fresh buffer's page
    faults are paid once (GPT-2-width at N = 64: 151 MB instead of 1.8 GB). ``at_once``: one
    batch holding every group (as the benchmarks time features and Grams apart)."""
    state = model_state(plan, dtype)
    sides = [
        features(
            plan, spec, state, cast_inputs(x, dtype), chunk or CHUNK, nm, channels, not at_once
        )
        for x, nm in ((x1, "x1"), (x2, "x2"))
        if x is not None
    ]

    def terms(blocks: List[Block]):
        b2 = blocks[1] if len(blocks) > 1 else None
        s1, s2 = to_terms(plan, blocks[0], b2, stacked=spec.stacked)
        return s1, s2, 1 if spec.stacked else blocks[0].C

    later = sorted(set().union(*(b.deferred for b in sides)))
    first = [Block(b.n, b.C, {k: f for k, f in b.factors.items() if k not in later}) for b in sides]
    if first[0].factors or not later:
        yield terms(first)
    bufs = [
        torch.empty(
            max(materialized_size(b.factors[k]) for k in b.deferred),
            dtype=dtype,
            device=b.factors[later[0]].D.device,
        )
        if b.deferred
        else None
        for b in sides
    ]
    for k in later:
        # a trace's features in their fastest order, where both sides take it
        fast = spec.stacked and not any(b.factors[k].materialized for b in sides)
        one = []
        for b, buf in zip(sides, bufs):
            f = b.factors.pop(k)  # (the other side may have materialized it already)
            f = f if f.materialized else materialize(plan.group(k), f, buf, fast)
            one.append(Block(b.n, b.C, {k: f}))
        yield terms(one)


def block_from_recorded(
    plan: ModelPlan, uses: List[Use], trace: Trace, state, x: tuple, cotangent: torch.Tensor
) -> Block:
    """Features of the gradient of the user's own loss, from a recorded backward pass:
    one channel, ``J_i^T u_i`` with ``u_i`` the loss gradient at example i's output."""
    n = cotangent.shape[0]
    check_trace(uses, trace)
    keep = [
        (u, trace.layouts[i])
        for i, u in enumerate(uses)
        if trace.layouts[i] is not None and any(nm in plan.group_of for nm in u.names())
    ]
    items = [
        (u, lay, (torch.zeros_like(u.y) if u.grad is None else u.grad).unsqueeze(0))
        for u, lay in keep
    ]
    block = Block(n, 1, group_factors(plan, items, n))
    if plan.dense:
        J = dense_jacobian(plan, state, x, lambda o, _: o.reshape(o.shape[0], -1))
        G = torch.einsum("nc,ncp->np", cotangent.reshape(n, -1).to(J.dtype), J)
        block.factors[DENSE] = Factor(None, G[:, None, None, :], 0.0, True)
    return block


RowsFn = Callable[[torch.Tensor], torch.Tensor]
