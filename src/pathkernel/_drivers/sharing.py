"""Who does what in a collective path kernel: each rank's tiles, and the feature blocks it
extracts for every rank.

A plan that keeps features in a scratch file (they are needed by several tiles) has, on a
group, every row and column block extracted by one rank only: that rank writes it to its own
scratch file beside ``out`` (a filesystem every rank sees), and every rank then reads the
blocks its tiles need from whichever file holds them. Adding ranks so splits the extraction
as well as the Gram work.

The shared blocks go first, the largest to the least loaded rank; then the tiles, in
row-major order, are cut into one contiguous run per rank that brings it to the mean
estimated time (a run enters few row blocks, so row features are fetched few times; when
there are fewer row blocks than ranks, the runs split rows along the train side). Times are
those of the plan's costs, the same on every rank, so the deal is the same everywhere.

The per-rank times count the tiles actually dealt, band by band as ``path_kernel`` runs
them; ``tiling._cost`` is the closed form of the same cost model over a whole grid (what the
tile solver compares).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Tuple

Tile = Tuple[int, int]
Key = Tuple[str, int, int, int]  # a feature block: (source name, first, end, checkpoint)


@dataclass
class RankWork:
    """One rank's share of a plan, with its estimated time."""

    rank: int
    tiles: List[Tile] = field(default_factory=list)
    blocks: List[Key] = field(default_factory=list)  # extracted once, for every rank
    extracted: int = 0  # example forward/backward passes (per example and checkpoint)
    pairs: float = 0.0  # pairs of examples whose Grams it accumulates (x checkpoints)
    written: int = 0  # bytes of the kernel it writes
    seconds: float = 0.0

    def describe(self, fb: int) -> str:
        shared = sum(k[2] - k[1] for k in self.blocks)
        return (
            f"rank {self.rank}: {len(self.tiles)} tile(s), {self.pairs:,.0f} pairs; "
            f"{self.extracted:,} example passes ({shared:,} for every rank, "
            f"{shared * fb / 2**20:,.1f} MiB into its scratch file); writes "
            f"{self.written / 2**20:,.1f} MiB; estimated {self.seconds:,.1f} s"
        )


class _Model:
    """The plan's cost model, tile by tile (``shared``: every block is read from the ranks'
    scratch files; otherwise each rank extracts what its tiles need)."""

    def __init__(self, p, shared: bool):
        self.p, self.shared = p, shared
        self.M, self.N = p.shape[:2]
        self.T, self.c = p.checkpoints, p.costs
        self.fb = p.feature_bytes_per_example
        self.write_rate, self.read_rate = p.costs.spill_rates(p.spill_bytes)
        self.disk = p.spill_bytes > p.costs.cache_bytes  # reads wait on the disk, not the cores
        self.out_item = (p.shape[2] ** 2 if len(p.shape) == 4 else 1) * p.job.dtype.itemsize

    def rows(self, i: int) -> Tuple[int, int]:
        return i * self.p.row_block, min(self.M, (i + 1) * self.p.row_block)

    def cols(self, j: int) -> Tuple[int, int]:
        return j * self.p.col_block, min(self.N, (j + 1) * self.p.col_block)

    def diagonal(self, t: Tile) -> bool:
        return self.p.symmetric and t[0] == t[1]

    def extraction(self, n: int) -> float:  # a block of n examples at one checkpoint
        return math.ceil(n / self.p.job.chunk) * self.c.call + n * self.c.per_example

    def block(self, n: int) -> float:  # extracting a shared block and writing it
        return self.extraction(n) + n * self.fb * self.write_rate

    def fetch(self, n: int) -> float:  # a block for one use: read back, or extracted
        return n * self.fb * self.read_rate if self.shared else self.extraction(n)

    def row(self, i: int) -> float:  # a row block's features at every checkpoint
        r0, r1 = self.rows(i)
        return self.T * self.fetch(r1 - r0)

    def pairs(self, t: Tile) -> float:
        (r0, r1), (c0, c1) = self.rows(t[0]), self.cols(t[1])
        h = r1 - r0
        return h * (h + 1) / 2 if self.diagonal(t) else float(h * (c1 - c0))

    def written(self, t: Tile) -> int:
        (r0, r1), (c0, c1) = self.rows(t[0]), self.cols(t[1])
        mirrored = self.p.symmetric and not self.diagonal(t)
        return (r1 - r0) * (c1 - c0) * self.out_item * (2 if mirrored else 1)

    def tile(self, t: Tile) -> float:  # its Grams, column features and store writes
        (r0, r1), (c0, c1) = self.rows(t[0]), self.cols(t[1])
        p = self.p
        writes = (r1 - r0) / p.band + (0 if not p.symmetric or self.diagonal(t) else c1 - c0)
        calls = 1 if self.diagonal(t) else len(column_passes(p)(c0, c1))
        gram = (
            self.pairs(t) * self.T * p.pair_flops / self.c.gram_rate
            + calls * math.ceil(self.T / p.ckpt_group) * self.c.gram_call
        )
        fetch = 0.0 if self.diagonal(t) else self.T * self.fetch(c1 - c0)
        # passes read back from the scratch files on the disk are read ahead, behind the Grams
        both = max(gram, fetch) if self.shared and p.passes and self.disk else gram + fetch
        return both + self.written(t) * self.c.per_byte + writes * self.c.row_write


