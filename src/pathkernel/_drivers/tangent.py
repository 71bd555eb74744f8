"""``tangent_kernel``: the empirical tangent kernel of a PyTorch model."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import _backend
from .._autograd import with_autograd
from .._capture.extract import channel_chunks, fit_projection, tangent_batches
from .._capture.outputs import OutputsArg, OutputSpec
from .._capture.plan import ModelPlan, call_model, cast_inputs, check_model, model_state
from .._capture.probe import probe
from .._capture.projection import check_project
from .._checks import (
    as_inputs,
    as_targets,
    check_batch_size,
    check_inputs_match,
    check_same_features,
    check_same_keys,
    input_keys,
    resolve_dtype,
    run_model_once,
    split_targets,
)
from .collective import Collective


def prepare(
    model: nn.Module,
    x1,
    x2,
    outputs: OutputsArg,
    implementation: str,
    dtype,
    batch_size,
    targets,
    project=None,
    seed=0,
):
    """Validate everything, build and probe the plan (and fit its projection). Returns
    (plan, spec, dtype, x1, x2), the inputs followed by their targets where ``targets`` is
    given."""
    check_model(model)
    project = check_project(project, seed)
    spec = OutputSpec(outputs, targets is not None)
    y1, y2 = split_targets(targets, x2 is not None, ("x1", "x2"))
    check_batch_size(batch_size)
    keys = input_keys(x1, "x1")
    x1 = as_inputs(x1, "x1")
    check_inputs_match(model, x1, "x1")
    if x2 is not None:
        check_same_keys(keys, input_keys(x2, "x2"), "x1", "x2")
        x2 = as_inputs(x2, "x2")
        check_inputs_match(model, x2, "x2")
        check_same_features(x1, x2)
    dtype = resolve_dtype(dtype, model)
    run_model_once(model, x1, "x1", keys)
    if x2 is not None:
        run_model_once(model, x2, "x2", keys)
    plan = ModelPlan(model, implementation, keys)
    probe(plan, x1, dtype=dtype)
    if x2 is not None:
        probe(plan, x2, dtype=dtype)
    if targets is not None:
        x1 = x1 + (as_targets(y1, x1[0].shape[0], "targets (x1)", x1[0].device),)
        if x2 is not None:
            x2 = x2 + (as_targets(y2, x2[0].shape[0], "targets (x2)", x2[0].device),)
    if project is not None:  # k split by the gradient norms of x2's first examples (or x1's)
        first = cast_inputs(x1 if x2 is None else x2, dtype)
        fit_projection(plan, spec, model_state(plan, dtype), first, project, seed)
    return plan, spec, dtype, x1, x2


@with_autograd
def tangent_kernel(
    model: nn.Module,
    x1,
    x2=None,
    *,
    outputs: OutputsArg = "trace",
    targets=None,
    implementation: str = "auto",
    dtype: Optional[torch.dtype] = None,
    batch_size: Optional[int] = None,
    project: Optional[int] = None,
    seed: int = 0,
    group=None,
) -> Optional[torch.Tensor]:
    """Empirical tangent kernel ``K(x, x') = J(x) J(x')^T`` of ``model`` at its current weights.

    Args:
        model: a ``torch.nn.Module`` (in eval mode if it has BatchNorm or Dropout).
        x1: inputs, batch first (integer tokens allowed): a tensor, a tuple of tensors (the
            model's positional arguments) or a dict of them (its keyword arguments, e.g.
            ``{"input_ids": ids, "attention_mask": mask}``).
        x2: second inputs; ``None`` means ``x1`` against itself (symmetric, half the work).
        outputs: ``"trace"`` (sum over outputs), ``"full"`` (the C x C block), an int (one
            output), or a callable mapping the model output to one scalar per example (with
            ``targets``: a callable ``(output, target)``, e.g. ``pathkernel.losses.cross_entropy``).
        targets: per-example targets, batch first (``y1``, or ``(y1, y2)`` with ``x2``): the
            kernel is then that of the per-example losses ``outputs(f(x), y)``, i.e. of their
            parameter gradients (TracIn's, TRAK's features).
        implementation: ``"factored"`` (per-layer factors of Linear/Conv/Embedding only),
            ``"dense"`` (per-example Jacobians with torch.func), or ``"auto"`` (factored where
            a rule exists, dense for every other parameter).
        dtype: ``torch.float32`` or ``torch.float64``: precision of the computation and output
            (default: the model's).
        batch_size: examples per forward/backward pass when extracting features.
        project: ``k``: each example's gradient replaced by a ``k``-dimensional random
            projection (unbiased for the inner products; an approximation, exact for groups
            small enough to keep whole), read off the per-layer factors without forming the
            gradient. For models with very many parameters; see the README's "Projected
            features". ``None``: exact.
        seed: the projection's seed (the same seed gives the same projection everywhere).
        group: a collective call on a torch.distributed group (as in ``path_kernel``): the
            rows are split among the ranks; rank 0 returns the kernel, the others ``None``.

    Returns:
        ``[N1, N2]``, or ``[N1, N2, C, C]`` for ``outputs="full"``.
    """
    coll = Collective(group, "tangent_kernel")
    if coll.active:
        return _collective(
            coll, model, x1, x2, outputs, implementation, dtype, batch_size, targets, project, seed
        )
    plan, spec, dtype, x1, x2 = prepare(
        model, x1, x2, outputs, implementation, dtype, batch_size, targets, project, seed
    )
    n1 = x1[0].shape[0]
    n2 = n1 if x2 is None else x2[0].shape[0]
    out = None
    for channels in channel_chunks(plan, spec, x1, n1 + (0 if x2 is None else n2), dtype):
        for side1, side2, C in tangent_batches(plan, spec, dtype, x1, x2, batch_size, channels):
            if out is None:
                out = torch.zeros(n1, n2, C, C, dtype=dtype, device=x1[0].device)
            _backend.accumulate(out, side1, side2)
    return spec.finish(out)


def _collective(
    coll: Collective,
    model,
    x1,
    x2,
    outputs,
    implementation,
    dtype,
    batch_size,
    targets,
    project,
    seed,
):
    """The tangent kernel as the one-checkpoint path kernel of the current weights, its row
    blocks split among the ranks."""
    from .path_kernel import run_plan
    from .tiling import make_plan

    plan, spec, dtype, x1, x2 = coll.agree(
        lambda: prepare(model, x1, x2, outputs, implementation, dtype, batch_size, targets)
    )  # the projection is fitted by the path kernel's plan below, on x1 as here
    keys = plan.keys
    x1, y1 = spec.split(x1)
    x2, y2 = (None, ()) if x2 is None else spec.split(x2)
    n1 = x1[0].shape[0]
    n2 = n1 if x2 is None else x2[0].shape[0]
    C = 1
    if spec.full:
        with torch.no_grad():
            C = spec.rows(call_model(model, tuple(t[:1] for t in x1), keys)).shape[1]
    if keys:  # passed on as given: keyword inputs
        x1 = dict(zip(keys, x1))
        x2 = None if x2 is None else dict(zip(keys, x2))
    # path_kernel's order: train (x2, or x1 alone), then query (x1)
    path_targets = None if targets is None else y1[0] if x2 is None else (y2[0], y1[0])
    kernel = n1 * n2 * C * C * torch.finfo(dtype).bits // 8
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    p = make_plan(
        coll,
        model,
        [(weights, 1.0)],
        x1 if x2 is None else x2,
        None if x2 is None else x1,
        outputs,
        None,
        max(2 << 30, 4 * kernel),
        dtype,
        False,
        None,
        implementation,
        measure=False,
        targets=path_targets,
        project=project,
        seed=seed,
    )
    return run_plan(p, resume=False, progress=False)
