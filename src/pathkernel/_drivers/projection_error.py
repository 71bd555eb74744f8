"""``projection_error``: how far a projected kernel is from the exact one, on your model."""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from .tangent import tangent_kernel


def projection_error(
    model,
    x,
    ks: Sequence[int] = (256, 1024, 4096),
    *,
    outputs="trace",
    targets=None,
    seed: int = 0,
    dtype=None,
) -> List[Dict[str, float]]:
    """Relative Frobenius error of ``tangent_kernel(..., project=k)`` against the exact
    kernel of ``x`` with itself, for each ``k`` in ``ks``, next to the value a dense Gaussian
    sketch of the same ``k`` has in expectation, ``sqrt((tr(K)^2 / ||K||_F^2 + 1) / k)``.

    Use a sample small enough for the exact kernel to be cheap; the error of a projection
    on the whole data set is about the same (it depends on the kernel's spectrum, not on N).

    Returns:
        one dict per ``k``: ``{"k", "error", "gaussian"}``.
    """
    if outputs == "full":
        raise ValueError(
            "outputs: projection_error compares scalar kernels; use 'trace', an int or a callable"
        )
    kw = dict(outputs=outputs, targets=targets, dtype=dtype)
    K = tangent_kernel(model, x, **kw).double()
    norm = K.norm()
    ratio = float(torch.trace(K) ** 2 / norm**2)
    rows = []
    for k in ks:
        Kp = tangent_kernel(model, x, project=k, seed=seed, **kw).double()
        rows.append(
            {"k": k, "error": float((Kp - K).norm() / norm), "gaussian": ((ratio + 1) / k) ** 0.5}
        )
    return rows
