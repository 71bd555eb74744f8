"""The probe: which parameters the recorded uses explain, checked per example.

For each input shape, the forward pass is recorded on one example and on ``n`` examples (the
first being that one; as few as tell the examples apart, usually 2) to find each use's batch
layout (``layout.py``). The uses are grouped (``plan.py``), and on those ``n`` examples, from
the same recording, every grouped parameter's per-example gradients rebuilt from the factors
must equal autograd's, for a random output cotangent, compared through a combination of the
examples with distinct weights (``_mismatches``). A parameter that fails
(tied in a role no rule covers, used by an op without a rule, a layout that does not hold)
goes to the dense path, so no parameter is ever dropped, counted twice or attributed to the
wrong example.

The checks run in the dtype the kernel is computed in, at its precision (``_PRECISION``): a
float64 kernel's factors are checked to 1e-9, a float32 kernel's to 1e-4, far below any wrong
rule's error (a factor given to the wrong example, a missed use: order one) and far above the
rounding of two float32 orders of summation (1e-7 to 1e-5). A float64 probe also serves later
float32 calls; a float32 one is done again for a float64 call.
"""

from __future__ import annotations

import copy
import weakref
from collections import defaultdict
from typing import Dict, List, Optional, Set, Tuple

import torch

from .blocks import Block, summed_grads
from .extract import _output_grads, group_factors, param_ids, run_captured
from .layout import Layout, discover
from .ops import MATRIX_OPS, OpCapture, Use
from .outputs import output_tensors
from .plan import (
    Group,
    ModelPlan,
    Trace,
    cast_inputs,
    input_signature,
    model_state,
    param_signature,
)
from .rules import _aligned, expandable_dims

# model -> (its parameter signature, the probe's tolerance, groups, why, traces)
_PROBED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# dtype -> (relative tolerance of every check, the fraction of the whole gradient below which
# a parameter's gradient counts as zero: compared at that scale, as rounding cannot go below it)
_PRECISION = {torch.float64: (1e-9, 1e-6), torch.float32: (1e-4, 1e-2)}


def probe(plan: ModelPlan, x: tuple, seed: int = 0, dtype: torch.dtype = torch.float64) -> None:
    """Find the groups (first call) and the layouts of inputs shaped like ``x``, and move to
    the dense path every parameter whose factors do not reproduce autograd per example.
    ``dtype``: the dtype of the kernel to come; the checks run in it, at its precision."""
    tol = _PRECISION[dtype][0]
    sig = input_signature(x)
    if plan.implementation == "dense" or sig in plan.traces:
        check_deterministic(plan, x, dtype=dtype)
        return
    psig = param_signature(plan.model)
    hit = _PROBED.get(plan.model)
    fresh = not plan.traces
    if fresh and hit is not None and hit[0] == psig and hit[1] <= tol:
        plan.set_groups(copy.deepcopy(hit[2]), hit[3])
        plan.traces.update(hit[4])
        fresh = False
        if sig in plan.traces:
            check_deterministic(plan, x, dtype=dtype)
            return
    state = model_state(plan, dtype)
    x = cast_inputs(x, dtype)
    trace, uses, touched, seen = _discover(plan, state, x, tol)
    check_deterministic(plan, x, seen, dtype)  # before any check of factors on a random model
    if fresh:
        groups, why = _group(plan, uses, trace, touched)
        plan.set_groups(groups, why)
    else:
        bad = {nm for i, u in enumerate(uses) if trace.layouts[i] is None for nm in u.names()}
        plan.move_to_dense(bad & set(plan.group_of), "no batch layout explains its use here")
    plan.traces[sig] = trace
    _, batch, many = seen
    # the recording on n examples serves the check, unless a use is to be expanded to the batch
    _verify(
        plan, state, many, trace, seed, _PRECISION[dtype], None if trace.expand else (batch, uses)
    )
    _PROBED[plan.model] = (psig, tol, copy.deepcopy(plan.groups), dict(plan.why), dict(plan.traces))


