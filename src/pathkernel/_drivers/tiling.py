"""The plan of a checkpoint path kernel: validation, memory model, tile solver.

``plan()`` checks every argument, probes the model, loads the checkpoints, measures the
features of a sample and cuts the output into tiles that fit the memory budget.
``path_kernel`` (``path_kernel.py``) then runs the plan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .._capture.blocks import Block
from .._capture.extract import CHUNK, extract
from .._capture.outputs import OutputsArg, OutputSpec
from .._capture.plan import ModelPlan, cast_inputs, check_model
from .._capture.probe import probe
from .._autograd import with_autograd
from .._checks import (
    as_inputs,
    check_inputs_match,
    check_same_features,
    resolve_dtype,
    run_model_once,
)
from .._storage.checkpoints import check_checkpoints, checkpoint_state
from .._storage.sources import Source
from .._storage.store import parse_bytes

_GEMM_GUESS = 150e9   # FLOP/s used only for the plan's time estimate


@dataclass
class Job:
    """Everything ``path_kernel`` needs to run a plan (validated, loaded)."""

    model_plan: ModelPlan
    spec: OutputSpec
    dtype: torch.dtype
    rows: Source
    cols: Source
    states: list              # functional_call states, one per checkpoint
    weights: List[float]      # each checkpoint's weight (learning rate)
    out: Optional[str]
    outputs: OutputsArg
    chunk: int                # examples per forward/backward pass


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
    job: Optional[Job] = field(default=None, repr=False)

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
            f"  memory budget {fmt_bytes(self.budget_bytes)}; Gram work {self.gram_flops / 1e9:,.1f} GFLOP; "
            f"estimated {self.est_seconds:,.1f} s",
        ])


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _block_bytes(b: Block) -> int:
    total = 0
    for f in b.factors.values():
        total += f.D.numel() * f.D.element_size()
        if f.A is not None:
            total += f.A.numel() * f.A.element_size()
    return total


def _pair_flops(b: Block, stacked: bool) -> float:
    """2 x multiply-adds of the factor Grams for one pair of examples."""
    fl = 0.0
    for f in b.factors.values():
        S, C, dd = f.D.shape[1], f.D.shape[2], f.D.shape[3]
        # embedding tokens: the one-hot width is the union of tokens, at most 2 S per pair
        da = 0 if f.A is None else (f.A.shape[2] if f.A.dim() == 3 else 2 * S)
        fl += S * S * (da + (C if stacked else C * C) * dd)
    return 2.0 * fl


def _job(model, checkpoints, train, query, outputs, out, dtype, collate) -> Tuple[Job, Block]:
    """Validate the arguments, probe the model, load the checkpoints; also returns the
    features of a sample block (for the memory model)."""
    check_model(model)
    ckpts = check_checkpoints(checkpoints)
    spec = OutputSpec(outputs)
    dtype = resolve_dtype(dtype, model)
    cols = Source(train, "train", collate)
    rows = cols if query is None else Source(query, "query", collate)
    sample_rows = as_inputs(rows.get(0, min(32, rows.n)), rows.name)
    check_inputs_match(model, sample_rows, rows.name)
    run_model_once(model, sample_rows, rows.name)
    mplan = ModelPlan(model, "auto")
    probe(mplan, sample_rows)
    if query is not None:
        sample_cols = as_inputs(cols.get(0, min(8, cols.n)), "train")
        check_inputs_match(model, sample_cols, "train")
        check_same_features(sample_cols, sample_rows, "train", "query")
        run_model_once(model, sample_cols, "train")
        probe(mplan, sample_cols)
    states = [checkpoint_state(mplan, w, dtype, i) for i, (w, _) in enumerate(ckpts)]
    sample = extract(mplan, spec, states[0], cast_inputs(sample_rows, dtype))
    job = Job(mplan, spec, dtype, rows, cols, states, [w for _, w in ckpts], out, outputs, CHUNK)
    return job, sample


@with_autograd
def plan(model: nn.Module, checkpoints, train, query=None, *, outputs: OutputsArg = "trace",
         out=None, memory_budget="2GB", dtype: torch.dtype = torch.float32,
         collate=None) -> PathKernelPlan:
    """The tiling plan ``path_kernel`` would follow, with its memory use and estimated cost."""
    budget = parse_bytes(memory_budget)
    job, sample = _job(model, checkpoints, train, query, outputs, out, dtype, collate)
    symmetric = query is None
    fb = max(1, math.ceil(_block_bytes(sample) / sample.n))
    C = sample.C if job.spec.full else 1
    M, N, T = job.rows.n, job.cols.n, len(job.states)
    shape = (M, N, C, C) if job.spec.full else (M, N)

    # Memory: model states, then row features (all checkpoints), a column block's features,
    # the float64 tile and the extraction scratch (a chunk's activations, several times fb).
    state_bytes = T * sum(p.numel() for p in model.parameters()) * (4 if job.dtype == torch.float32 else 8)
    # a chunk's autograd scratch is a few times its features: keep it to ~1/8 of the budget
    job.chunk = max(16, min(CHUNK, max(M, N), budget // (64 * fb)))
    usable = budget - state_bytes - 8 * job.chunk * fb
    if out is None:
        kbytes = int(np.prod(shape)) * (4 if job.dtype == torch.float32 else 8)
        if kbytes > budget // 2:
            raise ValueError(
                f"out: the kernel needs {fmt_bytes(kbytes)}, more than half the memory budget "
                f"({fmt_bytes(budget)}); pass out='kernel.npy' to write it to disk")
        usable -= kbytes
    if usable <= 0:
        raise ValueError(f"memory_budget: {fmt_bytes(budget)} is too small for this model and "
                         f"{T} checkpoint(s){'' if out is not None else ' with the kernel in memory (pass out=)'}")
    cc = 8 * C * C
    # The column block's features are held for every checkpoint at once, so one native call
    # accumulates a tile over the whole path with the tile in cache.
    if symmetric:
        # R*T*fb (row cache) + R*T*fb (column features) + R*R*cc (tile) <= usable
        a, b = cc, 2 * T * fb
        R = int((-b + math.sqrt(b * b + 4 * a * usable)) / (2 * a))
        R = max(1, min(N, job.chunk, R))  # a column block is extracted in one pass: no concat
        Cb = R
    else:
        R = max(1, min(M, int(0.4 * usable) // (T * fb)))
        Cb = max(1, min(N, job.chunk, int(usable - R * T * fb) // (R * cc + T * fb)))
    tiles = [(i, j) for i in range(math.ceil(M / R))
             for j in range(i if symmetric else 0, math.ceil(N / Cb))]
    pair = _pair_flops(sample, job.spec.stacked)
    pairs = (N * (N + 1) / 2) if symmetric else float(M) * N
    col_widths = sum(min(N, (j + 1) * Cb) - j * Cb for i, j in tiles if not (symmetric and i == j))
    extractions = T * (M + col_widths)
    est = pairs * T * pair / _GEMM_GUESS + extractions * 6.0 * sum(
        p.numel() for p in model.parameters()) / 20e9
    return PathKernelPlan(
        shape=shape, symmetric=symmetric, checkpoints=T, row_block=R, col_block=Cb, tiles=tiles,
        cache_bytes=R * T * fb, tile_bytes=R * Cb * cc, feature_bytes_per_example=fb,
        budget_bytes=budget, gram_flops=pairs * T * pair, extractions=extractions, est_seconds=est,
        store="RAM" if out is None else str(out), job=job)
