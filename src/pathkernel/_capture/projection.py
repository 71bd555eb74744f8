"""Projected features: ``k`` random dimensions in place of the exact per-example gradient.

Each parameter group ``l`` of the model plan gets ``k_l`` of the ``k`` dimensions. Row ``r``
of a group's sketch is the linear functional ``g -> u_r^T G v_r / sqrt(k_l)`` of the group's
gradient ``G`` seen as a matrix, with ``u_r`` and ``v_r`` vectors of independent random signs
(a Khatri-Rao sketch: each row is the outer product of two sign vectors, ``E[R^T R] = I``, so
projected inner products are unbiased). For a linear use ``G = sum_s D_s A_s^T`` it is read
off the factors, ``sum_s (u_r . D_s)(v_r . A_s)``: ``v`` on the activations, ``u`` on the output
gradients, never the ``rows x cols`` gradient. Unlike a Kronecker product of two small
projections (``k_out x k_in`` entries from shared vectors, whose variance grows like
``k_in + k_out`` times a dense Gaussian sketch's), every row has its own pair, so the error stays
within 2x of a dense Gaussian sketch of the same ``k`` (the fourth moment of a product of two
signs); the price is ``k_l (rows + cols)`` multiply-adds per position instead of
``k_in rows + k_out cols``. Where a convolution has more positions than that pays for, the
gradient is materialized first and the same functional applied to it.

The split: ``k_l`` proportional to the group's share of the squared gradient norm on a
sample (the first examples at the first weights) minimizes the summed variance (it then
equals a dense Gaussian sketch's, times that fourth moment); a group whose share reaches its
size stays exact, and every other group gets at least one dimension (so none is dropped).
The signs are a function of (seed, group, side, row) only: the same on every rank, resume and
checkpoint, and on every device.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .blocks import materialize
from .plan import DENSE

SAMPLE = 8  # examples whose gradient norms decide the split of k over groups
CACHE_BYTES = 1 << 30  # sign matrices kept between calls (regenerated beyond this)
_ROWS = 256  # rows of signs drawn per seeded generator
_WORK = 1 << 25  # elements of one intermediate product (examples are chunked to fit)


def check_project(project, seed) -> Optional[int]:
    if project is None:
        return None
    if isinstance(project, bool) or not isinstance(project, int) or project < 1:
        raise ValueError(
            f"project: expected None or a positive int (the projected dimension), got {project!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    return project


@dataclass
class Projection:
    """The sketch of one plan: ``dims[group] = k_l`` for the projected groups (the others
    exact), with the share of the squared gradient norm each group had on the sample."""

    k: int
    seed: int
    dims: Dict[int, int]
    share: Dict[int, float]
    exact: List[int]
    _cache: Dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def fingerprint(self) -> dict:
        # JSON-native (lists, not tuples): it is compared with the journal's header
        return {
            "k": self.k,
            "seed": self.seed,
            "dims": [[g, m] for g, m in sorted(self.dims.items())],
        }

    def summary(self, plan) -> str:
        proj = sum(self.dims.values())
        exact = sum(plan.group_size(g) for g in self.exact)
        top = sorted(self.dims, key=lambda g: -self.dims[g])[:4]
        names = ", ".join(f"{_label(plan, g)} {self.dims[g]}" for g in top)
        return (
            f"projected to k = {self.k} (seed {self.seed}): {len(self.dims)} group(s) in "
            f"{proj} random dims by gradient-norm share (largest: {names}), "
            f"{len(self.exact)} small group(s) exact ({exact} dims)"
        )

    # ---- sign matrices -----------------------------------------------------------------
    def signs(self, key: int, side: str, d: int, dtype, device) -> torch.Tensor:
        """``[k_l, d]`` of +-1: side ``side`` of group ``key``'s functionals."""
        m = self.dims[key]
        ck = (key, side, d, dtype, str(device))
        got = self._cache.get(ck)
        if got is not None:
            return got
        out = torch.empty(m, d, dtype=dtype)
        g = torch.Generator()
        for r0 in range(0, m, _ROWS):
            g.manual_seed(_salt(self.seed, key, side, d, r0))
            r1 = min(m, r0 + _ROWS)
            bits = torch.randint(0, 2, (r1 - r0, d), generator=g, dtype=torch.int8)
            out[r0:r1] = bits.to(dtype) * 2 - 1
        out = out.to(device)
        if sum(t.numel() * t.element_size() for t in self._cache.values()) < CACHE_BYTES:
            self._cache[ck] = out
        return out

    # ---- projected features of one group ---------------------------------------------------
    def from_factors(
        self, key: int, A, D, u_side: str, v_side: str, bias: bool, vocab: int = 0
    ) -> torch.Tensor:
        """``[n, C, k_l]`` from ``A [n, S, da]`` (or long tokens ``[n, S]``) and ``D [n, S, C,
        dd]``: ``sum_s (u . D_s)(v . [A_s; 1 if bias])``."""
        n, S, C, dd = D.shape
        da = (0 if A.dtype == torch.long else A.shape[2]) + int(bias)
        U = self.signs(key, u_side, dd, D.dtype, D.device)
        if A.dtype == torch.long:
            V = self.signs(key, v_side, vocab + int(bias), D.dtype, D.device)
        else:
            V = self.signs(key, v_side, da, D.dtype, D.device)
        m = U.shape[0]
        out = torch.empty(n, C, m, dtype=D.dtype, device=D.device)
        step = max(1, _WORK // max(1, S * C * m))
        Vt = V.t()[: V.shape[1] - int(bias)].contiguous()  # [da, m]
        Ut = U.t().contiguous()
        for i in range(0, n, step):
            a, dl = A[i : i + step], D[i : i + step]
            b = a.shape[0]
            # one GEMM per side over all positions (the capture's views are not contiguous,
            # and a batched matmul over them would run S tiny products per example)
            if A.dtype == torch.long:
                pa = Vt[a.clamp(min=0)] * (a >= 0).unsqueeze(-1).to(D.dtype)
            else:
                pa = torch.mm(a.reshape(b * S, da - int(bias)), Vt).reshape(b, S, m)
            if bias:
                pa = pa + V[:, -1]
            pd = torch.mm(dl.reshape(b * S * C, dd), Ut).reshape(b, S, C, m)
            out[i : i + step] = (pd * pa.unsqueeze(2)).sum(1)
        return out / math.sqrt(m)

    def from_matrix(self, key: int, G, u_side: str, v_side: str) -> torch.Tensor:
        """``[n, C, k_l]`` from materialized gradients ``G [n, C, rows, cols]``:
        ``u_r^T G v_r`` with ``u`` over the rows and ``v`` over the columns."""
        n, C, r, c = G.shape
        U = self.signs(key, u_side, r, G.dtype, G.device)
        V = self.signs(key, v_side, c, G.dtype, G.device)
        m = U.shape[0]
        out = torch.empty(n, C, m, dtype=G.dtype, device=G.device)
        step = max(1, _WORK // max(1, C * r * m))
        for i in range(0, n, step):
            out[i : i + step] = torch.einsum("ncrm,rm->ncm", G[i : i + step] @ V.t(), U.t())
        return out / math.sqrt(m)

    # ---- the groups of a plan --------------------------------------------------------------
    def matrix_group(self, key: int, group, f) -> torch.Tensor:
        """``[n, C, k_l]`` of a matrix group's factor ``f``: read off the factors, or from the
        materialized gradient where that costs less (many positions)."""
        n, S, C, dd = f.D.shape
        m = self.dims[key]
        bias = bool(f.beta)
        if group.conv_groups > 1:  # block diagonal: the weight as [out, rest], bias alongside
            Z = materialize(group, f).D[:, 0]
            w = math.prod(group.shape)
            G = Z[..., :w].reshape(n, C, group.shape[0], -1)
            if bias:
                G = torch.cat([G, Z[..., w:].unsqueeze(-1)], -1)
            return self.from_matrix(key, G, "rows", "cols")
        tokens = f.A.dtype == torch.long
        da = group.vocab if tokens else f.A.shape[2]
        factored = S * m * (C * dd + (1 if tokens else da))
        materialized = S * C * dd * da + C * (da + 1) * dd * m
        if factored <= materialized:
            return self.from_factors(key, f.A, f.D, "D", "A", bias, group.vocab)
        Z = materialize(group, f).D[:, 0].reshape(n, C, -1, dd)  # [n, C, cols (+1), rows]
        return self.from_matrix(key, Z, "A", "D")

    def param_part(self, key: int, G: torch.Tensor, shape, side: str = "") -> torch.Tensor:
        """``[n, C, k_l]`` of one parameter's materialized gradients ``G [n, C, numel]``, the
        parameter seen as ``[shape[0], rest]``; ``side`` tells the parameters of one group
        apart (the dense group's)."""
        rows = shape[0] if len(shape) else 1
        return self.from_matrix(
            key, G.reshape(*G.shape[:2], rows, -1), side + "rows", side + "cols"
        )

    def use_part(self, key: int, A, D, transposed: bool, vocab: int) -> torch.Tensor:
        """``[n, C, k_l]`` of one matrix use of a parameter kept as ``[shape[0], rest]``
        (a tied weight's uses, each read off its factors)."""
        u, v = ("cols", "rows") if transposed else ("rows", "cols")
        return self.from_factors(key, A, D, u, v, False, vocab)


def fit(plan, k: int, seed: int, blocks) -> Projection:
    """The split of ``k`` for ``plan`` from exact feature blocks of a sample (an iterable,
    read once)."""
    energy: Dict[int, float] = {g: 0.0 for g in plan.group_keys()}
    for b in blocks:
        for g, f in b.factors.items():
            if not f.materialized:
                f = materialize(plan.group(g), f)
            energy[g] += float(f.D.double().square().sum())
    sizes = {g: plan.group_size(g) for g in plan.group_keys()}
    dims, exact = split_k(k, energy, sizes)
    total = sum(energy.values()) or 1.0
    return Projection(k, seed, dims, {g: e / total for g, e in energy.items()}, exact)


def _label(plan, key: int) -> str:
    return "dense" if key == DENSE else plan.group(key).weight


def _salt(seed: int, key: int, side: str, d: int, r0: int) -> int:
    h = hashlib.blake2b(f"{seed}|{key}|{side}|{d}|{r0}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def split_k(k: int, energy: Dict[int, float], sizes: Dict[int, int]) -> Tuple[Dict[int, int], list]:
    """``k`` dims over groups by energy share (water-filling: a group whose share reaches its
    size stays exact); every projected group gets at least one."""
    active = [g for g in sizes if sizes[g] > 0]
    exact: list = []
    left = k
    while True:
        total = sum(energy[g] for g in active)
        share = {
            g: left * (energy[g] / total if total > 0 else sizes[g] / sum(sizes[a] for a in active))
            for g in active
        }
        full = [g for g in active if share[g] >= sizes[g]]
        if not full:
            break
        for g in full:
            exact.append(g)
            active.remove(g)
            left -= sizes[g]
        if not active:
            return {}, exact
    if left < len(active):
        raise ValueError(
            f"project: {k} dims cannot give each of the model's {len(active)} projected "
            f"parameter groups one (after {len(exact)} small ones kept exact); use project >= "
            f"{k - left + len(active)}"
        )
    dims = {g: max(1, int(share[g])) for g in active}
    # largest remainders first, to use exactly ``left`` dims
    order = sorted(active, key=lambda g: -(share[g] - int(share[g])))
    i = 0
    while sum(dims.values()) < left:
        g = order[i % len(order)]
        if dims[g] < sizes[g]:
            dims[g] += 1
        i += 1
    order = sorted(active, key=lambda g: -dims[g])
    i = 0
    while sum(dims.values()) > left:
        g = order[i % len(order)]
        if dims[g] > 1:
            dims[g] -= 1
        i += 1
    return dims, exact