def column_passes(p):
    """``pieces(lo, hi)``: the passes ``(first, end)`` in which the plan ``p`` consumes a
    column block's features (one, the whole block, unless it holds them in passes)."""
    step = p.col_pass if p.passes else 0

    def pieces(lo: int, hi: int) -> List[Tuple[int, int]]:
        if not step:
            return [(lo, hi)]
        return [(a, min(hi, a + step)) for a in range(lo, hi, step)]

    return pieces


def bands_of(tiles: List[Tile], band: int) -> List[Tuple[int, List[int]]]:
    """The bands ``path_kernel`` runs a rank's tiles in: up to ``band`` consecutive tiles of
    one row block, accumulated together (as (row block, column blocks))."""
    bands: List[Tuple[int, List[int]]] = []
    for i, j in tiles:
        if bands and bands[-1][0] == i and len(bands[-1][1]) < band:
            bands[-1][1].append(j)
        else:
            bands.append((i, [j]))
    return bands


def shared_blocks(p, todo: List[Tile]) -> List[Key]:
    """Every row and column block (at every checkpoint) the tiles ``todo`` read."""
    m = _Model(p, True)
    rows, cols = p.job.rows.name, p.job.cols.name
    pieces = column_passes(p)  # train x train: a row block is read as its column passes
    row_pieces = pieces if p.symmetric else lambda lo, hi: [(lo, hi)]
    keys = set()
    for t in todo:
        for s in range(p.checkpoints):
            keys.update((rows, a, b, s) for a, b in row_pieces(*m.rows(t[0])))
            if not m.diagonal(t):
                keys.update((cols, a, b, s) for a, b in pieces(*m.cols(t[1])))
    return sorted(keys, key=lambda k: (k[3], k[0], k[1]))


def deal(p, todo: List[Tile], world: int, share: bool) -> List[RankWork]:
    """Each of ``world`` ranks' share of the tiles ``todo`` (in the plan's order; ``share``:
    the ranks share their scratch files, so each feature block is extracted once)."""
    m = _Model(p, share)
    work = [RankWork(r) for r in range(world)]
    # the shared blocks first, the largest to the least loaded rank; then the tiles (finer
    # grained) make up the difference to the mean
    base = [0.0] * world
    if share:
        blocks = shared_blocks(p, todo)
        for key in sorted(blocks, key=lambda b: (-(b[2] - b[1]), b[3], b[0], b[1])):
            r = min(range(world), key=lambda q: (base[q], q))
            work[r].blocks.append(key)
            base[r] += m.block(key[2] - key[1])
    # the tiles' times, a row's features counted where the row starts
    costs, last = [], None
    for t in todo:
        costs.append(m.tile(t) + (m.row(t[0]) if t[0] != last else 0.0))
        last = t[0]
    mean = (sum(base) + sum(costs)) / world
    wanted = [max(0.0, mean - b) for b in base]
    scale = sum(costs) / max(sum(wanted), 1e-300)
    bounds, acc = [], 0.0
    for w in wanted:
        acc += w * scale
        bounds.append(acc)
    r, done = 0, 0.0
    for t, c in zip(todo, costs):  # a tile goes to the rank whose run holds its midpoint
        while r < world - 1 and done + c / 2 > bounds[r]:
            r += 1
        work[r].tiles.append(t)
        done += c
    for w, b in zip(work, base):
        w.blocks.sort(key=lambda k: (k[3], k[0], k[1]))
        w.extracted, w.seconds = sum(k[2] - k[1] for k in w.blocks), b
        _account(m, w)
    return work


def _account(m: _Model, w: RankWork) -> None:
    """``w``'s passes, pairs, bytes and time for its tiles, band by band as
    ``path_kernel._compute`` runs them."""
    p, T = m.p, m.T
    last = None
    for i, js in bands_of(w.tiles, p.band):
        if p.ckpt_group < T or i != last:  # all checkpoints' row features outlive a band
            r0, r1 = m.rows(i)
            w.seconds += m.row(i)
            w.extracted += 0 if m.shared else T * (r1 - r0)
        last = i
        w.seconds += m.c.commit
        for j in js:
            t = (i, j)
            w.seconds += m.tile(t)
            w.pairs += m.pairs(t) * T
            w.written += m.written(t)
            if not (m.shared or m.diagonal(t)):
                c0, c1 = m.cols(j)
                w.extracted += T * (c1 - c0)
