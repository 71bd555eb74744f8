"""``pathkernel bench`` rows for real architectures: trace NTK of ``x`` against itself, float32,
against the torch.func recipe (vmap of jacrev, then the contraction) in the same process.

Each row also splits pathkernel's time into the per-example gradient stage (forward pass,
one vmapped backward pass per output channel, materialized per-example gradients) and the
Gram stage (the native accumulation), counts the FLOPs of each and prints how far each runs
from the sgemm rate measured in the same run, and the share of parameters on the dense path.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from .architectures import ARCHITECTURES, architecture
from .workloads import best_time, flop_limit, gemm_rate, paired_best, torch_func_ntk


def _flops(model, x) -> Tuple[float, float, float]:
    """(per-example-gradient FLOPs, Gram FLOPs, dense share) of the trace NTK of ``x``."""
    from .._capture.describe import describe
    from .._capture.extract import features, run_captured
    from .._capture.outputs import OutputSpec
    from .._capture.plan import ModelPlan, model_state
    from .._capture.probe import probe
    from .._drivers.tiling import use_flops

    spec = OutputSpec("trace")
    plan = ModelPlan(model, "auto")
    probe(plan, (x,), dtype=torch.float32)
    state = model_state(plan, torch.float32)
    n = x.shape[0]
    one = (x[:1],)
    out, uses = run_captured(plan, state, one, plan.trace_for(one))
    C = out.reshape(1, -1).shape[1]
    fwd = sum(use_flops(u) for u in uses)
    block = features(plan, spec, state, (x[: min(n, 8)],), 8, "x")
    mat = gram = 0.0
    for k, f in block.factors.items():
        S, dd = f.D.shape[1], f.D.shape[3]
        if f.materialized:
            P = dd
            gram += 2.0 * C * P
            if k >= 0 and plan.groups[k].kind == "matrix":  # built from factors by a GEMM
                S_use = sum(
                    u.y.numel() // u.y.shape[-1]
                    for u in uses
                    if u.weight is not None and u.weight.name == plan.groups[k].weight
                )
                mat += 2.0 * S_use * C * P
        else:
            da = f.A.shape[-1] if f.A.dim() == 3 else 2 * S
            gram += 2.0 * S * S * (da + C * dd)
    pairs = n * (n + 1) / 2
    return n * (C * fwd + mat), pairs * gram, describe(model, x[:4]).dense_share


def architecture_rows(quick: bool, row) -> List:
    from .._backend import accumulate
    from .._capture.extract import tangent_batches
    from .._drivers.tangent import prepare, tangent_kernel

    rate = gemm_rate(1024 if quick else 2048)
    rows = []
    for name, (N, what, _) in ARCHITECTURES.items():
        n = N // 2 if quick else N
        model, x = architecture(name, n)
        tangent_kernel(model, x)  # warm: probe, caches
        ours, peer = paired_best(
            lambda: tangent_kernel(model, x), lambda: torch_func_ntk(model, x), 1 if quick else 2
        )
        plan, spec, dtype, x1, _ = prepare(model, x, None, "trace", "auto", None, None, None)
        t_grad = best_time(lambda: next(tangent_batches(plan, spec, dtype, x1, at_once=True)), 2)
        s1, s2, _ = next(tangent_batches(plan, spec, dtype, x1, at_once=True))
        out = torch.zeros(n, n, 1, 1)
        t_gram = best_time(lambda: accumulate(out, s1, s2), 2)
        f_grad, f_gram, dense = _flops(model, x)
        limit = flop_limit(model, x, "trace", rate)
        note = (
            f"{limit / ours:.0%} of the FLOP limit ({limit:.3f} s); "
            f"dense {100 * dense:.0f}%; per-example grads {f_grad / 1e9:.2f} GFLOP in "
            f"{t_grad:.3f} s ({f_grad / t_grad / rate:.0%} of sgemm); Gram "
            f"{f_gram / 1e9:.2f} GFLOP in {t_gram:.3f} s ({f_gram / t_gram / rate:.0%})"
        )
        rows.append(row(name, f"{what}, N={n}", ours, {"torch.func": peer}, note))
    ratios = [r.peers["torch.func"] / r.ours for r in rows]
    geo = 1.0
    for r in ratios:
        geo *= r ** (1 / len(ratios))
    rows[-1].note += f"\n  geometric mean of the architecture ratios: {geo:.2f}x"
    return rows