_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def check_deterministic(
    plan: ModelPlan, x: tuple, seen=None, dtype: torch.dtype = torch.float64
) -> None:
    """Refuse a model whose forward pass is random (dropout in training mode called as a
    function, noise layers) or couples the examples of a batch (an example's output depends
    on the others: ``h - h.mean(0)``): its kernel would be random, or not the kernel of the
    function the model computes on a batch. Checked again whenever a module's training flag
    or a parameter changes. ``seen``: the probe's passes in ``dtype`` (``_discover``: the first
    example alone, a batch of several, and that batch's inputs); where the first example's
    output is the same in both, the model is neither, and nothing is run again."""
    tol = _PRECISION[dtype][0]
    key = (param_signature(plan.model), tuple(m.training for m in plan.model.modules()))
    done = _CHECKED.get(plan.model)
    if done is not None and done[0] == key and done[1] <= tol:
        return
    state = model_state(plan, dtype)
    with torch.no_grad():
        if seen is not None:
            first, batch, xs = seen
            alone = [first]
            batch = batch.detach()
            gap = _relative_gap(first, batch[:1]) if _comparable(first, batch) else None
            if gap is not None and gap <= tol:
                _CHECKED[plan.model] = (key, tol)
                return
            # they differ: a second pass on the first example alone tells random from coupled
            a, b = first, _batched(plan.forward(state, tuple(t[:1] for t in xs)), 1)
        else:
            xs = cast_inputs(tuple(t[:3] for t in x), dtype)
            a = _batched(plan.forward(state, xs), xs[0].shape[0])
            b = _batched(plan.forward(state, xs), xs[0].shape[0])
            batch = a
            alone = (
                [
                    _batched(plan.forward(state, tuple(t[i : i + 1] for t in xs)), 1)
                    for i in range(xs[0].shape[0])
                ]
                if xs[0].shape[0] > 1
                else None
            )
    n = xs[0].shape[0]
    if _comparable(a, b):
        diff = _relative_gap(a, b)
        if diff is None or diff > tol:
            raise ValueError(
                f"model: two forward passes on the same inputs differ (relative difference "
                f"{'NaN' if diff is None else f'{diff:.1e}'}): the model is random, so its "
                "kernel would be too (dropout called as F.dropout(x, p, self.training) in "
                "training mode?); call model.eval() or make the forward pass deterministic"
            )
        if alone is not None and all(_comparable(o, batch[:1]) for o in alone):
            diff = _relative_gap(batch[: len(alone)], torch.cat(alone))
            if diff is None or diff > tol:
                raise ValueError(
                    f"model: an example's output depends on the other examples of its batch "
                    f"(run alone and in a batch of {n}, the outputs differ by "
                    f"{'NaN' if diff is None else f'{diff:.1e}'}, relative): a batch "
                    "statistic such as h - h.mean(0) couples them, so no per-example kernel "
                    "describes the model; compute such statistics per example (or keep them "
                    "fixed, as BatchNorm does in eval mode)"
                )
    _CHECKED[plan.model] = (key, tol)


def _comparable(a, b) -> bool:
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.shape[1:] == b.shape[1:]
        and a.is_floating_point()
        and a.numel() > 0
    )


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    """max |a - b| / max |a| over the finite entries; None if they differ in which are."""
    if a.shape != b.shape:
        return None
    fin = torch.isfinite(a) & torch.isfinite(b)
    if not (torch.equal(fin, torch.isfinite(a)) and torch.equal(a[~fin].isnan(), b[~fin].isnan())):
        return None
    if not fin.any():
        return 0.0
    scale = max(a[fin].abs().max().item(), 1e-300)
    return (a[fin] - b[fin]).abs().max().item() / scale


def _take(x: tuple, idx: List[int]) -> tuple:
    i = torch.tensor(idx, device=x[0].device)
    return tuple(t.index_select(0, i) for t in x)


def _record(plan, state, x, touched=None) -> Tuple[torch.Tensor, List[Use]]:
    with (
        torch.enable_grad(),
        OpCapture(param_ids(plan, state), x[0].shape[0], copy_outputs=True, touched=touched) as cap,
    ):
        out = plan.forward(state, x)
    return _batched(out, x[0].shape[0]), cap.uses


def _batched(out, n: int) -> torch.Tensor:
    """What the model returned, as one ``[n, F]`` tensor: every floating tensor in it whose
    first dim is the batch (a ``ModelOutput``'s logits and hidden states alike), so the probe
    checks every parameter that reaches any of them."""
    ts = [
        t.reshape(n, -1)
        for t in output_tensors(out)
        if t.is_floating_point() and t.dim() > 0 and t.shape[0] == n
    ]
    if not ts:
        raise TypeError(
            f"model: returned a {type(out).__name__} holding no floating tensor with the batch "
            "first; return the output tensor (or a tuple, dict or ModelOutput holding it)"
        )
    return ts[0] if len(ts) == 1 else torch.cat(ts, 1)


