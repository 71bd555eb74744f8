"""``path_kernel``: checkpoint path kernels of any size, tiled under a memory budget.

``K^p(x, x') = sum_t weight_t K_{w_t}(x, x')`` over a list of checkpoints. The output (query
rows x train columns, or train x train) is cut into tiles (``tiling.py``); each tile is
accumulated in float64 over all checkpoints, then written once to its store (RAM or a
resumable ``.npy``). The row block's per-layer features are cached for every checkpoint and
the column block's recomputed (or read back from a scratch file), whole or one extraction
pass at a time, so only a band of tiles, one row block's features and one column block's (or
pass's) features are ever in memory. Passes kept in the scratch file are read one ahead, in a
thread, while the native Grams of the current one run.
"""

from __future__ import annotations

import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

import torch
from torch import nn

from .. import _backend
from .._autograd import with_autograd
from .._capture.blocks import Block, gather_blocks, to_terms
from .._capture.extract import features
from .._capture.outputs import OutputsArg
from .._capture.plan import cast_inputs
from .._checks import as_inputs
from .._progress import progress_bar
from .._storage.diskio import fmt_bytes
from .._storage.sources import Source
from .._storage.spill import FeatureSpill, remove_stale, shared_name
from .._storage.store import Writer, open_store
from .collective import Collective
from .sharing import RankWork, bands_of, column_passes, deal
from .tiling import PathKernelPlan, make_plan


@with_autograd
def path_kernel(
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
    progress: bool = True,
    collate=None,
    group=None,
    spill: bool = True,
    project: Optional[int] = None,
    seed: int = 0,
):
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
        targets: per-example targets, batch first, tensors or numpy arrays (memory-mapped
            ``.npy`` too): ``Y_train``, or ``(Y_train, Y_query)`` with ``query``. The kernel is
            then that of the per-example losses ``outputs(f(x), y)`` (``outputs`` a callable
            such as ``pathkernel.losses.cross_entropy``): with the learning rates as weights,
            TracInCP's scores.
        out: ``None`` returns a tensor (if it fits half the budget); a ``.npy`` path writes the
            kernel to that file (read it with ``np.load(path, mmap_mode="r")``) and returns
            the path.
        memory_budget: bytes or a string like ``"2GB"`` bounding the working memory.
        dtype: precision of the per-checkpoint Grams and of the stored kernel; tiles are
            accumulated over checkpoints in float64 either way.
        resume: with ``out=``, continue a run that was interrupted (completed tiles are kept;
            other arguments than the journal's raise, and nothing is overwritten).
        progress: show a progress bar over tiles and checkpoints (on rank 0).
        collate: batches a Dataset's items.
        group: run as a collective call of a torch.distributed group: ``None`` (the default
            group when torch.distributed is initialised with more than one rank), ``False``
            (this process alone) or a ``ProcessGroup``. Every rank calls with the same
            arguments; each takes whole row blocks of the tile grid, which depends only on
            the problem and ``memory_budget`` (per rank), so the result is bit-identical to a
            single process with the same threads per process. With ``out=`` (a shared
            filesystem) every rank writes its tiles and journal and returns the path; without,
            rank 0 returns the tensor and the other ranks ``None``.
        spill: with ``out=`` on the CPU, features that several tiles need (a column block's,
            when there are several row blocks) may be written once to an unnamed scratch file
            in ``out``'s folder and read back instead of recomputed, when the plan estimates
            that faster (at most 64 GiB; ``plan()`` shows how much). The result is the same
            bit for bit. ``False`` never writes one.
        project: ``k``: each example's per-checkpoint gradient replaced by a ``k``-dimensional
            random projection (as in ``tangent_kernel``): the features are small, so the plan
            keeps them instead of recomputing. The sketch is the same at every checkpoint, on
            every rank and in every resumed run (fixed by ``seed``, the model, and the first
            8 train examples at the first checkpoint, whose gradient norms split ``k`` over
            the layers), so ``train x train`` and ``query x train`` share it.
        seed: the projection's seed.

    Returns:
        ``[M, N]`` (``[M, N, C, C]`` for ``outputs="full"``) tensor, or the path ``out``.
    """
    coll = Collective(group, "path_kernel")
    p = make_plan(
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
        measure=False,
        spill=spill,
        targets=targets,
        project=project,
        seed=seed,
    )
    return run_plan(p, resume=resume, progress=progress)


def _band_writes(spec, dtype, symmetric: bool, i: int, r0: int, Cb: int, accs: dict):
    """A band's finished tiles as (row, column, host tile) writes: runs of adjacent tiles as
    one strip (one write per row), and their mirror images below the diagonal; and ``ready``,
    which the writer calls before touching them. Tiles on a GPU come back by asynchronous
    copies into pinned memory (``ready`` waits for them), so the copies and the store writes
    overlap the next band's work."""
    js = sorted(accs)
    runs: List[List[int]] = []
    for j in js:
        if runs and runs[-1][-1] == j - 1:
            runs[-1].append(j)
        else:
            runs.append([j])
    device = accs[js[0]].device
    writes = []
    for run in runs:
        # the run's tiles copied straight into one strip in the stored dtype (no per-tile
        # copies besides: the plan counts the accumulators and one strip)
        widths = [accs[j].shape[1] for j in run]
        rows, rest = accs[run[0]].shape[0], spec.finish(accs[run[0]]).shape[2:]
        strip = torch.empty((rows, sum(widths), *rest), dtype=dtype, device=device)
        c0 = 0
        for j, w in zip(run, widths):
            strip[:, c0 : c0 + w].copy_(spec.finish(accs[j]))
            c0 += w
        if device.type == "cuda":
            host = torch.empty(strip.shape, dtype=strip.dtype, pin_memory=True)
            host.copy_(strip, non_blocking=True)
        else:
            host = strip
        writes.append((r0, run[0] * Cb, host))
        if symmetric:
            c0 = 0
            for j, w in zip(run, widths):
                part = host[:, c0 : c0 + w]
                c0 += w
                if j != i:
                    mirror = part.transpose(0, 1).transpose(2, 3) if part.dim() == 4 else part.t()
                    writes.append((j * Cb, r0, mirror))
    ready = None
    if device.type == "cuda":
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(device))
        ready = copied.synchronize
    return writes, ready


