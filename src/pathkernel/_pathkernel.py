"""``path_kernel``: checkpoint path kernels of any size, tiled under a memory budget.

``K^p(x, x') = sum_t weight_t K_{w_t}(x, x')`` over a list of checkpoints. The output (query
rows x train columns, or train x train) is cut into tiles; each tile is accumulated in float64
over all checkpoints, then written once to its store (RAM or a resumable ``.npy``). The plan
caches the row block's per-layer features for every checkpoint and recomputes the column
block's, so only a tile, one row block's features and one column block's features are ever in
memory.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np
import torch
from torch import nn

from . import _backend
from ._capture import CHUNK, cast_inputs, extract, probe
from ._checkpoints import check_checkpoints, checkpoint_state
from ._checks import check_inputs_match, check_same_features, resolve_dtype, run_model_once, as_inputs
from ._features import Block, to_terms
from ._model import ModelPlan, check_model
from ._outputs import OutputSpec, OutputsArg
from ._progress import progress_bar
from ._sources import Source
from ._store import open_store, parse_bytes
from ._tangent import features

_GEMM_GUESS = 150e9   # FLOP/s used only for the plan's time estimate


@dataclass
class PathKernelPlan:
    """What ``path_kernel`` will do; ``print(plan)`` shows it."""

    shape: Tuple[int, ...]
    symmetric: bool
    checkpoints: int
    row_block: int
    col_block: int
    tiles: List[Tuple[int, int]]
    cache_bytes: int
    tile_bytes: int
    feature_bytes_per_example: int
    budget_bytes: int
    gram_flops: float
    extractions: int
    est_seconds: float
    store: str
    # internal
    _ctx: dict = field(default=None, repr=False)

    def __str__(self) -> str:
        M, N = self.shape[:2]
        kind = "train x train (symmetric halves)" if self.symmetric else "query x train"
        return "\n".join([
            f"path kernel {kind}: {M} x {N}{' x C x C' if len(self.shape) == 4 else ''}, "
            f"{self.checkpoints} checkpoint(s), store: {self.store}",
            f"  tiles: {len(self.tiles)} of {self.row_block} x {self.col_block} "
            f"({self.tile_bytes / 2**20:.1f} MiB float64 accumulator each)",
            f"  cached: row-block features for every checkpoint "
            f"({self.cache_bytes / 2**20:.1f} MiB); column-block features recomputed per tile",
            f"  features: {self.feature_bytes_per_example} B per example per checkpoint; "
            f"{self.extractions:,} example forward/backward passes",
            f"  memory budget {_fmt_bytes(self.budget_bytes)}; Gram work {self.gram_flops / 1e9:,.1f} GFLOP; "
            f"estimated {self.est_seconds:,.1f} s",
        ])


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _fingerprint_state(state, lr) -> str:
    h = hashlib.sha1(repr(float(lr)).encode())
    for n in sorted(state):
        t = state[n].detach().contiguous()
        h.update(n.encode())
        h.update(t.cpu().numpy().tobytes())
    return h.hexdigest()


def _block_bytes(b: Block) -> int:
    total = 0
    for f in b.factors.values():
        total += f.D.numel() * f.D.element_size()
        if f.A is not None:
            total += f.A.numel() * f.A.element_size()
    return total


def _pair_flops(b: Block) -> float:
    """2 x multiply-adds of the factor Grams for one pair of examples."""
    fl = 0.0
    for f in b.factors.values():
        S, C, dd = f.D.shape[1], f.D.shape[2], f.D.shape[3]
        # embedding tokens: the one-hot width is the union of tokens, at most 2 S per pair
        da = 0 if f.A is None else (f.A.shape[2] if f.A.dim() == 3 else 2 * S)
        fl += S * S * (da + C * C * dd)
    return 2.0 * fl


def plan(model: nn.Module, checkpoints, train, query=None, *, outputs: OutputsArg = "trace",
         out=None, memory_budget="2GB", dtype: torch.dtype = torch.float32,
         collate=None) -> PathKernelPlan:
    """The tiling plan ``path_kernel`` would follow, with its memory use and estimated cost."""
    check_model(model)
    ckpts = check_checkpoints(checkpoints)
    spec = OutputSpec(outputs)
    budget = parse_bytes(memory_budget)
    dtype = resolve_dtype(dtype, model)
    cols = Source(train, "train", collate)
    rows = cols if query is None else Source(query, "query", collate)
    symmetric = query is None
    sample_rows = as_inputs(rows.get(0, min(32, rows.n)), rows.name)
    check_inputs_match(model, sample_rows, rows.name)
    if not symmetric:
        check_same_features(as_inputs(cols.get(0, 1), "train"), sample_rows, "train", "query")
    run_model_once(model, sample_rows, rows.name)
    mplan = ModelPlan(model, "auto")
    probe(mplan, tuple(t[:4] for t in sample_rows))
    states = [checkpoint_state(mplan, w, dtype, i) for i, (w, _) in enumerate(ckpts)]
    sample = extract(mplan, spec, states[0], cast_inputs(sample_rows, dtype))
    fb = max(1, math.ceil(_block_bytes(sample) / sample.n))
    C = sample.C if spec.full else 1
    M, N, T = rows.n, cols.n, len(ckpts)
    shape = (M, N, C, C) if spec.full else (M, N)

    # Memory: model states, then row features (all checkpoints), a column block's features,
    # the float64 tile and the extraction scratch (a chunk's activations, several times fb).
    state_bytes = T * sum(p.numel() for p in model.parameters()) * (4 if dtype == torch.float32 else 8)
    # a chunk's autograd scratch is a few times its features: keep it to ~1/8 of the budget
    chunk = max(16, min(CHUNK, max(M, N), budget // (64 * fb)))
    usable = budget - state_bytes - 8 * chunk * fb
    if out is None:
        kbytes = int(np.prod(shape)) * (4 if dtype == torch.float32 else 8)
        if kbytes > budget // 2:
            raise ValueError(
                f"out: the kernel needs {_fmt_bytes(kbytes)}, more than half the memory budget "
                f"({_fmt_bytes(budget)}); pass out='kernel.npy' to write it to disk")
        usable -= kbytes
    if usable <= 0:
        raise ValueError(f"memory_budget: {_fmt_bytes(budget)} is too small for this model and "
                         f"{T} checkpoint(s){'' if out is not None else ' with the kernel in memory (pass out=)'}")
    cc = 8 * C * C
    # The column block's features are held for every checkpoint at once, so one native call
    # accumulates a tile over the whole path with the tile in cache.
    if symmetric:
        # R*T*fb (row cache) + R*T*fb (column features) + R*R*cc (tile) <= usable
        a, b = cc, 2 * T * fb
        R = int((-b + math.sqrt(b * b + 4 * a * usable)) / (2 * a))
        R = max(1, min(N, chunk, R))  # a column block is extracted in one pass: no concat
        Cb = R
    else:
        R = max(1, min(M, int(0.4 * usable) // (T * fb)))
        Cb = max(1, min(N, chunk, int(usable - R * T * fb) // (R * cc + T * fb)))
    tiles = [(i, j) for i in range(math.ceil(M / R))
             for j in range(i if symmetric else 0, math.ceil(N / Cb))]
    pair = _pair_flops(sample)
    pairs = (N * (N + 1) / 2) if symmetric else float(M) * N
    col_widths = sum(min(N, (j + 1) * Cb) - j * Cb for i, j in tiles if not (symmetric and i == j))
    extractions = T * (M + col_widths)
    est = pairs * T * pair / _GEMM_GUESS + extractions * 6.0 * sum(
        p.numel() for p in model.parameters()) / 20e9
    return PathKernelPlan(
        shape=shape, symmetric=symmetric, checkpoints=T, row_block=R, col_block=Cb, tiles=tiles,
        cache_bytes=R * T * fb, tile_bytes=R * Cb * cc, feature_bytes_per_example=fb,
        budget_bytes=budget, gram_flops=pairs * T * pair, extractions=extractions, est_seconds=est,
        store="RAM" if out is None else str(out),
        _ctx=dict(mplan=mplan, spec=spec, dtype=dtype, rows=rows, cols=cols, states=states,
                  weights=[w for _, w in ckpts], out=out, outputs=outputs, chunk=chunk))


def path_kernel(model: nn.Module, checkpoints, train, query=None, *, outputs: OutputsArg = "trace",
                out=None, memory_budget="2GB", dtype: torch.dtype = torch.float32,
                resume: bool = True, progress: bool = True, collate=None):
    """Checkpoint path kernel ``sum_t weight_t K_{w_t}(query, train)``, tiled under a budget.

    Args:
        model: the ``nn.Module`` whose checkpoints are given (eval mode if BatchNorm/Dropout).
        checkpoints: a sequence of ``(weights, weight)``: ``weights`` a state_dict or the path
            of a saved one (loaded with ``weights_only=True``), ``weight`` the learning rate (or
            sum of learning rates) that checkpoint stands for.
        train: training inputs (columns): a tensor, tuple of tensors, numpy array, or a torch
            Dataset whose items are model inputs (``collate`` batches them).
        query: query inputs (rows); ``None`` computes train x train with symmetric halves.
        outputs: ``"trace"``, ``"full"``, an int, or a callable (as in ``tangent_kernel``).
        out: ``None`` returns a tensor (if it fits half the budget); a ``.npy`` path writes the
            kernel to that file (read it with ``np.load(path, mmap_mode="r")``) and returns
            the path.
        memory_budget: bytes or a string like ``"2GB"`` bounding the working memory.
        dtype: precision of the per-checkpoint Grams and of the stored kernel; tiles are
            accumulated over checkpoints in float64 either way.
        resume: with ``out=``, continue a run that was interrupted (completed tiles are kept;
            other arguments than the journal's raise, and nothing is overwritten).
        progress: show a progress bar over tiles and checkpoints.

    Returns:
        ``[M, N]`` (``[M, N, C, C]`` for ``outputs="full"``) tensor, or the path ``out``.
    """
    p = plan(model, checkpoints, train, query, outputs=outputs, out=out,
             memory_budget=memory_budget, dtype=dtype, collate=collate)
    return run_plan(p, resume=resume, progress=progress)


def run_plan(p: PathKernelPlan, *, resume: bool = True, progress: bool = True):
    c = p._ctx
    mplan, spec, dtype, rows, cols = c["mplan"], c["spec"], c["dtype"], c["rows"], c["cols"]
    states, weights = c["states"], c["weights"]
    fingerprint = {
        "checkpoints": [_fingerprint_state(s, w) for s, w in zip(states, weights)],
        "train": cols.fingerprint(),
        "query": None if p.symmetric else rows.fingerprint(),
        "outputs": c["outputs"] if isinstance(c["outputs"], (str, int)) else getattr(
            c["outputs"], "__qualname__", repr(c["outputs"])),
        "tiles": [p.row_block, p.col_block],
    }
    store = open_store(c["out"], p.shape, dtype, fingerprint, resume)
    M, N = p.shape[:2]
    R, Cb = p.row_block, p.col_block
    todo = [t for t in p.tiles if t not in store.done]
    bar = progress_bar(progress, total=len(todo) * len(states), desc="path kernel", unit="tile-ckpt")

    def feats(src: Source, lo: int, hi: int, state) -> Block:
        x = cast_inputs(as_inputs(src.get(lo, hi), src.name), dtype)
        return features(mplan, spec, state, x, c["chunk"], src.name)

    try:
        cached_row = None
        for (i, j) in todo:
            r0, r1 = i * R, min(M, (i + 1) * R)
            c0, c1 = j * Cb, min(N, (j + 1) * Cb)
            if cached_row is None or cached_row[0] != i:
                cached_row = (i, [feats(rows, r0, r1, s) for s in states])
            C = p.shape[2] if len(p.shape) == 4 else 1
            acc4 = torch.zeros(r1 - r0, c1 - c0, C, C, dtype=torch.float64)
            diagonal = p.symmetric and i == j
            side1, side2 = [], []
            for t, (s, w) in enumerate(zip(states, weights)):
                cb = None if diagonal else feats(cols, c0, c1, s)
                a, b = to_terms(mplan, cached_row[1][t], cb, scale=w)
                side1 += a
                side2 += b or []
                bar.update(1)
            _backend.accumulate(acc4, side1, None if diagonal else side2)
            tile = spec.finish(acc4).to(dtype)
            store.write(r0, c0, tile)
            if p.symmetric and i != j:
                store.write(c0, r0, tile.transpose(0, 1).transpose(2, 3) if tile.dim() == 4
                            else tile.t())
            store.commit((i, j))
    finally:
        bar.close()
        store.close()
    return store.result()