def _discover(plan, state, x, tol: float):
    """Layouts of every use, from a forward pass on one example and one on ``n``: as few as
    tell the examples apart (2, unless a size of the model is 2). Also the uses recorded on
    the ``n`` (the check runs on them) and the passes (``check_deterministic``): the first
    example's output, the batch's (with its graph) and the batch's inputs."""
    touched: Dict[str, set] = {}
    out1, uses1 = _record(plan, state, _take(x, [0]), touched)
    sizes = {s for u in uses1 for t in (u.x, u.y) if t is not None for s in t.shape}
    sizes |= set(out1.shape)
    n = next(k for k in range(2, 64) if k not in sizes)
    many = _take(x, [i % x[0].shape[0] for i in range(n)])
    outn, usesn = _record(plan, state, many)
    sigs = [u.signature() for u in uses1]
    if [u.signature() for u in usesn] != sigs:
        layouts: List[Optional[Layout]] = [None] * len(uses1)
    else:
        layouts = [_layout(u1, un, n, plan, tol) for u1, un in zip(uses1, usesn)]
    return Trace(sigs, layouts), usesn, touched, (out1.detach(), outn, many)


def _layout(u1: Use, un: Use, n: int, plan: ModelPlan, tol: float) -> Optional[Layout]:
    lay = discover(u1.batched, un.batched, n, expandable_dims(u1), tol)
    if lay is None:
        return None
    if u1.op in ("add", "mul", "expand"):  # the parameter must not vary along the batch dim
        p = plan.params[u1.weight.name]
        shape = u1.weight.shape or tuple(p.shape)
        try:
            if _aligned(u1, shape, u1.y.dim())[lay.dim] != 1:
                return None
        except ValueError:
            return None
    return lay


def _group(
    plan: ModelPlan, uses: List[Use], trace: Trace, touched: Dict[str, set]
) -> Tuple[List[Group], Dict[str, str]]:
    """Groups of the parameters the recorded uses cover; why every other one goes dense."""
    uses_of: Dict[str, List[Tuple[int, str]]] = defaultdict(list)
    why: Dict[str, str] = {}
    bad: Set[str] = set()
    for i, u in enumerate(uses):
        for role, ref in (("weight", u.weight), ("bias", u.bias)):
            if ref is None or ref.name not in plan.params:
                continue
            uses_of[ref.name].append((i, role))
            if trace.layouts[i] is None:
                bad.add(ref.name)
                why[ref.name] = f"no batch layout explains its use by {u.op}"
    groups: Dict[str, Group] = {}
    for name, lst in uses_of.items():
        if name in bad:
            continue
        if touched.get(name):
            bad.add(name)
            why[name] = "also used by " + ", ".join(sorted(touched[name])) + " (no factored rule)"
            continue
        ops = tuple(sorted({uses[i].op for i, _ in lst}))
        shape = tuple(plan.params[name].shape)
        orient = {uses[i].weight.transposed for i, r in lst if r == "weight"}
        cgroups = {uses[i].ctx.get("groups", 1) for i, _ in lst}
        if (
            all(r == "weight" and uses[i].op in MATRIX_OPS for i, r in lst)
            and len(orient) == 1
            and len(cgroups) == 1
        ):
            vocab = shape[0] if "embedding" in ops else 0
            groups[name] = Group(
                "matrix", name, None, shape, orient.pop(), vocab, cgroups.pop(), ops, len(lst)
            )
        else:
            groups[name] = Group("sum", name, None, shape, ops=ops, uses=len(lst))
    for name, g in list(groups.items()):  # fold a bias into its weight's group
        if g.kind != "matrix":
            continue
        biases = {uses[i].bias.name if uses[i].bias is not None else None for i, _ in uses_of[name]}
        if len(biases) != 1 or None in biases:
            continue
        b = biases.pop()
        bg = groups.get(b)
        rows = g.shape[1] if g.transposed else g.shape[0]
        if (
            bg is None
            or plan.params[b].numel() != rows
            or any(
                r != "bias"
                or uses[i].weight is None
                or uses[i].weight.name != name
                or uses[i].weight.rows != uses[i].bias.rows
                for i, r in uses_of[b]
            )
        ):
            continue
        g.bias = b
        del groups[b]
    for name in plan.params:
        if name not in groups and name not in why:
            why[name] = (
                "used by " + ", ".join(sorted(touched[name])) + " (no factored rule)"
                if touched.get(name)
                else "no recognized operation applies it"
            )
    for g in groups.values():
        for nm in g.names:
            roles = (
                "several roles, summed per use"
                if g.kind == "sum" and set(g.ops) & set(MATRIX_OPS)
                else ""
            )
            why[nm] = f"{', '.join(g.ops)} (x{g.uses}){'; ' + roles if roles else ''}"
    ordered = [groups[n] for n in plan.params if n in groups]
    return ordered, why


