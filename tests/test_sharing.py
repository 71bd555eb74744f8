"""Who does what on a group (``_drivers/sharing.py``) and the shared scratch files
(``_storage/spill.py``), without processes: the deal covers every tile and feature block
exactly once and evens the estimated times; named spills read each other's blocks. The
collective runs themselves are in test_distributed.py."""

import os

import pytest
import torch

import pathkernel as pk
from models import mlp
from pathkernel._drivers.sharing import deal, shared_blocks


def _dear_passes(monkeypatch):
    """Costs under which features are dear: the plan keeps them in a scratch file."""
    from pathkernel._drivers import tiling

    slow = tiling.Costs(1e-3, 1e-3, 1e-4, 1e10, 1e-3, 1e-9)
    monkeypatch.setattr(tiling, "_nominal_costs", lambda *a, **k: slow)
    monkeypatch.setattr(tiling, "_measure", lambda *a, **k: slow)


def _plan(tmp_path, symmetric: bool, n=20000, m=900, budget=400_000):
    torch.manual_seed(0)
    model = mlp(d_in=6, hidden=(16,), d_out=3).float()
    w = model.state_dict()
    ck = [({k: v + 0.01 * t for k, v in w.items()}, 0.1) for t in range(2)]
    X = torch.randn(n, 6)
    Xq = None if symmetric else torch.randn(m, 6)
    return pk.plan(model, ck, X, Xq, out=str(tmp_path / "k.npy"), memory_budget=budget)


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_deal_covers_everything_once_and_evens_the_times(tmp_path, monkeypatch, symmetric):
    _dear_passes(monkeypatch)
    p = _plan(tmp_path, symmetric)
    assert p.spill_bytes > 0 and len(p.tiles) > 200
    blocks = shared_blocks(p, p.tiles)
    M, N = p.shape[:2]
    # every row and column block at every checkpoint
    assert sum(b[2] - b[1] for b in blocks) == (N if symmetric else M + N) * p.checkpoints
    for world in (1, 2, 8, 64):
        work = deal(p, p.tiles, world, share=world > 1)
        tiles = [t for w in work for t in w.tiles]
        assert sorted(tiles) == sorted(p.tiles)
        if world > 1:
            assert sorted(b for w in work for b in w.blocks) == sorted(blocks)
            # each example's features extracted once per checkpoint across the ranks
            assert sum(w.extracted for w in work) == sum(b[2] - b[1] for b in blocks)
        pairs = (N * (N + 1) / 2 if symmetric else M * N) * p.checkpoints
        assert sum(w.pairs for w in work) == pairs
        mean = sum(w.seconds for w in work) / world
        assert max(w.seconds for w in work) <= 1.1 * mean, [w.seconds for w in work]
    # a job of 64 ranks: the slowest takes at most 1.1x its share of one process's time
    slowest = max(w.seconds for w in deal(p, p.tiles, 64, share=True))
    assert slowest <= 1.1 * p.est_seconds / 64


def test_without_a_shared_file_each_rank_extracts_what_its_tiles_need(tmp_path, monkeypatch):
    _dear_passes(monkeypatch)
    p = _plan(tmp_path, symmetric=False)
    work = deal(p, p.tiles, 4, share=False)
    assert all(not w.blocks for w in work)
    # rows cut between ranks are extracted by each of them: never fewer passes than one
    # process makes, and the loads still even
    assert sum(w.extracted for w in work) >= p.extractions
    seconds = [w.seconds for w in work]
    assert max(seconds) <= 1.1 * sum(seconds) / 4


def test_named_spills_read_each_others_blocks(tmp_path):
    from pathkernel._capture.blocks import Block, Factor
    from pathkernel._storage.spill import FeatureSpill, shared_name

    g = torch.Generator().manual_seed(0)

    def block():
        return Block(
            2, 1, {0: Factor(torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 1, 5), 1.0)}
        )

    name = shared_name(str(tmp_path / "k.npy"))
    a, b = FeatureSpill(str(tmp_path), name), FeatureSpill(str(tmp_path), name)
    ba, bb = block(), block()
    a.put(("train", 0, 2, 0), ba)
    b.put(("train", 2, 4, 0), bb)
    assert len([f for f in os.listdir(tmp_path) if f.startswith(name)]) == 2
    b.attach(*a.shared())
    a.attach(*b.shared())
    a.unlink()
    b.unlink()
    assert os.listdir(tmp_path) == []  # the names are gone, the blocks still readable
    for s in (a, b):
        for key, want in ((("train", 0, 2, 0), ba), (("train", 2, 4, 0), bb)):
            got = s.get(key).factors[0]
            assert torch.equal(got.A, want.factors[0].A) and torch.equal(got.D, want.factors[0].D)
    # an attached file's own blocks are not handed on as this spill's
    assert list(a.shared()[1]) == [("train", 0, 2, 0)]
    a.close()
    b.close()


def test_a_killed_groups_scratch_files_are_removed_by_the_next_run(tmp_path):
    from pathkernel._storage.spill import shared_name

    stale = tmp_path / (shared_name(str(tmp_path / "k.npy")) + "x1y2")
    other = tmp_path / (shared_name(str(tmp_path / "other.npy")) + "x1y2")
    stale.write_bytes(b"left by a killed rank")
    other.write_bytes(b"another output's")
    model = mlp(d_in=3, hidden=(4,), d_out=2).float()
    ck = [(model.state_dict(), 0.1)]
    pk.path_kernel(model, ck, torch.randn(10, 3), out=str(tmp_path / "k.npy"), progress=False)
    assert not stale.exists() and other.exists()


def test_a_scratch_file_larger_than_the_page_cache_is_read_at_the_disks_rate(tmp_path):
    """The plan's costs of a spill: the page cache's rates while the file fits in it, the
    disk's (measured past the cache where the filesystem allows) when it does not."""
    from pathkernel._drivers import tiling

    write, read, disk = tiling._measure_spill(str(tmp_path))
    assert 0 < read <= disk and write > 0
    c = tiling.Costs(1e-3, 1e-3, 1e-4, 1e10, 1e-3, 1e-9, spill_write=1e-10, spill_read=5e-11)
    c.disk_read, c.cache_bytes = 1e-9, 1e9
    assert c.spill_rates(1e8) == (1e-10, 5e-11)
    assert c.spill_rates(2e9) == (1e-9, 1e-9)
    assert os.listdir(tmp_path) == []
