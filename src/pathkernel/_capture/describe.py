"""``describe``: which rule and which form each parameter of a model gets, and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from .._autograd import with_autograd
from .extract import extract, fit_projection
from .outputs import OutputsArg, OutputSpec
from .plan import DENSE, ModelPlan, call_model, cast_inputs, model_state
from .probe import probe
from .projection import check_project

FORMS = {
    "factored": "factor Grams: (A.A')(D.D') over positions, never the gradient itself",
    "materialized": "per-example gradient built from the factors (cheaper than the Grams here)",
    "elementwise": "per-example gradient read off the op directly (norms, added parameters)",
    "tied": "embedding and head factors of one weight: the rows of the tokens held, plus the "
    "head's factors over the other rows (never the whole vocabulary)",
    "dense": "per-example Jacobian by torch.func (or autograd where it cannot vmap)",
}


@dataclass
class ParameterRow:
    name: str
    shape: tuple
    form: str  # "factored" | "materialized" | "elementwise" | "tied" | "dense"
    why: str
    dims: Optional[int] = None  # with project=: the random dims of its group (None: exact)


@dataclass
class Description:
    """Per trainable parameter: the form its per-example gradient takes and why.

    ``print(pathkernel.describe(model, x))`` shows a table; ``dense_share`` is the fraction of
    parameters (by count of scalars) on the dense path.
    """

    rows: List[ParameterRow]
    projection: str = ""  # with project=: how k was split
    warnings: List[str] = field(default_factory=list)  # what makes the kernel suspect

    @property
    def dense_share(self) -> float:
        total = sum(_numel(r.shape) for r in self.rows)
        return sum(_numel(r.shape) for r in self.rows if r.form == "dense") / max(total, 1)

    def __str__(self) -> str:
        w = max([len(r.name) for r in self.rows] + [9])
        proj = bool(self.projection)
        head = f"{'parameter':<{w}}  {'shape':<18} {'form':<13} "
        lines = [head + ("projected   " if proj else "") + "why", "-" * (w + 60)]
        for r in self.rows:
            dims = (f"{r.dims} dims" if r.dims else "exact") if proj else ""
            lines.append(
                f"{r.name:<{w}}  {str(tuple(r.shape)):<18} {r.form:<13} "
                + (f"{dims:<12}" if proj else "")
                + r.why
            )
        counts = {f: sum(_numel(r.shape) for r in self.rows if r.form == f) for f in FORMS}
        total = max(sum(counts.values()), 1)
        lines.append("")
        lines += [
            f"{f:<13} {100 * c / total:5.1f}% of parameters: {FORMS[f]}"
            for f, c in counts.items()
            if c
        ]
        if proj:
            lines.append(self.projection)
        lines += ["warning: " + w for w in self.warnings]
        return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@with_autograd
def describe(
    model: nn.Module,
    x,
    *,
    outputs: OutputsArg = "trace",
    targets=None,
    implementation: str = "auto",
    project: Optional[int] = None,
    seed: int = 0,
) -> Description:
    """How ``tangent_kernel`` (and the other entry points) will treat each parameter.

    Args:
        model: the ``nn.Module``.
        x: a few example inputs (a tensor, a tuple or a dict of tensors, batch first).
        outputs: the output mode (it decides, per layer, between factored and materialized).
        targets: the examples' targets, with an ``outputs`` callable ``(output, target)``.
        implementation: as in ``tangent_kernel``.
        project, seed: as in ``tangent_kernel``: also shows how ``k`` is split over the
            parameters (fitted on these examples).

    Returns:
        A ``Description``; ``print`` it for a table.
    """
    from .._checks import (
        as_inputs,
        as_targets,
        check_inputs_match,
        input_keys,
        resolve_dtype,
        run_model_once,
    )

    project = check_project(project, seed)
    spec = OutputSpec(outputs, targets is not None)
    keys = input_keys(x, "x")
    x = as_inputs(x, "x")
    check_inputs_match(model, x, "x")
    run_model_once(model, x, "x", keys)
    plan = ModelPlan(model, implementation, keys)
    dtype = resolve_dtype(None, model)
    probe(plan, x, dtype=dtype)
    if targets is not None:
        x = x + (as_targets(targets, x[0].shape[0], "targets", x[0].device),)
    state = model_state(plan, dtype)
    if project is not None:
        fit_projection(plan, spec, state, cast_inputs(x, dtype), project, seed)
    sample = tuple(t[:4] for t in x)
    block = extract(plan, spec, state, cast_inputs(sample, dtype))
    rows = []
    for name, p in plan.params.items():
        k = plan.group_of.get(name)
        if k is None:
            form = "dense"
        elif plan.groups[k].kind == "sum":
            f = block.factors.get(k)
            form = (
                "tied"
                if f is not None and f.tied is not None
                else "elementwise"
                if not set(plan.groups[k].ops) & {"linear", "matmul", "addmm", "conv", "embedding"}
                else "materialized"
            )
        else:
            f = block.factors.get(k)
            form = "materialized" if f is not None and f.materialized else "factored"
        why = plan.why.get(name, "")
        if form == "dense" and implementation == "dense":
            why = "implementation='dense'"
        proj = plan.projection
        dims = None if proj is None else proj.dims.get(DENSE if k is None else k)
        rows.append(ParameterRow(name, tuple(p.shape), form, why, dims))
    return Description(
        rows,
        "" if plan.projection is None else plan.projection.summary(plan),
        _flat_outputs(plan, x, spec),
    )


FLAT = 1e-8  # outputs that vary less than this, relative to their size, across the examples


def _flat_outputs(plan: ModelPlan, x: tuple, spec: OutputSpec) -> List[str]:
    """A warning when the model's outputs barely depend on its input on these examples (a
    random-init network in eval mode with default BatchNorm statistics, say): its kernel is
    then nearly constant, and says little about the examples."""
    xs, ys = spec.split(tuple(t[:8] for t in x))
    if xs[0].shape[0] < 2:
        return []
    with torch.no_grad():
        f = spec.rows(call_model(plan.model, xs, plan.keys), ys).double()
    spread = float((f - f[:1]).abs().max())
    scale = float(f.abs().max())
    if spread > FLAT * max(scale, 1e-30) and spread > 1e-30:
        return []
    return [
        f"the outputs hardly vary across these {f.shape[0]} examples (largest difference "
        f"{spread:.1e}, outputs up to {scale:.1e}): the kernel will be nearly constant. A "
        "randomly initialized model in eval mode with default BatchNorm statistics does this; "
        "use trained weights (or a forward pass in training mode to set the statistics)"
    ]
