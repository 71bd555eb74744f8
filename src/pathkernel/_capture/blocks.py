"""Per-example features of a block of examples, and their pairing into native terms.

A block holds, for each parameter group of the model plan, a ``Factor``: either the factored
form (``A [n, S, da]`` or int tokens ``[n, S]``, ``D [n, S, C, dd]``) or the materialized
per-example gradient (``A = None``, ``D [n, 1, C, P_group]``). Which form is kept is decided
per group by the cost of a pair of examples (docs/design.md, section 2). In the
"trace" mode the C channels are stacked into the feature dim only when the blocks are paired.

A weight ``[V, d]`` shared by an embedding and an output head (a tied GPT-2 head) keeps both
uses' factors (``Factor.tied``): per pair of blocks its gradient is the ``u`` rows of the
tokens the two hold, materialized (the embedding's rows and the head's part of them), plus
the head's factored part over the other ``V - u`` rows (``_tied_pair``): never the
``V x d`` gradient of every example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F

from .._backend import Term
from .rules import apply_weight, one_hot, weight_grad_sum, weight_grads


@dataclass
class Factor:
    A: Optional[torch.Tensor]  # [n, S, da] float | [n, S] long tokens | None
    D: torch.Tensor  # [n, S, C, dd]
    beta: float  # 1.0 when the group's bias is trainable (folded into A . A')
    materialized: bool = False  # D holds flattened per-example gradients, A is None
    # a tied weight [V, d]: this factor holds its embedding uses (tokens A, D over d), and
    # ``tied`` its head uses (A [n, S_h, d], D [n, S_h, C, V]), positions with no gradient
    # in any example of the block dropped
    tied: Optional["Factor"] = None

    def tensors(self) -> List[torch.Tensor]:
        """Every tensor it holds (the tied part's too)."""
        own = [t for t in (self.A, self.D) if t is not None]
        return own + ([] if self.tied is None else self.tied.tensors())

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Factor":
        """The same factor with ``fn`` applied to each of its tensors (a view, a slice)."""
        return Factor(
            None if self.A is None else fn(self.A),
            fn(self.D),
            self.beta,
            self.materialized,
            None if self.tied is None else self.tied.map(fn),
        )


@dataclass
class Block:
    n: int
    C: int
    factors: Dict[int, Factor] = field(default_factory=dict)
    # groups kept factored that are to be materialized just before they are paired
    # (``extract.tangent_batches``: one at a time, into one reused buffer)
    deferred: Set[int] = field(default_factory=set)

    def part(self, lo: int, hi: int) -> "Block":
        """Examples ``lo:hi`` (views)."""
        return Block(
            hi - lo, self.C, {k: f.map(lambda t: t[lo:hi]) for k, f in self.factors.items()}
        )


def pair_cost(
    S: int, da: int, dd: int, C: int, stacked: bool, groups: int = 1
) -> Tuple[float, float]:
    """(factored, materialized) multiply-adds for one pair of examples of one group (a
    grouped convolution: ``groups`` terms of ``da`` inputs and ``dd / groups`` outputs).

    A scalar output factor (S = C = dd = 1) costs no GEMM in the native core (rank one).
    """
    CC = C if stacked else C * C  # channel pairs that enter the kernel
    o = dd // groups
    rank_one = S == 1 and C == 1 and o == 1
    factored = groups * S * S * (da + (0 if rank_one else CC * o) + CC)
    materialized = CC * dd * (da + 1)
    return factored, materialized


def _grad_args(group) -> dict:
    return dict(
        shape=group.shape, transposed=group.transposed, vocab=group.vocab, groups=group.conv_groups
    )


def materialize(
    group, f: Factor, into: Optional[torch.Tensor] = None, stacked: bool = False
) -> Factor:
    """The per-example gradient of a matrix group, flattened in the plan's layout of the
    group (``ModelPlan.flatten_group``): ``D [n, 1, C, P_group]``; ``into``: a flat buffer of
    at least that many elements to write it to (a plain matrix group). ``stacked``: for a
    trace Gram only, where the order within an example's feature is free: a plain matrix
    group's ``D [n, 1, 1, C * P_group]``, ordered (inputs, channels, outputs), one GEMM per
    example over every channel, where there are fewer positions than inputs (attention blocks
    at C = 10: 1.5-6x faster)."""
    n, C = f.D.shape[0], f.D.shape[2]
    if f.tied is not None:  # the head's part, then the embedding's rows added in place
        h = f.tied
        G = weight_grads(h.A, h.D, group.shape, False)
        G = weight_grads(f.A, f.D, group.shape, True, group.shape[0], into=G)
        return Factor(None, G.reshape(n, 1, C, -1), 0.0, True)
    if group.conv_groups > 1:
        parts = [weight_grads(f.A, f.D, **_grad_args(group)).reshape(n, C, -1)]
        if f.beta:
            parts.append(f.D.sum(1))
        return Factor(None, torch.cat(parts, 2).unsqueeze(1), 0.0, True)
    A = one_hot(f.A, group.vocab, f.D.dtype) if f.A.dtype == torch.long else f.A
    if f.beta:  # the bias row: a column of ones in A
        A = torch.cat([A, torch.ones(*A.shape[:2], 1, dtype=A.dtype, device=A.device)], 2)
    # Z[n, c] = A_n^T D_{n,c}, in the plan's layout [n, C, cols(+1), rows]. Over the C
    # channels, either A_n is broadcast (copied C times) and Z written in place, or one GEMM
    # per channel runs straight on D's channel-major layout and Z is moved into place after:
    # the first copies S x cols per example and channel, the second 2 x cols x rows (read and
    # write), so few positions broadcast (attention blocks: 1.1-1.4x faster) and many do not
    # (convolutions at 16x16: 1.2-1.4x faster; 3-7x on a 1x1 convolution)
    S, rows = f.D.shape[1], f.D.shape[3]
    # D copied to [n, S, C, rows] (it comes channel-major) for one GEMM, where that copy is no
    # larger than Z (3 - 4x slower at S = 256 positions, 17 inputs)
    if stacked and C > 1 and S <= A.shape[2]:
        shape = (n, A.shape[2], C * rows)
        out = None if into is None else into[: math.prod(shape)].view(shape)
        Z = torch.bmm(A.transpose(1, 2), f.D.reshape(n, S, C * rows), out=out)
        return Factor(None, Z.reshape(n, 1, 1, -1), 0.0, True)
    shape = (n, C, A.shape[2], rows)
    out = None if into is None else into[: math.prod(shape)].view(shape)
    if C == 1 or S < 2 * rows:
        Z = torch.matmul(A.transpose(1, 2).unsqueeze(1), f.D.transpose(1, 2), out=out)
    else:
        At = A.transpose(1, 2)
        Z = torch.empty(C, n, At.shape[1], rows, dtype=A.dtype, device=A.device)
        for c in range(C):
            torch.bmm(At, f.D[:, :, c], out=Z[c])
        Z = Z.transpose(0, 1).contiguous() if out is None else out.copy_(Z.transpose(0, 1))
    return Factor(None, Z.reshape(n, 1, C, -1), 0.0, True)


def materialized_size(f: Factor) -> int:
    """Elements of ``materialize(group, f)`` for a plain matrix group's float factors."""
    return f.D.shape[0] * f.D.shape[2] * (f.A.shape[2] + (1 if f.beta else 0)) * f.D.shape[3]


def choose_form(group, f: Factor, stacked: bool) -> Factor:
    """Keep the factored form or materialize, whichever a pair of examples costs less."""
    return materialize(group, f) if wants_materialized(group, f, stacked) else f


def wants_materialized(group, f: Factor, stacked: bool) -> bool:
    if f.A is None or f.materialized:
        return False
    if f.A.dtype == torch.long:  # tokens: decided per pair of blocks, by the tokens they hold
        return False
    S, C, dd = f.D.shape[1], f.D.shape[2], f.D.shape[3]
    da = f.A.shape[2] // group.conv_groups
    return materializes(group, S, da, dd, C, stacked)


def materializes(group, S: int, da: int, dd: int, C: int, stacked: bool) -> bool:
    """Whether a matrix group's factors (``S`` positions, ``da`` inputs, ``dd`` outputs) are
    better materialized: materializing costs a copy per example too, so only by a clear
    margin."""
    fac, mat = pair_cost(S, da, dd, C, stacked, group.conv_groups)
    return mat < 0.8 * fac


def _stack(D: torch.Tensor, stacked: bool) -> torch.Tensor:
    """Trace: the C channels become one longer feature, ``[n, S, 1, C * dd]``."""
    return D.reshape(D.shape[0], D.shape[1], 1, -1) if stacked else D


def to_terms(
    plan, b1: Block, b2: Optional[Block], scale: float = 1.0, stacked: bool = False
) -> Tuple[List[Term], Optional[List[Term]]]:
    """Native terms for the pair of blocks (``b2 = None``: b1 against itself), each weighted
    by ``scale``; ``stacked``: sum over channels inside the kernel (trace)."""
    s1: List[Term] = []
    s2: List[Term] = []
    keys = sorted(b1.factors) if b2 is None else sorted(set(b1.factors) & set(b2.factors))
    for k in keys:
        f1 = b1.factors[k]
        f2 = f1 if b2 is None else b2.factors[k]
        if f1.materialized != f2.materialized:  # blocks of different shapes chose differently
            f1 = f1 if f1.materialized else materialize(plan.group(k), f1)
            f2 = f2 if f2.materialized else materialize(plan.group(k), f2)
        if f1.tied is not None:
            pairs = _tied_pair(plan.group(k), f1, None if b2 is None else f2, stacked)
        elif f1.A is not None and f1.A.dtype == torch.long:
            pairs = [_token_pair(f1, None if b2 is None else f2, stacked)]
        else:
            pairs = [(f1, f2)]
        for f1, f2 in pairs:
            A1, A2 = f1.A, f2.A
            g = 1 if f1.materialized else plan.group(k).conv_groups
            # a grouped convolution: one term per group (no pairs across groups)
            for A1j, D1j, A2j, D2j in zip(
                _split(A1, g), _split(f1.D, g), _split(A2, g), _split(f2.D, g)
            ):
                s1.append(Term(A1j, _stack(D1j, stacked), f1.beta, scale))
                s2.append(Term(A2j, _stack(D2j, stacked), f2.beta, scale))
    if not s1:
        raise ValueError("model: no trainable parameter reaches the output; the kernel is empty")
    return s1, (None if b2 is None else s2)


def _split(t: Optional[torch.Tensor], g: int) -> list:
    if t is None or g == 1:
        return [t] * g
    w = t.shape[-1] // g
    return [t[..., j * w : (j + 1) * w] for j in range(g)]


def _codes(t1: torch.Tensor, t2: Optional[torch.Tensor]):
    """The distinct tokens ``[u]`` of one or two token tensors, and each tensor's tokens as
    codes ``0..u-1`` (-1 stays "no token")."""
    both = t1.reshape(-1) if t2 is None else torch.cat([t1.reshape(-1), t2.reshape(-1)])
    vocab, inverse = torch.unique(both, return_inverse=True)
    has_pad = bool(vocab.numel()) and int(vocab[0]) < 0
    idx = inverse - 1 if has_pad else inverse
    codes = [idx[: t1.numel()].reshape(t1.shape)]
    if t2 is not None:
        codes.append(idx[t1.numel() :].reshape(t2.shape))
    return (vocab[1:] if has_pad else vocab), codes


def _token_pair(f1: Factor, f2: Optional[Factor], stacked: bool) -> Tuple[Factor, Factor]:
    """An embedding's factors for one pair of blocks (``f2 = None``: the block against
    itself), over the ``u`` distinct tokens the two hold: one-hot ``A`` (the Gram over
    positions, ``S^2 (u + C dd)`` a pair) or the gradient's ``u`` rows that can be nonzero
    (``u dd`` a pair: its other rows are zero in every example of both blocks), whichever
    costs less. Never the whole vocabulary."""
    vocab, codes = _codes(f1.A, None if f2 is None else f2.A)
    u = max(1, vocab.numel())
    S, C, dd = f1.D.shape[1], f1.D.shape[2], f1.D.shape[3]
    fac, mat = pair_cost(S, u, dd, C, stacked)
    fs = [f1] if f2 is None else [f1, f2]
    if mat < fac:
        out = [_token_rows(c, f.D, u, f.beta) for c, f in zip(codes, fs)]
    else:
        out = [Factor(one_hot(c, u, f.D.dtype), f.D, f.beta) for c, f in zip(codes, fs)]
    return out[0], out[-1]


def _token_rows(codes: torch.Tensor, D: torch.Tensor, u: int, beta: float) -> Factor:
    """Materialized over ``u`` tokens: row ``v`` of example ``i``'s gradient is the sum of its
    output gradients at the positions holding token ``v`` (a scatter-add, no one-hot
    product); a folded bias adds their sum over all positions as one more row."""
    n, S, C, dd = D.shape
    Z = _scatter_rows(torch.zeros(n, C, u, dd, dtype=D.dtype, device=D.device), codes, D)
    if beta:
        Z = torch.cat([Z, (D * (codes >= 0)[:, :, None, None]).sum(1).unsqueeze(2)], 2)
    return Factor(None, Z.reshape(n, 1, C, -1), 0.0, True)


def _scatter_rows(Z: torch.Tensor, codes: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """``Z [n, C, u, dd]`` plus, in place, each position's output gradient in the row of its
    token (positions without one add nothing)."""
    n, S, C, dd = D.shape
    src = (D * (codes >= 0)[:, :, None, None].to(D.dtype)).permute(0, 2, 1, 3)
    return Z.scatter_add_(2, codes.clamp(min=0)[:, None, :, None].expand(n, C, S, dd), src)


def tied_cost(V: int, d: int, u: int, S_h: int, C: int, stacked: bool) -> Tuple[float, float]:
    """(rows + factored head, materialized) multiply-adds for a pair of examples of a tied
    weight ``[V, d]`` whose blocks hold ``u`` distinct tokens and ``S_h`` head positions."""
    CC = C if stacked else C * C
    return CC * u * d + S_h * S_h * (d + CC * (V - u)), CC * V * d


def _tied_pair(
    group, f1: Factor, f2: Optional[Factor], stacked: bool
) -> List[Tuple[Factor, Factor]]:
    """A tied weight's factor pairs for one pair of blocks (``f2 = None``: the block against
    itself). Its gradient ``[V, d]`` is nonzero off the ``u`` token rows the two blocks hold
    only through the head: the ``u`` rows, materialized (the embedding's scatter-add and the
    head's part of them), pair with each other; the other ``V - u`` rows are the head's
    factors restricted to them, paired as factors. The two sums are the kernel of the whole
    gradient; where materializing it is cheaper (many head positions), it is materialized."""
    fs = [f1] if f2 is None else [f1, f2]
    fs = _padded_heads(fs)
    V, d = group.shape
    vocab, codes = _codes(fs[0].A, None if f2 is None else fs[1].A)
    u, (S_h, C) = vocab.numel(), fs[0].tied.D.shape[1:3]
    tied, full = tied_cost(V, d, u, S_h, C, stacked)
    if full <= tied:
        out = [materialize(group, f) for f in fs]
        return [(out[0], out[-1])]
    rest = torch.ones(V, dtype=torch.bool, device=vocab.device)
    rest[vocab] = False
    rest = rest.nonzero().flatten()
    rows, others = [], []
    for f, c in zip(fs, codes):
        h, (n, _, C_f, _) = f.tied, f.D.shape  # the two sides' channels may differ
        # the head's part of the u rows (one batched GEMM), then the embedding's added in place
        Z = torch.matmul(h.D.index_select(3, vocab).permute(0, 2, 3, 1), h.A.unsqueeze(1))
        Z = _scatter_rows(Z, c, f.D)  # [n, C_f, u, d]
        rows.append(Factor(None, Z.reshape(n, 1, C_f, -1), 0.0, True))
        others.append(Factor(h.A, h.D.index_select(3, rest), 0.0))
    return [(rows[0], rows[-1]), (others[0], others[-1])]


def _padded_heads(fs: List[Factor]) -> List[Factor]:
    """Tied factors whose head parts have as many positions (zero ones added: each block
    kept the positions live in it)."""
    S = max(f.tied.D.shape[1] for f in fs)
    out = []
    for f in fs:
        h, s = f.tied, f.tied.D.shape[1]
        if s < S:
            h = Factor(F.pad(h.A, (0, 0, 0, S - s)), F.pad(h.D, (0, 0, 0, 0, 0, S - s)), 0.0)
        out.append(Factor(f.A, f.D, f.beta, f.materialized, h))
    return out


def dot_params(plan, block: Block, vec: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``[n, C]``: each example's per-channel Jacobian applied to a parameter-space vector
    ``vec`` (a dict name -> tensor shaped like the parameter; missing names count as 0)."""
    ref = next(iter(block.factors.values())).D
    total = torch.zeros(block.n, block.C, dtype=ref.dtype, device=ref.device)
    for k, f in block.factors.items():
        if f.materialized:
            flat = plan.flatten_group(k, {n: v.to(f.D.dtype) for n, v in vec.items()})
            total += torch.einsum("ncp,p->nc", f.D[:, 0], flat)
            continue
        g = plan.group(k)
        w = vec.get(g.weight)
        if w is not None and f.tied is not None:  # the embedding's rows, the head's products
            total += torch.einsum("nscd,nsd->nc", f.D, apply_weight(f.A, w.to(f.D.dtype), True))
            h = f.tied
            total += torch.einsum("nscv,nsv->nc", h.D, apply_weight(h.A, w.to(h.D.dtype), False))
        elif w is not None:
            wa = apply_weight(f.A, w.to(f.D.dtype), g.transposed, g.conv_groups)
            total += torch.einsum("nscd,nsd->nc", f.D, wa)
        if f.beta and vec.get(g.bias) is not None:
            total += torch.einsum("nscd,d->nc", f.D, vec[g.bias].to(f.D.dtype))
    return total


def per_example_grads(plan, block: Block) -> torch.Tensor:
    """``[n, C, P]``: per-example gradients in the plan's parameter order."""
    parts = []
    for k in plan.group_keys():
        f = block.factors.get(k)
        if f is None:
            ref = next(iter(block.factors.values())).D
            parts.append(
                torch.zeros(
                    block.n, block.C, plan.group_size(k), dtype=ref.dtype, device=ref.device
                )
            )
            continue
        if not f.materialized:
            f = materialize(plan.group(k), f)
        parts.append(f.D[:, 0])
    return torch.cat(parts, 2)


def concat_blocks(blocks: List[Block]) -> Block:
    """One block from consecutive ones (same groups and forms, examples stacked)."""
    if len(blocks) == 1:
        return blocks[0]
    out = Block(sum(b.n for b in blocks), blocks[0].C, deferred=set(blocks[0].deferred))
    for k in blocks[0].factors:
        out.factors[k] = _concat([b.factors[k] for b in blocks])
    return out


def _concat(fs: List[Factor]) -> Factor:
    f = fs[0]
    if f.tied is not None:
        fs = _padded_heads(fs)
    A = None if f.A is None else torch.cat([g.A for g in fs])
    tied = None if f.tied is None else _concat([g.tied for g in fs])
    return Factor(A, torch.cat([g.D for g in fs]), f.beta, f.materialized, tied)


def gather_blocks(n: int, parts) -> Block:
    """One block of ``n`` examples from consecutive ``parts`` made one at a time (an
    iterable), each copied into place as it comes: only one part is held besides the
    result, where ``concat_blocks`` holds them all."""
    out: Optional[Block] = None
    i = 0
    parts = iter(parts)
    for b in parts:
        if out is None:
            if b.n == n:
                return b
            if any(f.tied is not None for f in b.factors.values()):  # heads' positions vary
                return concat_blocks([b, *parts])
            out = Block(n, b.C)
            for k, f in b.factors.items():
                out.factors[k] = f.map(lambda t: t.new_empty((n, *t.shape[1:])))
        for k, f in b.factors.items():
            for dst, src in zip(out.factors[k].tensors(), f.tensors()):
                dst[i : i + b.n].copy_(src)
        i += b.n
    if out is None or i != n:
        raise ValueError(f"parts: expected {n} examples in all, got {i}")
    return out


def summed_grads(
    plan, block: Block, weights: Optional[torch.Tensor] = None
) -> Dict[str, torch.Tensor]:
    """Gradients summed over the block's examples (channel 0), each example's weighted by
    ``weights [n]`` where given, by parameter name, computed from the factors without
    materializing per-example gradients."""
    w = None if weights is None else weights.view(-1, 1, 1)
    out: Dict[str, torch.Tensor] = {}
    for k, f in block.factors.items():
        if f.materialized:
            G = f.D[:, 0, 0]
            out.update(plan.unflatten_group(k, G.sum(0) if w is None else weights @ G))
            continue
        g = plan.group(k)
        D = f.D[:, :, 0] if w is None else f.D[:, :, 0] * w
        if f.tied is not None:
            h = f.tied
            hD = h.D[:, :, 0] if w is None else h.D[:, :, 0] * w
            out[g.weight] = weight_grad_sum(f.A, D, g.shape, True, g.shape[0]) + weight_grad_sum(
                h.A, hD, g.shape, False
            )
            continue
        out[g.weight] = weight_grad_sum(f.A, D, **_grad_args(g))
        if f.beta:
            out[g.bias] = D.sum((0, 1))
    return out