def _open(p: PathKernelPlan, coll: Collective, resume: bool):
    """The store: rank 0 creates (or checks) it first, then the other ranks open it."""
    job = p.job
    fingerprint = {
        **job.header(p.symmetric),
        # a tile's bytes depend on its examples, on how its sum over checkpoints is
        # split and on the passes its features are extracted and consumed in
        "tiles": p.tiling,
    }

    def opener(create):
        return lambda: open_store(
            job.out,
            p.shape,
            job.dtype,
            fingerprint,
            resume,
            coll.rank,
            create,
            whole=not coll.active,
        )

    first = coll.agree(opener(True) if coll.lead else lambda: None)
    later = coll.agree(opener(False) if not coll.lead else lambda: None)
    return first if coll.lead else later


def run_plan(p: PathKernelPlan, *, resume: bool = True, progress: bool = True):
    coll = p.job.collective or Collective(False, "path_kernel")
    store = _open(p, coll, resume)
    try:
        # the finished tiles, as rank 0 reads and checks them (the same set on every rank),
        # and what a killed run's ranks left of their scratch files removed
        done = coll.broadcast(coll.agree(lambda: _verified_done(p, store) if coll.lead else None))
        todo = [t for t in p.tiles if t not in done]
        spill = coll.agree(lambda: _open_spill(p), undo=FeatureSpill.close)
        try:
            # the ranks share their scratch files when every one could make one
            share = coll.active and all(coll.gather_objects(spill is not None))
            mine = deal(p, todo, coll.world, share)[coll.rank]
            _compute(p, store, mine, spill, share, progress and coll.lead)
        finally:
            if spill is not None:
                spill.close()
        if coll.active and p.job.out is not None:
            coll.barrier("written")  # rank 0 holds the output's lock until every rank is done
    except BaseException as e:
        coll.fail(e)
        store.close()
        raise
    store.close()
    if not coll.active or p.job.out is not None:
        return store.result()
    gathered = coll.gather_to_lead(store.tiles)
    return store.assemble(t for ts in gathered for t in ts) if coll.lead else None


