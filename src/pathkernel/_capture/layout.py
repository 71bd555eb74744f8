"""Where the examples are in an operation's operands: the batch layout of each use.

Inside a model the batch is not always dim 0: attention runs sequence-first (``[L, N, E]``),
GPT-2's ``Conv1D`` flattens ``[N, T, d]`` to ``[N*T, d]``, attention's out-projection sees
``[L*N, E]`` (positions major), and position ids of shape ``[1, T]`` do not depend on the
example at all. The layout of each use is found once per input shape by running the forward
pass on one example and on ``n`` examples whose first is that example, and matching values:
the batch dim is the one whose slice 0 reproduces the one-example activation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Layout:
    dim: int  # the batch dim of the use's batched tensor
    per: int = 1  # > 1: that dim holds n * per entries (examples flattened with positions)
    batch_major: bool = True  # flattened as (n, per) rather than (per, n)
    expand: bool = False  # independent of the example: the output is expanded along dim


def batch_first(t: torch.Tensor, layout: Layout, n: int, lead: int = 0) -> torch.Tensor:
    """``t`` (with ``lead`` extra leading dims) with its examples moved to dim 0:
    ``[n, *lead dims, *other dims]``; a flattened dim keeps its ``per`` positions in place."""
    d = lead + layout.dim
    if layout.per == 1:
        return t.movedim(d, 0)
    if layout.batch_major:
        return t.unflatten(d, (n, layout.per)).movedim(d, 0)
    return t.unflatten(d, (layout.per, n)).movedim(d + 1, 0)


def _same(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    if a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-300) if a.numel() else 1.0
    return bool(((a - b).abs() <= tol * scale).all())


def discover(
    one: torch.Tensor,
    many: torch.Tensor,
    n: int,
    expandable: Optional[int] = None,
    tol: float = 1e-9,
) -> Optional[Layout]:
    """The layout of a batched tensor from its value on one example (``one``) and on ``n``
    examples whose first is that one (``many``); None when no layout explains them.
    ``expandable``: how many leading dims may carry the batch (default: all); ``tol``: the
    relative gap within which two values are the same (the probe's precision)."""
    if one.dim() != many.dim():
        return None
    lim = one.dim() if expandable is None else expandable
    diff = [d for d in range(one.dim()) if one.shape[d] != many.shape[d]]
    if not diff:  # does not depend on the batch: expand a size-1 dim, if it has one
        if not _same(one, many, tol):
            return None
        ones = [d for d in range(lim) if one.shape[d] == 1]
        return Layout(ones[0], expand=True) if ones else None
    if len(diff) != 1 or diff[0] >= lim:
        return None
    d = diff[0]
    s1, sn = one.shape[d], many.shape[d]
    if sn != n * s1:
        return None
    if s1 == 1:
        return Layout(d) if _same(many.narrow(d, 0, 1), one, tol) else None
    if _same(many.narrow(d, 0, s1), one, tol):
        return Layout(d, per=s1)
    idx = torch.arange(0, sn, n, device=many.device)
    if _same(many.index_select(d, idx), one, tol):
        return Layout(d, per=s1, batch_major=False)
    return None
