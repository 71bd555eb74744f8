"""The plan of a checkpoint path kernel: validation, memory model, tile solver.

``plan()`` checks every argument, probes the model, loads the checkpoints, measures the
features of a sample and cuts the output into tiles that fit the memory budget.
``path_kernel`` (``path_kernel.py``) then runs the plan.
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .. import _backend
from .._autograd import with_autograd
from .._capture.blocks import Block, Factor, concat_blocks, pair_cost, tied_cost, to_terms
from .._capture.extract import CHUNK, extract, fit_projection
from .._capture.outputs import OutputsArg, OutputSpec
from .._capture.plan import ModelPlan, cast_inputs, check_model
from .._capture.probe import probe
from .._capture.projection import SAMPLE, check_project
from .._checks import (
    as_inputs,
    check_inputs_match,
    check_same_features,
    check_same_keys,
    resolve_dtype,
    run_model_once,
    split_targets,
)
from .._fingerprint import callable_fingerprint, model_code, state_fingerprint, weights_fingerprint
from .._storage.checkpoints import allocated_bytes, check_checkpoints, checkpoint_state
from .._storage.diskio import fmt_bytes
from .._storage.sources import Source, WithTargets, source
from .._storage.spill import FeatureSpill
from .._storage.store import parse_bytes, resumed_tiling
from .._timing import best_time
from .collective import Collective
from .sharing import deal


@dataclass
class Job:
    """Everything ``path_kernel`` needs to run a plan (validated, loaded)."""

    model_plan: ModelPlan
    spec: OutputSpec
    dtype: torch.dtype
    rows: Union[Source, WithTargets]
    cols: Union[Source, WithTargets]
    states: list  # functional_call states, one per checkpoint
    weights: List[float]  # each checkpoint's weight (learning rate)
    out: Optional[str]
    outputs: OutputsArg
    chunk: int  # examples per forward/backward pass
    state_bytes: int = 0  # what the checkpoints' states take beyond the caller's tensors
    scratch: int = 0  # bytes per example of a chunk while it is extracted (activations, factors)
    collective: Optional[Collective] = None  # the ranks that run the plan together

    def header(self, symmetric: bool) -> dict:
        """What identifies the problem (a store's journal header, without the tiling)."""
        outputs = (
            self.outputs
            if isinstance(self.outputs, (str, int))
            else callable_fingerprint(self.outputs)
        )
        proj = self.model_plan.projection
        return {
            "model": model_code(self.model_plan.model),
            "checkpoints": [state_fingerprint(s, w) for s, w in zip(self.states, self.weights)],
            "train": self.cols.fingerprint(),
            "query": None if symmetric else self.rows.fingerprint(),
            "outputs": outputs,
            "projection": None if proj is None else proj.fingerprint(),
        }


@dataclass
class Costs:
    """Costs of this model on this machine, measured by ``plan()`` (seconds, FLOP/s)."""

    call: float  # fixed cost of one feature extraction (one block, one checkpoint)
    per_example: float  # per example of an extraction
    gram_call: float  # fixed cost of one native accumulation call
    gram_rate: float  # FLOP/s of the Gram work
    commit: float  # committing a band of tiles to the store (two fsyncs)
    per_byte: float  # writing a byte to the store
    row_write: float = 0.0  # one write of a row of a band's strip (a system call)
    spill_write: float = 1e-9  # writing a byte of features to the scratch file
    spill_read: float = 5e-10  # reading one back (from the page cache)
    disk_read: float = 1e-9  # reading a byte the page cache cannot hold (from the disk)
    cache_bytes: float = float("inf")  # memory the page cache may use (MemAvailable)
    cores: float = 1.0  # threads the Grams run on (inf: a GPU, which reads do not slow)

    def spill_rates(self, spilled: float) -> Tuple[float, float]:
        """Seconds per byte written to and read from a scratch file of ``spilled`` bytes: a
        file larger than the page cache goes to the disk, and the tiles' cyclic reads of it
        then miss the cache."""
        if spilled <= self.cache_bytes:
            return self.spill_write, self.spill_read
        return max(self.spill_write, self.disk_read), max(self.spill_read, self.disk_read)


@dataclass
class PathKernelPlan:
    """What ``path_kernel`` will do; ``print(plan)`` shows it.

    The output is cut into tiles of ``row_block x col_block`` examples. ``ckpt_group``
    checkpoints are handled at once: all of them (the row block's features are then cached
    for every checkpoint and each tile is accumulated over the whole path in one native call),
    or fewer, streamed through ``band`` tiles of a row block that are accumulated together
    (their row features then recomputed once per band). A column block's features are held
    ``col_pass`` examples at a time (one extraction pass; the whole block when it equals
    ``col_block``), so a large row block fits beside them; passes kept in a scratch file are
    read one ahead, behind the Grams. The choice minimizes the estimated time (from costs
    measured on the model) under the memory budget.
    """

    shape: Tuple[int, ...]
    symmetric: bool
    checkpoints: int
    row_block: int
    col_block: int
    band: int
    ckpt_group: int
    tiles: List[Tuple[int, int]]
    memory_bytes: int
    feature_bytes_per_example: int
    budget_bytes: int
    gram_flops: float
    extractions: int
    est_seconds: float
    est_parts: Tuple[float, float, float]  # extraction, Gram, store
    store: str
    spill_bytes: int = 0  # features written once to a scratch file beside ``out`` and reread
    spill_sides: Tuple[bool, bool] = (False, False)  # whether row / column features are spilled
    col_pass: int = 0  # column examples whose features are held at once (0: col_block)
    job: Optional[Job] = field(default=None, repr=False)
    costs: Optional[Costs] = field(default=None, repr=False)  # measured (rank 0's on a group)
    pair_flops: float = field(default=0.0, repr=False)

    def ranks(self, world: Optional[int] = None) -> list:
        """What each of ``world`` ranks (default: this plan's group) would extract, compute
        and write on a fresh run, with its estimated time (``sharing.RankWork``); features
        kept in a scratch file are then extracted once across the ranks."""
        coll = None if self.job is None else self.job.collective
        world = world or (coll.world if coll is not None else 1)
        return deal(self, self.tiles, world, world > 1 and self.spill_bytes > 0)

    @property
    def passes(self) -> bool:
        """Whether column blocks are consumed in several passes (``col_pass`` examples)."""
        return 0 < self.col_pass < self.col_block

    @property
    def tiling(self) -> list:
        """What fixes a tile's bytes (the journal's ``tiles``): the blocks, the checkpoints
        at once, the examples per extraction pass and, where it is not the whole column
        block, the column pass (absent in files of runs that had none)."""
        job = self.job
        return [self.row_block, self.col_block, self.ckpt_group, job.chunk] + (
            [self.col_pass] if self.passes else []
        )

    def __str__(self) -> str:
        M, N = self.shape[:2]
        kind = "train x train (symmetric halves)" if self.symmetric else "query x train"
        T, k = self.checkpoints, self.ckpt_group
        per = "pass of column examples" if self.passes else "tile"
        how = (
            f"row-block features cached for every checkpoint; one native call per {per}"
            if k == T
            else f"{k} checkpoint(s) at a time through {self.band} tile(s) of a "
            "row block accumulated together"
        )
        if self.passes:
            how += f"; column features held {self.col_pass} examples at a time" + (
                " (the next pass read ahead of the Grams)" if self.spill_bytes else ""
            )
        ex, gram, store = self.est_parts
        spill = (
            f"; {fmt_bytes(self.spill_bytes)} of them kept in a scratch file beside the output "
            "and read back, not recomputed"
            if self.spill_bytes
            else ""
        )
        return "\n".join(
            [
                f"path kernel {kind}: {M} x {N}{' x C x C' if len(self.shape) == 4 else ''}, "
                f"{T} checkpoint(s), store: {self.store}",
                f"  tiles: {len(self.tiles)} of {self.row_block} x {self.col_block}; {how}",
                f"  features: {self.feature_bytes_per_example} B per example per checkpoint; "
                f"{self.extractions:,} example forward/backward passes "
                f"({self.extractions / ((N if self.symmetric else M + N) * T):.2f} per example "
                f"and checkpoint){spill}",
                f"  memory {fmt_bytes(self.memory_bytes)} of the {fmt_bytes(self.budget_bytes)} "
                f"budget; Gram work {self.gram_flops / 1e9:,.1f} GFLOP",
                f"  estimated {self.est_seconds:,.1f} s (features {ex:,.1f} s, "
                f"Grams {gram:,.1f} s, "
                f"store {store:,.1f} s; costs measured on this model)",
            ]
            + (
                []
                if self.job is None or self.job.model_plan.projection is None
                else ["  " + self.job.model_plan.projection.summary(self.job.model_plan)]
            )
            + self._rank_lines()
        )

    def _rank_lines(self) -> List[str]:
        coll = None if self.job is None else self.job.collective
        if coll is None or not coll.active:
            return []
        work = self.ranks()
        slowest = max(w.seconds for w in work)
        head = f"  on {coll.world} ranks: the slowest estimated {slowest:,.1f} s" + (
            "; features kept in the scratch file are extracted once across the ranks"
            if self.spill_bytes
            else ""
        )
        shown = work if len(work) <= 8 else work[:4] + work[-2:]
        lines = [head] + ["    " + w.describe(self.feature_bytes_per_example) for w in shown]
        if len(shown) < len(work):
            lines.insert(5, f"    ... ({len(work) - len(shown)} more ranks)")
        return lines


def _block_bytes(b: Block) -> int:
    return sum(t.numel() * t.element_size() for f in b.factors.values() for t in f.tensors())


def _pair_flops(b: Block, stacked: bool) -> float:
    """2 x multiply-adds of the factor Grams for one pair of examples."""
    fl = 0.0
    for f in b.factors.values():
        S, C, dd = f.D.shape[1], f.D.shape[2], f.D.shape[3]
        CC = C if stacked else C * C
        if f.tied is not None:  # as blocks._tied_pair does
            V, u = f.tied.D.shape[3], int(torch.unique(f.A[f.A >= 0]).numel())
            fl += min(tied_cost(V, dd, u, f.tied.D.shape[1], C, stacked))
            continue
        if f.A is not None and f.A.dtype == torch.long:  # tokens: as blocks._token_pair does
            fl += min(pair_cost(S, max(1, int(torch.unique(f.A).numel())), dd, C, stacked))
            continue
        da = 0 if f.A is None else f.A.shape[2]
        fl += S * S * (da + CC * dd)
    return 2.0 * fl


def _job(
    model,
    checkpoints,
    train,
    query,
    outputs,
    out,
    dtype,
    collate,
    implementation="auto",
    targets=None,
    project=None,
    seed=0,
) -> Tuple[Job, tuple, Block]:
    """Validate the arguments, probe the model, load the checkpoints; also returns a sample
    block of examples (the row side's, with its targets) and its features (for the memory
    model)."""
    check_model(model)
    project = check_project(project, seed)
    ckpts = check_checkpoints(checkpoints)
    spec = OutputSpec(outputs, targets is not None)
    y_train, y_query = split_targets(targets, query is not None, ("train", "query"))
    dtype = resolve_dtype(dtype, model)
    like = next((p for p in model.parameters() if p.is_floating_point()), None)
    cols = source(train, "train", collate, like, y_train)
    rows = cols if query is None else source(query, "query", collate, like, y_query)
    check_same_keys(cols.keys, rows.keys, "train", "query")
    sample_x = as_inputs(rows.get(0, min(64, rows.n)), rows.name)
    sample_rows = spec.split(sample_x)[0]
    check_inputs_match(model, sample_rows, rows.name)
    run_model_once(model, sample_rows, rows.name, rows.keys)
    mplan = ModelPlan(model, implementation, cols.keys)
    probe(mplan, sample_rows, dtype=dtype)
    if query is not None:
        sample_cols = spec.split(as_inputs(cols.get(0, min(8, cols.n)), "train"))[0]
        check_inputs_match(model, sample_cols, "train")
        check_same_features(sample_cols, sample_rows, "train", "query")
        run_model_once(model, sample_cols, "train", cols.keys)
        probe(mplan, sample_cols, dtype=dtype)
    states = [checkpoint_state(mplan, w, dtype, i) for i, (w, _) in enumerate(ckpts)]
    if project is not None:  # k split by the gradient norms of the first train examples
        first = as_inputs(cols.get(0, min(SAMPLE, cols.n)), "train")
        fit_projection(mplan, spec, states[0], cast_inputs(first, dtype), project, seed)
    sample = extract(mplan, spec, states[0], cast_inputs(sample_x, dtype))
    job = Job(
        mplan,
        spec,
        dtype,
        rows,
        cols,
        states,
        [w for _, w in ckpts],
        out,
        outputs,
        CHUNK,
        sum(allocated_bytes(w, mplan, dtype) for w, _ in ckpts),
        _scratch(mplan, spec, states[0], sample_x, sample, dtype),
    )
    return job, sample_x, sample


def _scratch(mplan, spec, state, sample_x, sample: Block, dtype) -> int:
    """Bytes per example that extracting a chunk holds at once: a few times the larger of its
    features and its activations with their output gradients (what autograd keeps, and the
    exact factors a projection is read from)."""
    from .._capture.extract import run_captured

    acts = 0
    if mplan.groups:
        x = cast_inputs(tuple(t[:1] for t in spec.split(sample_x)[0]), dtype)
        _, uses = run_captured(mplan, state, x, mplan.trace_for(x))
        acts = sum(u.x.numel() + sample.C * u.y.numel() for u in uses if u.x is not None)
    acts += sample.C * sum(mplan.params[n].numel() for n in mplan.dense)
    return SCRATCH * max(_block_bytes(sample) // max(1, sample.n), acts * (dtype.itemsize))


EXTRACT_RATE = 5e10  # nominal FLOP/s of the per-example gradient work (the choice of tiling)


def _nominal_costs(job: Job, sample_x: tuple, sample: Block, out) -> Costs:
    """Costs the tiling is chosen with: fixed rates applied to this model's work per example
    (its parameterized ops' FLOPs once forward and twice per output channel backward, and the
    GEMMs that materialize per-example gradients), so the choice depends on the problem and
    the budget only: the same on every machine, rank and run."""
    from .._capture.extract import run_captured

    x = cast_inputs(tuple(t[:1] for t in job.spec.split(sample_x)[0]), job.dtype)
    mplan = job.model_plan
    flops = materialize = 0.0
    C = sample.C
    if mplan.groups:
        _, uses = run_captured(mplan, job.states[0], x, mplan.trace_for(x))
        flops = sum(use_flops(u) for u in uses)
        for k, f in sample.factors.items():
            if f.materialized and k >= 0 and mplan.groups[k].kind == "matrix":
                S = sum(
                    u.y.numel() // u.y.shape[-1]
                    for u in uses
                    if u.weight is not None and u.weight.name == mplan.groups[k].weight
                )
                materialize += 2.0 * S * f.D.shape[2] * f.D.shape[3]
    dense = sum(mplan.params[n].numel() for n in mplan.dense)
    work = (1 + 2 * C) * (flops + 2.0 * dense) + materialize
    return Costs(
        call=1e-3,
        per_example=1e-5 + work / EXTRACT_RATE,
        gram_call=1e-4,
        gram_rate=5e10,
        commit=2e-3 if out is not None else 0.0,
        per_byte=1e-9 if out is not None else 0.0,
        row_write=ROW_WRITE if out is not None else 0.0,
    )


def use_flops(u) -> float:
    """Forward FLOPs of one recorded use, for one example's share of the batch."""
    n = max(1, u.y.shape[0]) if u.y.dim() else 1
    if u.op in ("linear", "matmul", "addmm"):
        return 2.0 * u.x.numel() * u.y.shape[-1] / n
    if u.op == "conv":
        k = 1
        for s in u.ctx["kernel"]:
            k *= s
        return 2.0 * u.y.numel() * (u.x.shape[1] // u.ctx["groups"]) * k / n
    return float(u.y.numel()) / n


def _measure(
    job: Job, sample_x: tuple, sample: Block, out, fb: int, budget: int, choice: "_Choice"
) -> Costs:
    """Time one-example and pass-sized extractions and accumulations on this model, in the
    shapes of ``choice``: its native calls (rows: a tile's, columns: a tile's or a pass's) and
    its extraction passes (``chunk`` examples, the sample's repeated where it has more)."""
    shape, chunk = (choice.R, choice.col_pass), choice.chunk
    spec, mplan = job.spec, job.model_plan
    x = cast_inputs(sample_x, job.dtype)
    one = tuple(t[:1] for t in x)
    dev = x[0].device  # the features'

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t1 = best_time(lambda: (extract(mplan, spec, job.states[0], one), sync()), 2)
    n = sample.n
    # passes of more examples than the caches hold cost more per example (small-cnn: 79 us
    # in passes of 2,048 against 36 us measured on 64)
    xs = x if chunk <= n else tuple(t.repeat_interleave(-(-chunk // n), 0)[:chunk] for t in x)
    tn = best_time(lambda: (extract(mplan, spec, job.states[0], xs), sync()), 2)
    per_example = max((tn - t1) / max(xs[0].shape[0] - 1, 1), 1e-9)
    b1 = extract(mplan, spec, job.states[0], one)
    C = 1 if spec.stacked else sample.C
    # the Gram rate in calls of the plan's shape, on the sample's features repeated to the
    # plan's rows and columns (the plan holds as much within the budget): a row block larger
    # than the caches streams from memory at every call (small-cnn-10 under 48 MB: 128 x 16
    # calls ran at half the rate measured on 16 x 16)
    want = shape[0] + shape[1]
    fit = budget // max(1, fb * n)
    big = concat_blocks([sample] * max(1, min(-(-want // n), fit)))
    m = big.n

    def timed(calls):  # (rows, columns, row block, column block) of each native call
        def run():  # the pairing into native terms is part of every call's fixed cost
            for r, c, a, b in calls:
                out = torch.zeros(r, c, C, C, dtype=torch.float64, device=dev)
                _backend.accumulate(out, *to_terms(mplan, a, b, stacked=spec.stacked))
            sync()

        return best_time(run, 2)

    g1 = timed([(1, 1, b1, b1)])
    rows, cols = min(m, shape[0]), min(m, shape[1])
    head = big.part(0, rows)
    # columns past the rows where there are (a tile's columns are other examples), 4 at most
    first = rows if m - rows >= cols else 0
    pieces = [(a, min(m, a + cols)) for a in range(first, m, cols)][:4]
    gn = timed([(rows, b - a, head, big.part(a, b)) for a, b in pieces])
    flops = _pair_flops(sample, spec.stacked) * rows * sum(b - a for a, b in pieces)
    rate = flops / max(gn - len(pieces) * g1, 1e-9) if m > 1 else 50e9
    costs = Costs(max(t1 - per_example, 0.0), per_example, g1, max(rate, 1e8), 2e-5, 1e-10)
    costs.cores = float("inf") if dev.type == "cuda" else float(torch.get_num_threads())
    if out is not None:  # fsyncs in the output's folder, after a small and a large write
        folder = os.path.dirname(os.path.abspath(os.fspath(out)))
        try:
            if os.path.isdir(folder):
                with tempfile.TemporaryFile(dir=folder) as f:

                    def sync(nbytes):
                        f.seek(0)
                        f.write(b"x" * nbytes)
                        f.flush()
                        os.fsync(f.fileno())

                    small = best_time(lambda: sync(4096), 3)
                    large = best_time(lambda: sync(1 << 22), 2)
                    costs.row_write = _measure_row_write(f.fileno())
                costs.commit, costs.per_byte = 2 * small, max(large - small, 0.0) / (1 << 22)
                costs.spill_write, costs.spill_read, costs.disk_read = _measure_spill(folder)
                costs.cache_bytes = _available_memory()
        except OSError:  # a full or read-only disk: the run itself says so, naming the file
            pass
    return costs


def _available_memory() -> float:
    """Bytes the page cache may hold besides the run (Linux's MemAvailable; else no limit)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def _disk_read(fd: int, nbytes: int) -> Optional[float]:
    """Seconds per byte of reading ``nbytes`` of a synced file past the page cache
    (``O_DIRECT``); None where the filesystem does not allow it."""
    import mmap

    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        os.fsync(fd)
        direct = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None
    try:
        with mmap.mmap(-1, nbytes) as buf:  # page-aligned, as O_DIRECT needs
            return best_time(lambda: os.preadv(direct, [buf], 0), 2) / nbytes
    except OSError:
        return None
    finally:
        os.close(direct)


def _measure_spill(folder: str, nbytes: int = 1 << 23) -> Tuple[float, float, float]:
    """Seconds per byte of writing features to a scratch file in ``folder``, reading them
    back from the page cache, and from the disk (``FeatureSpill``: a block of 8 MiB)."""
    block = Block(1, 1, {0: Factor(None, torch.ones(1, 1, 1, nbytes // 4), 0.0, True)})
    spill = FeatureSpill(folder)
    try:
        keys = iter(range(1 << 30))
        with warnings.catch_warnings():  # a full disk: the caller keeps the nominal costs
            warnings.simplefilter("ignore")
            write = best_time(lambda: spill.put(next(keys), block), 3)
        if spill.full:
            raise OSError(errno.ENOSPC, "no space for the scratch file")
        read = best_time(lambda: spill.get(0), 3)
        disk = _disk_read(spill.fileno(), nbytes)
    finally:
        spill.close()
    return write / nbytes, read / nbytes, max(read / nbytes, disk or Costs.disk_read)


@dataclass
class _Choice:
    R: int
    Cb: int
    band: int
    k: int
    chunk: int
    memory: int
    est: float
    parts: Tuple[float, float, float]
    tiles: int
    extractions: int
    spill: int = 0  # bytes of features kept in a scratch file (0: none, all recomputed)
    spill_sides: Tuple[bool, bool] = (False, False)  # rows, columns kept there
    passes: bool = False  # column blocks consumed one extraction pass (chunk) at a time

    @property
    def col_pass(self) -> int:
        return min(self.chunk, self.Cb) if self.passes else self.Cb


@dataclass
class _Problem:
    M: int
    N: int
    T: int
    symmetric: bool
    fb: int  # feature bytes per example and checkpoint
    cc: int  # accumulator bytes per pair of examples
    fixed: int  # memory besides the tiling
    pair_flops: float
    out_item: int  # stored bytes per pair of examples
    spill: bool = False  # features may be kept in a scratch file (with out=, on the CPU)
    scratch: int = 0  # bytes per example of a chunk being extracted (0: SCRATCH x features)


SPILL_MAX = 64 << 30  # the most feature bytes a plan writes to its scratch file


def _cost(
    P: _Problem,
    R: int,
    Cb: int,
    band: int,
    k: int,
    chunk: int,
    costs: Costs,
    spill: bool = False,
    passes: bool = False,
) -> _Choice:
    """Memory and estimated time of one tiling (``spill``: features that are needed again
    are written to a scratch file once and read back, not recomputed; ``passes``: a column
    block's features are held one extraction pass at a time, the next read ahead from the
    scratch file while the Grams of the current one run)."""
    M, N, T = P.M, P.N, P.T
    nr, nc = math.ceil(M / R), math.ceil(N / Cb)
    tiles = nr * (nc + 1) // 2 if P.symmetric else nr * nc
    offdiag = tiles - (nr if P.symmetric else 0)
    cols_per_row = (nc + 1) / 2 if P.symmetric else nc
    ahead = passes and spill
    # a chunk's autograd scratch while extracting: a few times its features
    # ... and the band's float64 accumulators, plus the previous band's finished tiles while
    # they are being written; the row block's features and a column block's (or, in
    # passes, one pass's and the one read ahead)
    cols = (2 if ahead else 1) * min(chunk, Cb) if passes else Cb
    mem = (
        P.fixed
        + chunk * (P.scratch or SCRATCH * P.fb)
        + R * band * Cb * (P.cc + P.out_item)
        + (R + cols) * k * P.fb
    )
    # row features: once per row block when all checkpoints are held, else once per band;
    # column features: once per off-diagonal tile; both for every checkpoint
    bands = nr * math.ceil(cols_per_row / band)
    row_passes = nr if k == T else bands  # all checkpoints' row features outlive a band
    row_uses, col_uses = T * row_passes, offdiag * T
    spilled = read = col_read = 0.0  # examples' features written to / read from the scratch file
    # which sides a spilling run keeps: those needed again (rows by later bands of their row
    # block, columns by later row blocks; train x train: both, a block being both)
    sides = (P.symmetric or row_passes > nr, P.symmetric or nr > 1) if spill else (False, False)
    if not spill:
        t_ex = row_uses * _extraction(R, chunk, costs) + col_uses * _extraction(Cb, chunk, costs)
        extractions = row_uses * R + col_uses * Cb
    elif P.symmetric:  # every block extracted once: the first as a row, the others as columns
        t_ex = nr * T * _extraction(R, chunk, costs)
        extractions = spilled = N * T
        read = max(0, row_uses * R + col_uses * Cb - N * T)
        col_read = max(0, col_uses * Cb - max(0, N - R) * T)
    else:
        t_ex = nr * T * _extraction(R, chunk, costs) + nc * T * _extraction(Cb, chunk, costs)
        extractions = nr * T * R + nc * T * Cb
        spilled = (M * T if sides[0] else 0) + (N * T if sides[1] else 0)
        col_read = max(0, (col_uses - nc * T) * Cb)
        read = max(0, (row_uses - nr * T) * R) + col_read
    write_rate, read_rate = costs.spill_rates(spilled * P.fb)
    t_ex += P.fb * (spilled * write_rate + (read - col_read) * read_rate)
    t_cols = P.fb * col_read * read_rate
    pairs = N * (N + 1) / 2 if P.symmetric else float(M) * N
    calls = (tiles - offdiag) + offdiag * (math.ceil(Cb / chunk) if passes else 1)
    t_gram = pairs * T * P.pair_flops / costs.gram_rate + calls * math.ceil(T / k) * costs.gram_call
    # column passes read ahead from the disk are read while the Grams run, yet a read still
    # takes CPU time (the copy out of the page cache; on a VM, the I/O path), which the Grams'
    # threads share: a read thread's time over the cores shows, or all of the reads' excess
    # over the Grams. From the page cache a read is all copy, and all of it shows. (ResNet-18,
    # 24 GiB spilled, 2 cores: 121 s of reads took 105 s of system time and slowed the Grams
    # from 136 to 197 s; counted as hidden, the estimate was 1.3-1.4x short.)
    hidden = ahead and spilled * P.fb > costs.cache_bytes
    t_ex += max(t_cols - t_gram, t_cols / costs.cores) if hidden else t_cols
    t_store = (
        bands * costs.commit
        + store_writes(P.symmetric, R, Cb, band, N, bands, offdiag) * costs.row_write
        + float(M) * N * P.out_item * costs.per_byte
    )
    est = t_ex + t_gram + t_store
    return _Choice(
        R,
        Cb,
        band,
        k,
        chunk,
        mem,
        est,
        (t_ex, t_gram, t_store),
        tiles,
        int(extractions),
        int(spilled * P.fb),
        sides,
        passes,
    )


def _solve(
    P: _Problem, costs: Costs, budget: int, tiling: Optional[Tuple[int, ...]] = None
) -> Optional[_Choice]:
    """The tiling with the least estimated time whose memory fits ``budget`` (``tiling``:
    only that (row block, column block, checkpoints at once, chunk[, column pass]), e.g. a
    resumed run's)."""

    def sizes(n, most=1 << 30):  # tiles narrower than 16 run the GEMMs badly
        return sorted(s for s in {n} | {2**p for p in range(4, 30) if 2**p < n} if s <= most) or [
            most
        ]

    ks = sorted({math.ceil(P.T / m) for m in range(1, P.T + 1)}, reverse=True)
    best = None
    for R in [tiling[0]] if tiling else sizes(P.M):
        # a column block is extracted in one pass (at most CHUNK examples), or consumed in
        # several
        for Cb in [tiling[1]] if tiling else [R] if P.symmetric else sizes(P.N, CHUNK):
            nc = math.ceil(P.N / Cb)
            for k, band, chunk, passes in _variants(P.T, nc, ks, max(R, Cb), tiling, Cb):
                for spill in (False, True) if P.spill else (False,):
                    c = _cost(P, R, Cb, band, k, chunk, costs, spill, passes)
                    if spill and not 0 < c.spill <= SPILL_MAX:
                        continue
                    if c.memory <= budget and (best is None or c.est < best.est):
                        best = c
    return best


ROW_WRITE = 5e-6  # nominal seconds of a write system call


def store_writes(symmetric: bool, R: int, Cb: int, band: int, N: int, bands, offdiag) -> float:
    """Write calls of the store: a band's strip is one per row, or one when it spans whole
    rows; a symmetric tile's mirror image below the diagonal, one per column."""
    per_band = 1 if (not symmetric and band * Cb >= N) else R
    return bands * per_band + (offdiag * Cb if symmetric else 0)


def _measure_row_write(fd: int, rows: int = 256, nbytes: int = 256) -> float:
    """Seconds of one small ``pwrite`` at its own offset (a row of a narrow strip)."""
    from .._storage.diskio import write_all

    data = np.zeros(nbytes // 4, dtype=np.float32)
    return best_time(lambda: [write_all(fd, data, r * 4096) for r in range(rows)], 2) / rows


def _recost(P: _Problem, c: _Choice, costs: Costs) -> _Choice:
    """The same tiling under other costs."""
    return _cost(P, c.R, c.Cb, c.band, c.k, c.chunk, costs, c.spill > 0, c.passes)


def _extraction(size: int, chunk: int, costs: Costs) -> float:
    return math.ceil(size / chunk) * costs.call + size * costs.per_example


SCRATCH = 4


def _variants(T: int, nc: int, ks, most: int, tiling=None, least: int = 1):
    """(checkpoints at once, tiles per band, examples per extraction pass, column passes) to
    consider: a pass covers a whole column block (at least ``least`` examples: no
    concatenation), or the column block is consumed in passes of fewer."""
    whole = sorted(
        c
        for c in {min(most, CHUNK)} | {c for c in (16, 64, 256, 1024) if c < min(most, CHUNK)}
        if c >= least
    )
    chunks = [(c, False) for c in whole] + [
        (c, True) for c in (16, 32, 64, 256, 1024) if c < min(least, CHUNK)
    ]
    if tiling:  # a resumed run's: passes where its column pass is not the whole block
        ks = [tiling[2]]
        chunks = [(tiling[3], len(tiling) > 4 and tiling[4] < tiling[1])]
    for k in ks:
        bands = sorted({1, nc} | {2**p for p in range(1, 12) if 2**p < nc})
        for band in bands:
            for chunk, passes in chunks:
                yield k, band, chunk, passes


@with_autograd
def plan(
    model: nn.Module,
    checkpoints,
    train,
    query=None,
    *,
    outputs: OutputsArg = "trace",
    targets=None,
    out=None,
    memory_budget="2GB",
    dtype: torch.dtype = torch.float32,
    resume: bool = True,
    collate=None,
    group=None,
    spill: bool = True,
    project: Optional[int] = None,
    seed: int = 0,
) -> PathKernelPlan:
    """The tiling plan ``path_kernel`` would follow, with its memory use and estimated cost.

    With ``out=`` holding an interrupted run of the same problem (and ``resume=True``), the
    plan keeps that run's tiling, so the resumed file is bit-identical to an uninterrupted one.
    The tiling depends on the problem and the budget only (``memory_budget`` is per rank), so
    ``group`` (as in ``path_kernel``: a collective call) gives every rank the same plan.
    ``project`` and ``seed`` as in ``path_kernel``.
    """
    coll = Collective(group, "plan")
    return make_plan(
        coll,
        model,
        checkpoints,
        train,
        query,
        outputs,
        out,
        memory_budget,
        dtype,
        resume,
        collate,
        spill=spill,
        targets=targets,
        project=project,
        seed=seed,
    )


def make_plan(
    coll: Collective,
    model,
    checkpoints,
    train,
    query,
    outputs,
    out,
    memory_budget,
    dtype,
    resume,
    collate,
    implementation: str = "auto",
    measure: bool = True,
    spill: bool = True,
    targets=None,
    project=None,
    seed=0,
) -> PathKernelPlan:
    """The plan on every rank of ``coll``. ``measure=False`` (path_kernel) times the model
    only when the nominal costs suggest the budget may be too tight; the plan's estimate is
    then the nominal one."""
    budget = parse_bytes(memory_budget)
    job, sample_x, sample = coll.agree(
        lambda: _job(
            model,
            checkpoints,
            train,
            query,
            outputs,
            out,
            dtype,
            collate,
            implementation,
            targets,
            project,
            seed,
        )
    )
    symmetric = query is None
    job.collective = coll
    if coll.active:
        coll.check_same(
            {
                "model": weights_fingerprint(model),
                **job.header(symmetric),
                "memory_budget": budget,
                "dtype": str(job.dtype),
                "resume": resume,
                "spill": spill,
                "out": None if out is None else os.path.abspath(os.fspath(out)),
            }
        )
    recorded = resumed_tiling(out, job.header(symmetric)) if out is not None and resume else None
    fb = max(1, math.ceil(_block_bytes(sample) / sample.n))
    C = sample.C if job.spec.full else 1
    M, N, T = job.rows.n, job.cols.n, len(job.states)
    shape = (M, N, C, C) if job.spec.full else (M, N)

    # Memory besides the tiling: the checkpoints' states, the extraction scratch (a chunk's
    # autograd activations, a few times its features) and a kernel kept in RAM.
    fixed = job.state_bytes
    if out is None:
        kbytes = int(np.prod(shape)) * (4 if job.dtype == torch.float32 else 8)
        if kbytes > budget // 2:
            raise ValueError(
                f"out: the kernel needs {fmt_bytes(kbytes)}, more than half the memory budget "
                f"({fmt_bytes(budget)}); pass out='kernel.npy' to write it to disk"
            )
        fixed += kbytes
    cc = 8 * C * C
    pair = _pair_flops(sample, job.spec.stacked)
    # The tiling is chosen with nominal costs scaled by the model's work (so it depends only on
    # the problem and the budget: the same on every rank, in every run); the estimate shown is
    # that tiling's time under the costs measured on this machine.
    nominal = _nominal_costs(job, sample_x, sample, out)

    # features spill to a scratch file beside out= (host memory only: device features are
    # bounded by the device's budget, and a round trip through the host would cost more)
    on_cpu = all(q.device.type == "cpu" for q in job.model_plan.params.values())
    problem = _Problem(
        M,
        N,
        T,
        symmetric,
        fb,
        cc,
        fixed,
        pair,
        cc // 8 * (4 if job.dtype == torch.float32 else 8),
        spill=bool(spill) and out is not None and on_cpu,
        scratch=job.scratch,
    )

    def solve(b, tiling=None):
        return _solve(problem, nominal, b, tiling)

    def measured(c: _Choice) -> Costs:  # on the lead rank, the same costs on every rank
        return coll.broadcast(
            _measure(job, sample_x, sample, out, fb, budget, c) if coll.lead else None
        )

    if recorded is not None:
        choice = solve(budget, recorded)
        if choice is None:
            need = solve(1 << 50, recorded).memory
            raise ValueError(
                f"memory_budget: the interrupted run in {os.fspath(out)!r} uses tiles of "
                f"{recorded[0]} x {recorded[1]} that need {fmt_bytes(need)}, more than "
                f"{fmt_bytes(budget)}; pass at least that, or resume=False to start over"
            )
        costs = measured(choice) if measure else nominal
        choice = _recost(problem, choice, costs)
        return _make_plan(job, shape, symmetric, T, choice, fb, budget, pair, M, N, out, costs)
    choice = solve(budget)
    if choice is None:
        r, c = min(M, 16), min(N, 16)
        least = fixed + min(r, c) * job.scratch + (r + c) * fb + r * c * cc
        raise ValueError(
            f"memory_budget: {fmt_bytes(budget)} is too small for this model and "
            f"{T} checkpoint(s): the smallest tiles ({r} x {c}) need "
            f"{fmt_bytes(least)}"
            f"{'' if out is not None else ' with the kernel in memory (pass out=)'}"
        )
    roomy_nominal = solve(max(budget, 2 << 30))
    if not measure and not (choice.est > 3 * roomy_nominal.est and choice.est > 10):
        return _make_plan(job, shape, symmetric, T, choice, fb, budget, pair, M, N, out, nominal)
    costs = measured(choice)

    def timed(c: _Choice) -> _Choice:
        return _recost(problem, c, costs)

    chosen, roomy = timed(choice), timed(solve(max(budget, 2 << 30)))
    if chosen.est > 3 * roomy.est and chosen.est > 10:
        need = budget
        while need < (1 << 40) and timed(solve(need)).est > 3 * roomy.est:
            need *= 2
        raise ValueError(
            f"memory_budget: {fmt_bytes(budget)} leaves only an inefficient plan (estimated "
            f"{chosen.est:,.0f} s, against {roomy.est:,.0f} s with more memory); the smallest "
            f"budget within 3x of that is about {fmt_bytes(need)}"
        )
    return _make_plan(job, shape, symmetric, T, chosen, fb, budget, pair, M, N, out, costs)


def _make_plan(
    job, shape, symmetric, T, choice: _Choice, fb, budget, pair, M, N, out, costs: Costs
) -> PathKernelPlan:
    R, Cb = choice.R, choice.Cb
    job.chunk = choice.chunk
    tiles = [
        (i, j)
        for i in range(math.ceil(M / R))
        for j in range(i if symmetric else 0, math.ceil(N / Cb))
    ]
    pairs = (N * (N + 1) / 2) if symmetric else float(M) * N
    return PathKernelPlan(
        shape=shape,
        symmetric=symmetric,
        checkpoints=T,
        row_block=R,
        col_block=Cb,
        band=choice.band,
        ckpt_group=choice.k,
        tiles=tiles,
        memory_bytes=choice.memory,
        feature_bytes_per_example=fb,
        budget_bytes=budget,
        gram_flops=pairs * T * pair,
        extractions=choice.extractions,
        est_seconds=choice.est,
        est_parts=choice.parts,
        store="RAM" if out is None else str(out),
        spill_bytes=choice.spill,
        spill_sides=choice.spill_sides,
        col_pass=choice.col_pass,
        job=job,
        costs=costs,
        pair_flops=pair,
    )
