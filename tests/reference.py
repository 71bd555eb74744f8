"""Float64 oracles computed another way, and the one table of tolerances the tests use.

- ``reference_ntk``: full per-example Jacobians by torch.func, contracted densely.
- ``gram_reference``: the native accumulator's formula by brute force in numpy (each
  example's per-term feature materialized, then contracted).
"""

import numpy as np
import torch
from torch.func import functional_call, jacrev, vmap

from pathkernel._capture.dense import math_attention

# Relative tolerances (max |error| / max |reference|), by what is compared:
#   "pipeline": a kernel computed in that dtype by pathkernel vs the float64 reference
#   "gram":     the native accumulator in that dtype vs gram_reference
TOL = {
    ("pipeline", torch.float64): 1e-10,
    ("pipeline", torch.float32): 1e-4,
    ("gram", torch.float64): 1e-10,
    ("gram", torch.float32): 2e-4,
}


def assert_close(got, ref, dtype, kind="pipeline"):
    """``max |got - ref| <= TOL[kind, dtype] * max |ref|`` (got in any dtype, ref float64)."""
    tol = TOL[kind, dtype]
    got = torch.as_tensor(np.asarray(got)) if not isinstance(got, torch.Tensor) else got
    ref = torch.as_tensor(np.asarray(ref)) if not isinstance(ref, torch.Tensor) else ref
    assert tuple(got.shape) == tuple(ref.shape), (tuple(got.shape), tuple(ref.shape))
    err = (got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-300)
    assert err <= tol, f"relative error {err:.3e} > {tol}"


def jacobians(model, x, rows):
    """``[n, C, P]`` per-example Jacobians of ``rows(model(x))`` w.r.t. trainable parameters,
    in float64."""
    x = (x,) if isinstance(x, torch.Tensor) else tuple(x)
    x = tuple(t.double() if t.is_floating_point() else t for t in x)
    params = {n: p.detach().double() for n, p in model.named_parameters() if p.requires_grad}
    fixed = {n: p.detach().double() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update({n: b.double() if b.is_floating_point() else b for n, b in model.named_buffers()})

    def single(p, *xs):
        out = functional_call(model, {**fixed, **p}, tuple(t.unsqueeze(0) for t in xs))
        return rows(out)[0]

    try:
        with math_attention():  # fused attention kernels have no vmap rule before torch 2.3
            jac = vmap(jacrev(single), in_dims=(None,) + (0,) * len(x))(params, *x)
    except RuntimeError:  # no batching rule (RNNs in float64): one example at a time
        per = [jacrev(single)(params, *(t[i] for t in x)) for i in range(x[0].shape[0])]
        jac = {k: torch.stack([p[k] for p in per]) for k in params}
    n = x[0].shape[0]
    return torch.cat([j.reshape(n, j.shape[1], -1) for j in jac.values()], 2)


def rows_for(outputs):
    if outputs in ("trace", "full"):
        return lambda o: o.reshape(o.shape[0], -1)
    if isinstance(outputs, int):
        return lambda o: o.reshape(o.shape[0], -1)[:, outputs : outputs + 1]
    return lambda o: outputs(o).reshape(-1, 1)


def reference_ntk(model, x1, x2=None, outputs="trace"):
    J1 = jacobians(model, x1, rows_for(outputs))
    J2 = J1 if x2 is None else jacobians(model, x2, rows_for(outputs))
    K = torch.einsum("icp,jdp->ijcd", J1, J2)
    if outputs == "full":
        return K
    if outputs == "trace":
        return K.diagonal(dim1=2, dim2=3).sum(-1)
    return K[:, :, 0, 0]


def gram_reference(side1, side2, alpha, weights):
    """Brute-force float64: materialize each example's per-term feature and contract."""
    side2 = side1 if side2 is None else side2
    n1, n2 = side1[0].D.shape[0], side2[0].D.shape[0]
    C1, C2 = side1[0].D.shape[2], side2[0].D.shape[2]
    K = np.zeros((n1, n2, C1, C2))
    for t1, t2 in zip(side1, side2):
        D1, D2 = t1.D.double().numpy() * t1.scale, t2.D.double().numpy()
        if t1.A is None:
            F1, F2 = D1.sum(1), D2.sum(1)  # [n, C, dd]
            K += np.einsum("icd,jed->ijce", F1, F2)
        else:
            A1 = np.concatenate(
                [t1.A.double().numpy(), np.sqrt(t1.beta) * np.ones(t1.A.shape[:2] + (1,))], 2
            )
            A2 = np.concatenate(
                [t2.A.double().numpy(), np.sqrt(t2.beta) * np.ones(t2.A.shape[:2] + (1,))], 2
            )
            G1 = np.einsum("isa,iscd->icda", A1, D1)  # per-example materialized gradient
            G2 = np.einsum("jsa,jscd->jcda", A2, D2)
            K += np.einsum("icda,jeda->ijce", G1, G2)
    w = np.ones(n2) if weights is None else weights.double().numpy()
    return alpha * K * w[None, :, None, None]