def _verified_done(p: PathKernelPlan, store) -> set:
    if p.job.out is not None:
        remove_stale(p.job.out)
    return store.verified_done()


def _compute(p: PathKernelPlan, store, mine: RankWork, spill, share: bool, progress: bool):
    """This rank's tiles (``mine``); ``spill``: the scratch file of features, or None;
    ``share``: first extract ``mine.blocks`` for every rank (``_share_features``)."""
    job, coll, todo = p.job, p.job.collective, mine.tiles
    mplan, spec, dtype, rows, cols = job.model_plan, job.spec, job.dtype, job.rows, job.cols
    states, weights = job.states, job.weights
    T, k = len(states), p.ckpt_group
    threads = coll.native_threads() if coll is not None else 0
    device = next((q.device for q in mplan.params.values()), torch.device("cpu"))
    M, N = p.shape[:2]
    R, Cb = p.row_block, p.col_block
    C = p.shape[2] if len(p.shape) == 4 else 1
    keep_rows, keep_cols = p.spill_sides
    pieces, span = column_passes(p), lambda j: (j * Cb, min(N, (j + 1) * Cb))

    def extracted(src: Source, lo: int, hi: int, t: int) -> Block:
        x = cast_inputs(as_inputs(src.get(lo, hi), src.name), dtype)
        return features(mplan, spec, states[t], x, job.chunk, src.name)

    def feats(src: Source, lo: int, hi: int, t: int) -> Block:
        key = (src.name, lo, hi, t)
        if spill is not None and key in spill:
            return spill.get(key)
        b = extracted(src, lo, hi, t)
        if spill is not None and (keep_rows if src is rows else keep_cols):
            spill.put(key, b)
        return b

    def row_feats(r0: int, r1: int, t: int) -> Block:
        # train x train in passes: a row block is its column passes (kept once, as such)
        if not (p.symmetric and p.passes):
            return feats(rows, r0, r1, t)
        return gather_blocks(r1 - r0, (feats(rows, a, b, t) for a, b in pieces(r0, r1)))

    if share:
        sources = {rows.name: rows, cols.name: cols}

        def block(key):
            return extracted(sources[key[0]], *key[1:])

        _share_features(coll, spill, mine.blocks, block, progress)
    bar = progress_bar(progress, total=len(todo) * T, desc="path kernel", unit="tile-ckpt")
    writer = Writer(store)
    ahead = ThreadPoolExecutor(1) if spill is not None and p.passes else None
    # a band's accumulators are reused by the next (zeroed), not freed and allocated again:
    # the allocator would keep the freed ones resident, and the process grow band by band
    pool: dict = {}

    def zeros(rows: int, cols: int) -> torch.Tensor:
        free = pool.get((rows, cols))
        if free:
            return free.pop().zero_()
        return torch.zeros(rows, cols, C, C, dtype=torch.float64, device=device)

    try:
        cached = None  # all checkpoints' row features, when the plan holds them all
        for i, js in bands_of(todo, p.band):
            r0, r1 = i * R, min(M, (i + 1) * R)
            # float64 accumulators on the features' device (the GPU's float64 output path
            # accumulates TF32/bf16 Grams exactly as the CPU does float32 ones), one per pass
            accs = {
                j: {
                    a: zeros(r1 - r0, b - a)
                    for a, b in ([span(j)] if p.symmetric and i == j else pieces(*span(j)))
                }
                for j in js
            }
            for g0 in range(0, T, k):
                group = range(g0, min(T, g0 + k))
                if k == T:
                    if cached is None or cached[0] != i:
                        cached = None  # the previous row block's features go first
                        cached = (i, [row_feats(r0, r1, t) for t in group])
                    row = cached[1]
                else:
                    row = [row_feats(r0, r1, t) for t in group]
                # (tile, first, end) of every pass of the band's column features
                work = []
                for j in js:
                    if p.symmetric and i == j:  # the row block against itself
                        side1 = []
                        for rb, t in zip(row, group):
                            side1 += to_terms(
                                mplan, rb, None, scale=weights[t], stacked=spec.stacked
                            )[0]
                        _backend.accumulate(accs[j][r0], side1, None, threads=threads)
                        bar.update(len(group))
                    else:
                        work += [(j, a, b) for a, b in pieces(*span(j))]
                pending = None
                for n, (j, a, b) in enumerate(work):
                    cbs = (
                        pending.result()
                        if pending is not None
                        else [feats(cols, a, b, t) for t in group]
                    )
                    pending = None
                    if ahead is not None and n + 1 < len(work):  # read the next pass meanwhile
                        keys = [(cols.name, *work[n + 1][1:], t) for t in group]
                        if all(key in spill for key in keys):
                            pending = ahead.submit(lambda ks=keys: [spill.get(k) for k in ks])
                    side1, side2 = [], []
                    for rb, cb, t in zip(row, cbs, group):
                        s1, s2 = to_terms(mplan, rb, cb, scale=weights[t], stacked=spec.stacked)
                        side1 += s1
                        side2 += s2
                    cbs = None
                    _backend.accumulate(accs[j][a], side1, side2, threads=threads)
                    if b == span(j)[1]:
                        bar.update(len(group))
            tiles = {j: _joined(list(parts.values())) for j, parts in accs.items()}
            writer.wait_written()  # the previous band's strips are gone before this one's
            writes, ready = _band_writes(spec, dtype, p.symmetric, i, r0, Cb, tiles)
            writer.submit(writes, [(i, j) for j in js], ready)
            for parts in accs.values():  # copied into the strips: free for the next band
                for t in parts.values():
                    pool.setdefault(tuple(t.shape[:2]), []).append(t)
            accs = tiles = writes = ready = None  # the writer holds the strips until written
    finally:
        bar.close()
        if ahead is not None:
            ahead.shutdown(wait=True)
        writer.close()  # the bands computed so far become durable, even after an error


