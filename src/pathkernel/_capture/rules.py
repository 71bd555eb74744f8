"""The per-example gradient of each kind of use, from the activation and the output gradient.

Matrix uses (``linear``, ``matmul``, ``addmm``, ``conv``, ``embedding``) apply a weight ``W``
linearly at ``S`` positions: the per-example gradient is ``sum_s D_s A_s^T`` (as a matrix
``[rows, cols]``; ``transposed`` uses such as ``x @ W`` or an embedding give its transpose),
with ``A [n, S, cols]`` read from the op's input (int tokens for an embedding: one-hot rows)
and ``D [n, S, C, rows]`` from the gradient of its output. A grouped convolution's weight is
block diagonal: its ``A`` and ``D`` split into ``groups`` contiguous blocks that pair only
with each other. A row slice of ``W`` (attention's packed in-projection) pads ``D`` to all
rows.

Elementwise uses (norms' affine parameters, a parameter added to, multiplied with or
expanded over activations) give the per-example gradient directly, as the output gradient
times the op's coefficient summed over the broadcast dims.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_weight

from .layout import Layout, batch_first
from .ops import ELEMENTWISE_OPS, NORM_OPS, Use


def expandable_dims(use: Use) -> Optional[int]:
    """How many leading dims of ``use.batched`` may hold the batch (None: any)."""
    if use.op in ("linear", "matmul", "addmm"):
        return use.x.dim() - 1
    if use.op in ("conv", "group_norm", "instance_norm", "batch_norm"):
        return 1
    if use.op in ("layer_norm", "rms_norm"):
        return use.x.dim() - len(use.ctx["args"]["normalized_shape"])
    return None


# ---- matrix uses ---------------------------------------------------------------------------


def _unfold(x: torch.Tensor, ctx: dict) -> torch.Tensor:
    """Patches ``[B, L, C_in * prod(k)]`` of a convolution's input (zero padding)."""
    dims, k, s, d, p = ctx["dims"], ctx["kernel"], ctx["stride"], ctx["dilation"], ctx["padding"]
    if isinstance(p, str):
        if p == "valid":
            p = (0,) * dims
        else:  # "same": torch pads total // 2 before and the rest after
            pads = []
            for kk, dd in reversed(list(zip(k, d))):
                total = dd * (kk - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
            p = (0,) * dims
    p = tuple(p) if isinstance(p, (tuple, list)) else (int(p),) * dims
    if dims == 1:  # a 1-d convolution is a 2-d one of height 1
        x, k, s, d, p = x.unsqueeze(2), (1,) + k, (1,) + s, (1,) + d, (0,) + p
    if dims <= 2:
        return F.unfold(x, kernel_size=k, dilation=d, padding=p, stride=s).transpose(1, 2)
    x = F.pad(x, [q for pp in reversed(p) for q in (pp, pp)])
    for i in range(3):  # 3-d: windows along each spatial dim
        x = x.unfold(2 + i, d[i] * (k[i] - 1) + 1, s[i])[..., :: d[i]]
    B, Cin = x.shape[:2]
    L = x.shape[2] * x.shape[3] * x.shape[4]
    return x.reshape(B, Cin, L, -1).permute(0, 2, 1, 3).reshape(B, L, -1)


def matrix_factors(
    use: Use, layout: Layout, n: int, grads: torch.Tensor, rows: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A, D)`` of a matrix use: ``A [n, S, cols]`` (long ``[n, S]`` tokens for an
    embedding, -1 where no row gets a gradient) and ``D [n, S, C, rows]``. ``grads``:
    ``[C, *y.shape]``; ``rows``: the weight's row count (a row slice pads D to it)."""
    C = grads.shape[0]
    if use.op == "conv":
        P = batch_first(_unfold(use.x, use.ctx), layout, n)  # [n, (per,) L, Cin k]
        A = P.reshape(n, -1, P.shape[-1])
        Gy = grads.flatten(3).transpose(2, 3)  # [C, B, L, Cout]
        D = batch_first(Gy, layout, n, lead=1)  # [n, C, (per,) L, Cout]
        D = D.reshape(n, C, -1, D.shape[-1]).transpose(1, 2)  # [n, S, C, Cout]
        return A, D
    x = batch_first(use.x, layout, n)
    if use.op == "embedding":
        A = x.reshape(n, -1).long()
        pad = use.ctx.get("padding_idx")
        if pad is not None:  # the padding row gets no gradient
            A = torch.where(A == pad, torch.full_like(A, -1), A)
    else:
        A = x.reshape(n, -1, x.shape[-1])
    g = batch_first(grads, layout, n, lead=1)  # [n, C, ..., out]
    D = g.reshape(n, C, -1, g.shape[-1]).transpose(1, 2)
    r = use.weight.rows if use.weight is not None else None
    if r is not None and (r[0], r[1]) != (0, rows):
        D = F.pad(D, (r[0], rows - r[1]))
    return A, D


def direct_conv_grads(
    use: Use, layout: Layout, n: int, grads: torch.Tensor, bias: bool
) -> Optional[torch.Tensor]:
    """A 2-d convolution's per-example weight gradients (and its bias's, last) computed as
    one convolution with the examples as groups, in the layout ``blocks.materialize`` gives:
    ``[n, C, Cin k (+1), Cout]``; no patches of the input are built. None where the patches
    and a batched GEMM are as fast (few output positions or input channels: measured on a
    2-core CPU for ResNet-18's shapes) or the case is not a plain one (grouped, string
    padding, examples not alone on the batch dim, a GPU)."""
    ctx, x = use.ctx, use.x
    if (
        use.op != "conv"
        or ctx["dims"] != 2
        or ctx.get("groups", 1) != 1
        or isinstance(ctx["padding"], str)
        or layout.dim != 0
        or layout.per != 1
        or layout.expand
        or x.shape[0] != n
        or x.device.type != "cpu"
    ):
        return None
    C, Cout, L = grads.shape[0], grads.shape[2], grads[0, 0, 0].numel()
    Cin = x.shape[1]
    if L < 256 or Cin < 32:
        return None
    k = tuple(ctx["kernel"])
    parts = []
    for c in range(C):
        gy = grads[c]  # [n, Cout, *out]
        w = conv2d_weight(
            x.reshape(1, n * Cin, *x.shape[2:]),
            (n * Cout, Cin, *k),
            gy.reshape(1, n * Cout, *gy.shape[2:]),
            stride=ctx["stride"],
            padding=ctx["padding"],
            dilation=ctx["dilation"],
            groups=n,
        )
        z = w.reshape(n, Cout, -1).transpose(1, 2)  # [n, Cin k, Cout]
        if bias:
            z = torch.cat([z, gy.flatten(2).sum(2).unsqueeze(1)], 1)
        parts.append(z)
    return torch.stack(parts, 1)


def bias_grads(use: Use, D: torch.Tensor, numel: int) -> torch.Tensor:
    """``[n, C, numel]``: per-example gradients of a matrix use's bias (a row slice padded)."""
    G = D.sum(1)
    r = use.bias.rows
    if r is not None and G.shape[-1] != numel:
        G = F.pad(G, (r[0], numel - r[1]))
    return G


def one_hot(tokens: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """``[n, S, vocab]``; tokens of -1 give a zero row."""
    oh = F.one_hot(tokens.clamp(min=0), vocab).to(dtype)
    return oh * (tokens >= 0).unsqueeze(-1).to(dtype)


def as_matrix(w: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The weight as ``[rows (D side), cols (A side)]``."""
    m = w.reshape(w.shape[0], -1)
    return m.t() if transposed else m


def from_matrix(m: torch.Tensor, shape, transposed: bool) -> torch.Tensor:
    """Inverse of ``as_matrix`` over the trailing two dims of ``m``."""
    if transposed:
        m = m.transpose(-1, -2)
    return m.reshape(*m.shape[:-2], *shape)


def live_positions(A: torch.Tensor, D: torch.Tensor):
    """``A, D`` without the positions whose output gradient is zero in every example and
    channel (a head applied to every token of which one is read): they add nothing to a
    weight gradient, and cost as much as the others."""
    S = D.shape[1]
    if S < 2:
        return A, D
    # [S]; two reductions read D once each and write nothing of its size (D.ne(0) did: 1.5-8x)
    rest = (0,) + tuple(range(2, D.dim()))
    live = torch.amax(D, rest).ne(0) | torch.amin(D, rest).ne(0)
    if bool(live.all()):
        return A, D
    idx = live.nonzero().flatten()
    return A.index_select(1, idx), D.index_select(1, idx)


def weight_grads(
    A, D, shape, transposed: bool, vocab: int = 0, groups: int = 1, into=None
) -> torch.Tensor:
    """``[n, C, *shape]``: per-example, per-channel weight gradients; ``into``: such a
    tensor (contiguous) to add them to in place, and return."""
    A, D = live_positions(A, D)
    n, S, C, dd = D.shape
    if A.dtype == torch.long:  # rows of the vocabulary, added up where tokens repeat
        out = torch.zeros(n, C, *shape, dtype=D.dtype, device=D.device) if into is None else into
        rows = out.view(n, C, vocab, dd) if transposed else out.view(n, C, dd, vocab)
        valid = (A >= 0).to(D.dtype)[:, :, None, None]
        src = (D * valid).transpose(1, 2)  # [n, C, S, dd]
        index = A.clamp(min=0)[:, None, :, None].expand(n, C, S, dd)
        if transposed:
            rows.scatter_add_(2, index, src)
        else:
            rows.scatter_add_(3, index.transpose(2, 3), src.transpose(2, 3))
        return out
    if into is not None:
        return into.add_(weight_grads(A, D, shape, transposed, vocab, groups))
    if groups > 1:  # grouped convolution: block-diagonal, group by group
        n, S, C = D.shape[:3]
        m = torch.einsum(
            "nscgo,nsga->ncgoa", D.reshape(n, S, C, groups, -1), A.reshape(n, S, groups, -1)
        )
        return m.reshape(n, C, *shape)
    m = torch.einsum("nscd,nsa->ncad" if transposed else "nscd,nsa->ncda", D, A)
    return m.reshape(*m.shape[:2], *shape)


def weight_grad_sum(A, D, shape, transposed: bool, vocab: int = 0, groups: int = 1) -> torch.Tensor:
    """The weight gradient summed over examples, from ``A`` and ``D [n, S, rows]``."""
    if A.dtype == torch.long:
        rows = D.shape[-1]
        valid = A >= 0
        m = torch.zeros(vocab, rows, dtype=D.dtype, device=D.device)
        m.index_add_(0, A[valid], D[valid])  # [vocab (cols), rows]
        return from_matrix(m.t(), shape, transposed)
    if groups > 1:
        n, S = D.shape[:2]
        m = torch.einsum("nsgo,nsga->goa", D.reshape(n, S, groups, -1), A.reshape(n, S, groups, -1))
        return m.reshape(shape)
    return from_matrix(torch.einsum("nsd,nsa->da", D, A), shape, transposed)


def apply_weight(A, w: torch.Tensor, transposed: bool, groups: int = 1) -> torch.Tensor:
    """``[n, S, rows]``: a weight-shaped ``w`` applied to each position's input factor."""
    M = as_matrix(w, transposed)
    if A.dtype == torch.long:
        valid = (A >= 0).unsqueeze(-1)
        return torch.where(
            valid, M.t()[A.clamp(min=0)], torch.zeros((), dtype=w.dtype, device=w.device)
        )
    if groups > 1:
        n, S = A.shape[:2]
        Mg = M.reshape(groups, M.shape[0] // groups, M.shape[1])
        return torch.einsum("nsga,goa->nsgo", A.reshape(n, S, groups, -1), Mg).reshape(n, S, -1)
    return A @ M.t()


# ---- elementwise uses -------------------------------------------------------------------------


def _normalized(use: Use) -> torch.Tensor:
    """A norm's output before its affine parameters."""
    a = use.ctx["args"]
    x, eps = use.x, a.get("eps", 1e-5)
    with torch.no_grad():
        if use.op == "layer_norm":
            return F.layer_norm(x, a["normalized_shape"], None, None, eps)
        if use.op == "rms_norm":
            return F.rms_norm(x, a["normalized_shape"], None, a.get("eps"))
        if use.op == "group_norm":
            return F.group_norm(x, a["num_groups"], None, None, eps)
        if use.op == "batch_norm":
            return F.batch_norm(x, a["running_mean"], a["running_var"], None, None, False, 0.0, eps)
        use_stats = a.get("use_input_stats", True)
        return F.instance_norm(
            x,
            None if use_stats else a["running_mean"],
            None if use_stats else a["running_var"],
            None,
            None,
            use_stats,
            0.0,
            eps,
        )


def _aligned(use: Use, pshape, ndim: int) -> list:
    """The parameter's shape over the dims of the use's output."""
    if use.op in NORM_OPS and use.ctx["channel_dim"] is not None:
        full = [1] * ndim
        full[use.ctx["channel_dim"]] = pshape[0] if pshape else 1
        return full
    if len(pshape) > ndim:
        raise ValueError("parameter has more dims than the output")
    return [1] * (ndim - len(pshape)) + list(pshape)


def elementwise_grads(
    use: Use, role: str, layout: Layout, n: int, grads: torch.Tensor, pshape
) -> torch.Tensor:
    """``[n, C, numel]``: per-example gradients of an elementwise parameter (``role``:
    "weight" or "bias" of a norm; "weight" for add / mul / expand)."""
    full = _aligned(use, tuple(pshape), use.y.dim())
    if full[layout.dim] != 1:
        raise ValueError("the parameter varies along the batch dim")
    if use.op == "mul":
        g = _times_summed(grads, use.ctx["other"], full, layout.dim)
    elif use.op in NORM_OPS and role == "weight":
        g = _times_summed(grads, _normalized(use), full, layout.dim)
    else:
        g = grads
    g = batch_first(g, layout, n, lead=1)  # [n, C, *rest]
    rest = list(full)
    if layout.per == 1:
        del rest[layout.dim]
    dims = [2 + i for i, (f, s) in enumerate(zip(rest, g.shape[2:])) if f == 1 and s != 1]
    if dims:
        g = g.sum(dims, keepdim=True)
    return g.reshape(n, g.shape[1], -1)


def _times_summed(grads: torch.Tensor, other: torch.Tensor, full, batch_dim: int) -> torch.Tensor:
    """``grads [C, *y] * other`` (broadcast to ``y``), summed over the dims of ``y`` along
    which the parameter (aligned shape ``full``) is constant, but for the batch dim (kept
    size 1). Where those are the last dims (a norm over images: ``[n, k, H, W]``), one
    batched contraction over contiguous rows; the product and then its sum write and read a
    tensor of ``grads``' size (GroupNorm weight, C = 10, 256 x 32 x 16 x 16: 35 -> 13 ms).
    Elsewhere (a LayerNorm: sums over positions, ``d`` kept) the contraction would permute
    and is 2-10x slower than the product."""
    y = grads.shape[1:]
    other = other.reshape((1,) * (len(y) - other.dim()) + tuple(other.shape))
    summed = [d for d in range(len(y)) if full[d] == 1 and d != batch_dim and y[d] != 1]
    trailing = [d for d in summed if all(y[e] == 1 or e in summed for e in range(d, len(y)))]
    if not summed or trailing != summed:
        g = grads * other
        return g.sum([1 + d for d in summed], keepdim=True) if summed else g
    letters = "abcdefghijklmnopqrstuvwxy"[: len(y)]
    keep = "".join(c for d, c in enumerate(letters) if d not in summed)
    g = torch.einsum(f"z{letters},{letters}->z{keep}", grads, other)
    return g.reshape(grads.shape[:1] + tuple(1 if d in summed else y[d] for d in range(len(y))))


def is_elementwise(op: str) -> bool:
    return op in ELEMENTWISE_OPS or op in NORM_OPS