def _verify(
    plan: ModelPlan, state, x: tuple, trace: Trace, seed: int, precision, recorded=None
) -> None:
    """Per-example check of every grouped parameter against autograd, in the state's dtype to
    ``precision`` (``_PRECISION``). ``recorded``: the output and uses of a recording of ``x``
    under ``trace`` (its graph kept), to check instead of recording the forward pass again."""
    for _ in range(4):  # moving a parameter to dense can change another's group
        if not plan.groups:
            return
        try:
            out, uses = recorded or run_captured(plan, state, x, trace)
        except RuntimeError:  # an expanded output that the rest of the model rejects
            expanded = [i for i, lay in enumerate(trace.layouts) if lay is not None and lay.expand]
            if not expanded:
                raise
            names = {nm for i in expanded for nm in trace.signatures[i][1:]}
            plan.move_to_dense(
                names & set(plan.group_of),
                "its batch-independent use could not be expanded to the batch",
            )
            for i in expanded:
                trace.layouts[i] = None
            continue
        bad = _mismatches(plan, state, x, trace, out, uses, seed, precision)
        if not bad:
            return
        plan.move_to_dense(bad, "its factors do not reproduce autograd's per-example gradient")
    if plan.groups:
        raise RuntimeError("pathkernel: the probe did not settle; please report this model")


def _mismatches(plan, state, x, trace, out, uses, seed, precision) -> Set[str]:
    """The grouped parameters whose factors do not give autograd's per-example gradients.

    The per-example gradients are compared through one combination of them, ``Σ_i w_i g_i``
    with distinct weights: rebuilt from the factors with each example's part weighted by its
    ``w_i``, and by autograd as the gradient of ``Σ_i w_i f_i``, one backward pass. Factors
    that give a wrong gradient to an example, or one example's gradient to another (a swap
    leaves the plain sum as it was), change it; n backward passes and n stacked gradients
    (7 GiB for a 67M-parameter model) are saved."""
    n = x[0].shape[0]
    out = _batched(out, n)
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    # distinct powers of two with random signs: scaling a cotangent by one is exact, so a
    # model that rounds inside (a float32 norm in a float64 model) rounds both sides alike
    sign = torch.randint(0, 2, (n,), generator=gen).to(out.dtype) * 2 - 1
    w = (sign * 2.0 ** -torch.arange(n, dtype=out.dtype)).to(out.device)
    f = (out * r).reshape(n, -1).sum(1, keepdim=True)
    keep = [
        (u, trace.layouts[i])
        for i, u in enumerate(uses)
        if trace.layouts[i] is not None and any(nm in plan.group_of for nm in u.names())
    ]
    grads = _output_grads(f, [u.y for u, _ in keep])
    factors = group_factors(plan, [(u, lay, g) for (u, lay), g in zip(keep, grads)], n)
    # each example's part weighted by its w_i, then summed straight from the factors (one
    # contraction over examples and positions: no per-example gradient is built). Weighted
    # after the factors are assembled: a weighted cotangent would hide factors that hand
    # every example's part, A and D alike, to another example
    mine = summed_grads(plan, Block(n, 1, factors), w)
    names = [nm for g in plan.groups for nm in g.names]
    gs = torch.autograd.grad(
        (w * f[:, 0]).sum(), [state[nm] for nm in names], retain_graph=True, allow_unused=True
    )
    auto = {nm: torch.zeros_like(state[nm]) if g is None else g for nm, g in zip(names, gs)}
    # a gradient that is zero but for rounding (a key bias under softmax) is compared at the
    # scale of the whole gradient: what is below it cannot move the kernel in this dtype
    tol, zero = precision
    norms = {nm: a.norm().item() for nm, a in auto.items()}  # no squared copy of each
    floor = zero * sum(v * v for v in norms.values()) ** 0.5
    bad = set()
    for nm, a in auto.items():
        m = mine.get(nm)
        m = torch.zeros_like(a) if m is None else m.reshape(a.shape)
        if (m - a).norm() > tol * max(norms[nm], floor, 1e-30) + 1e-300:
            bad.add(nm)
    return bad