def _joined(parts: List[torch.Tensor]) -> torch.Tensor:
    """A tile from its passes' accumulators (side by side along the columns)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _share_features(coll: Collective, spill, blocks, extract, progress: bool) -> None:
    """Extract this rank's ``blocks`` into its scratch file, then open every other rank's,
    so each block is extracted once across the ranks. The names go once every rank holds
    every file open (a job that dies later leaves none behind)."""
    bar = progress_bar(progress, total=len(blocks), desc="features", unit="block")
    try:
        for key in blocks:
            spill.put(key, extract(key))
            bar.update(1)
    finally:
        bar.close()
    coll.barrier("features extracted")  # a rank that failed stops the others here
    for r, (path, index) in enumerate(coll.gather_objects(spill.shared())):
        if r != coll.rank:
            spill.attach(path, index)
    coll.barrier("features opened")
    spill.unlink()


def _open_spill(p: PathKernelPlan):
    """The plan's scratch file beside the output, or None (none planned, or too little disk:
    then the features are recomputed, with the same result)."""
    if not p.spill_bytes:
        return None
    folder = os.path.dirname(os.path.abspath(os.fspath(p.job.out)))
    free = shutil.disk_usage(folder).free
    coll = p.job.collective
    if coll is not None and coll.active:  # shared: every row and column block
        M, N = p.shape[:2]
        need = p.feature_bytes_per_example * p.checkpoints * (N if p.symmetric else M + N)
    else:
        need = p.spill_bytes
    if free < need + max(need // 10, 1 << 28):
        warnings.warn(
            f"path_kernel: {fmt_bytes(free)} free in {folder!r}, too little to keep "
            f"{fmt_bytes(need)} of features there; they are recomputed instead "
            "(slower, same result)",
            stacklevel=3,
        )
        return None
    shared = coll is not None and coll.active  # named, for the other ranks to open
    return FeatureSpill(folder, shared_name(p.job.out) if shared else None)
