"""path_kernel: tiled, out-of-core, resumable; against float64 references."""

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

import pathkernel as pk
from models import CNN, mlp
from reference import assert_close, reference_ntk


def checkpoints(model, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = copy.deepcopy(model)
    out = []
    for t in range(T):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        out.append((copy.deepcopy(m.state_dict()), 0.1 * (t + 1)))
    return out


def reference(model, ckpts, xq, xt, outputs="trace"):
    R = 0
    for sd, w in ckpts:
        m = copy.deepcopy(model)
        m.load_state_dict(sd)
        R = R + w * reference_ntk(m, xq, xt, outputs)
    return R


def small_budget(*args, **kw):
    """The largest budget (in steps of 10%) whose plan has several tiles."""
    budget = 1_000_000
    while budget > 1000:
        try:
            if len(pk.plan(*args, memory_budget=budget, **kw).tiles) > 2:
                return budget
        except ValueError:
            break
        budget = int(budget * 0.9)
    raise AssertionError("no budget gives a tiled plan")


@pytest.mark.parametrize("outputs", ["trace", "full", 2])
@pytest.mark.parametrize("symmetric", [True, False])
def test_tiled_matches_reference(outputs, symmetric):
    model = mlp(d_in=4, hidden=(6,), d_out=3)
    ck = checkpoints(model)
    X = torch.randn(50, 4, dtype=torch.float64)
    Xq = None if symmetric else torch.randn(23, 4, dtype=torch.float64)
    budget = small_budget(model, ck, X, Xq, outputs=outputs, dtype=torch.float64)
    K = pk.path_kernel(
        model, ck, X, Xq, outputs=outputs, memory_budget=budget, dtype=torch.float64, progress=False
    )
    R = reference(model, ck, X if symmetric else Xq, X, outputs)
    assert_close(K, R, torch.float64)


def test_float32_grams_accumulate_in_float64_and_cnn():
    torch.manual_seed(0)
    model = CNN().double()
    ck = checkpoints(model, T=2)
    X = torch.randn(12, 1, 6, 6, dtype=torch.float64)
    R = reference(model, ck, X, X)
    m32 = copy.deepcopy(model).float()
    ck32 = [({k: v.float() for k, v in sd.items()}, w) for sd, w in ck]
    K = pk.path_kernel(m32, ck32, X.float(), progress=False)
    assert K.dtype == torch.float32
    assert_close(K, R, torch.float32)


def test_file_store_equals_in_memory(tmp_path):
    model = mlp(d_in=4, hidden=(6,), d_out=3)
    ck = checkpoints(model)
    X = torch.randn(40, 4, dtype=torch.float64)
    Xq = torch.randn(17, 4, dtype=torch.float64)
    mem = pk.path_kernel(model, ck, X, Xq, memory_budget=150_000, progress=False)
    path = tmp_path / "k.npy"
    ret = pk.path_kernel(model, ck, X, Xq, out=str(path), memory_budget=150_000, progress=False)
    assert ret == str(path)
    disk = np.load(path, mmap_mode="r")
    assert disk.dtype == np.float32 and disk.shape == (17, 40)
    assert np.array_equal(np.asarray(disk), mem.numpy())


def test_checkpoint_paths_and_numpy_inputs(tmp_path):
    model = mlp(d_in=4, hidden=(6,), d_out=3)
    ck = checkpoints(model, T=2)
    paths = []
    for i, (sd, w) in enumerate(ck):
        torch.save(sd, tmp_path / f"c{i}.pt")
        paths.append((str(tmp_path / f"c{i}.pt"), w))
    X = torch.randn(9, 4, dtype=torch.float64)
    a = pk.path_kernel(model, ck, X, dtype=torch.float64, progress=False)
    b = pk.path_kernel(model, paths, X.numpy(), dtype=torch.float64, progress=False)
    assert torch.equal(a, b)


def test_dataset_input():
    model = mlp(d_in=4, hidden=(6,), d_out=3)
    ck = checkpoints(model, T=2)
    X = torch.randn(11, 4, dtype=torch.float64)
    ds = torch.utils.data.TensorDataset(X, torch.zeros(11))
    K = pk.path_kernel(
        model,
        ck,
        ds,
        dtype=torch.float64,
        progress=False,
        collate=lambda items: torch.stack([x for x, _ in items]),
    )
    assert_close(K, reference(model, ck, X, X), torch.float64)


def test_resume_mismatch_is_refused_and_nothing_overwritten(tmp_path):
    model = mlp(d_in=4, hidden=(6,), d_out=3)
    ck = checkpoints(model)
    X = torch.randn(30, 4, dtype=torch.float64)
    path = str(tmp_path / "k.npy")
    pk.path_kernel(model, ck, X, out=path, memory_budget=150_000, progress=False)
    before = open(path, "rb").read()
    with pytest.raises(
        ValueError,
        match=r"out: .* holds a run with other arguments \(it differs in the checkpoints",
    ):
        pk.path_kernel(model, ck[:2], X, out=path, memory_budget=150_000, progress=False)
    with pytest.raises(ValueError, match=r"differs in .*train"):
        pk.path_kernel(model, ck, X + 1, out=path, memory_budget=150_000, progress=False)
    assert open(path, "rb").read() == before


def test_bad_arguments():
    model = mlp(d_in=4, hidden=(6,), d_out=3)
    X = torch.randn(5, 4, dtype=torch.float64)
    ck = checkpoints(model, T=1)
    with pytest.raises(ValueError, match="checkpoints: expected at least one"):
        pk.path_kernel(model, [], X)
    with pytest.raises(TypeError, match=r"checkpoints\[0\]: expected a pair"):
        pk.path_kernel(model, [ck[0][0]], X)
    with pytest.raises(ValueError, match=r"checkpoints\[0\]: weight must be a finite number"):
        pk.path_kernel(model, [(ck[0][0], float("nan"))], X)
    with pytest.raises(ValueError, match=r"checkpoints\[0\]: no file at"):
        pk.path_kernel(model, [("/nonexistent.pt", 1.0)], X)
    bad = dict(ck[0][0])
    bad["0.weight"] = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"checkpoints\[0\]: '0.weight' has shape \(2, 2\)"):
        pk.path_kernel(model, [(bad, 1.0)], X)
    with pytest.raises(ValueError, match="memory_budget: expected a positive number"):
        pk.path_kernel(model, ck, X, memory_budget="lots")
    with pytest.raises(ValueError, match="out: the kernel needs"):
        pk.path_kernel(model, ck, torch.randn(3000, 4, dtype=torch.float64), memory_budget="8MB")
    with pytest.raises(ValueError, match="out: expected a path ending in .npy"):
        pk.path_kernel(model, ck, X, out="/tmp/kernel.bin")


SCRIPT = textwrap.dedent("""
    import sys, torch, pathkernel as pk
    sys.path.insert(0, {tests!r})
    from test_path_kernel import checkpoints
    from models import mlp
    model = mlp(d_in=8, hidden=(256,), d_out=2, dtype=torch.float32)
    X = torch.randn(3000, 8, generator=torch.Generator().manual_seed(0))
    pk.path_kernel(model, checkpoints(model, T=4), X, out={out!r}, memory_budget="20MB",
                   progress=False)
""")


def test_kill_and_resume_is_bit_identical(tmp_path):
    tests = os.path.dirname(__file__)
    full = str(tmp_path / "full.npy")
    part = str(tmp_path / "part.npy")
    subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests, out=full)], check=True)
    n_tiles = len(open(full + ".journal").read().splitlines()) - 1
    assert n_tiles >= 6
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(tests=tests, out=part)])
    deadline = time.time() + 120
    while time.time() < deadline:
        if (
            os.path.exists(part + ".journal")
            and len(open(part + ".journal").read().splitlines()) - 1 >= n_tiles // 2
        ):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(open(part + ".journal").read().splitlines()) - 1
    assert 0 < done < n_tiles, "the kill should land mid-run"
    subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests, out=part)], check=True)
    assert open(full, "rb").read() == open(part, "rb").read()


def test_checkpoint_errors_name_the_checkpoint_and_say_what_is_expected(tmp_path):
    model = mlp(d_in=4, hidden=(6,), d_out=3)
    X = torch.randn(5, 4, dtype=torch.float64)
    torch.save(model, tmp_path / "whole.pt")
    (tmp_path / "random.pt").write_bytes(os.urandom(2000))
    torch.save(model.state_dict(), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save([1, 2], tmp_path / "list.pt")
    expected = {
        "whole": "holds pickled objects, not only tensors",
        "random": "not a torch checkpoint",
        "truncated": "cannot be read, truncated",
        "list": "holds a list",
    }
    for name, what in expected.items():
        with pytest.raises(
            ValueError,
            match=rf"checkpoints\[1\] \(.*{name}.pt'\): {what}.*"
            r"a state_dict is expected",
        ):
            pk.path_kernel(
                model,
                [(model.state_dict(), 1.0), (str(tmp_path / f"{name}.pt"), 1.0)],
                X,
                progress=False,
            )
    # a training checkpoint holding the state_dict, and the model itself, are accepted
    torch.save({"epoch": 3, "model_state_dict": model.state_dict()}, tmp_path / "train.pt")
    ref = pk.path_kernel(model, [(model.state_dict(), 1.0)], X, dtype=torch.float64, progress=False)
    for ck in (str(tmp_path / "train.pt"), model):
        assert torch.equal(
            pk.path_kernel(model, [(ck, 1.0)], X, dtype=torch.float64, progress=False), ref
        )


def test_out_in_a_new_directory_is_created(tmp_path):
    model = mlp(d_in=4, hidden=(6,), d_out=3)
    X = torch.randn(5, 4, dtype=torch.float64)
    out = tmp_path / "new" / "deeper" / "k.npy"
    assert pk.path_kernel(model, [(model, 1.0)], X, out=str(out), progress=False) == str(out)
    assert np.load(out).shape == (5, 5)


@pytest.mark.parametrize("col_pass", [0, 2])
@pytest.mark.parametrize("group,band", [(3, 1), (1, 1), (1, 3), (2, 2)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("outputs", ["trace", "full"])
def test_checkpoints_streamed_through_bands(group, band, symmetric, outputs, col_pass):
    """Every way of splitting the checkpoints, grouping tiles and consuming column blocks in
    passes gives the same kernel."""
    from pathkernel._drivers.path_kernel import run_plan

    model = mlp(d_in=4, hidden=(6,), d_out=3)
    ck = checkpoints(model, T=3)
    X = torch.randn(23, 4, dtype=torch.float64)
    Xq = None if symmetric else torch.randn(17, 4, dtype=torch.float64)
    p = pk.plan(model, ck, X, Xq, outputs=outputs, dtype=torch.float64)
    p.row_block, p.col_block, p.ckpt_group, p.band = 5, (5 if symmetric else 4), group, band
    p.col_pass = col_pass
    assert p.passes == bool(col_pass)
    nr, nc = -(-p.shape[0] // 5), -(-23 // p.col_block)
    p.tiles = [(i, j) for i in range(nr) for j in range(i if symmetric else 0, nc)]
    K = run_plan(p, progress=False)
    assert_close(K, reference(model, ck, X if symmetric else Xq, X, outputs), torch.float64)


def test_tight_budget_refused_with_the_smallest_sensible_budget(monkeypatch):
    """With costs where re-extracting features dominates, a budget that only allows slivers is
    refused, naming a budget that gives a plan within 3x of a roomy one."""
    from pathkernel._drivers import tiling

    slow = tiling.Costs(
        call=1e-3, per_example=1e-2, gram_call=1e-4, gram_rate=1e11, commit=1e-3, per_byte=1e-9
    )
    monkeypatch.setattr(tiling, "_nominal_costs", lambda *a, **k: slow)
    monkeypatch.setattr(tiling, "_measure", lambda *a, **k: slow)
    model = mlp(d_in=4, hidden=(6,), d_out=3)
    X = torch.randn(3000, 4)
    ck = checkpoints(model.float(), T=2)
    roomy = pk.plan(model.float(), ck, X, out="k.npy", memory_budget="2GB")
    with pytest.raises(
        ValueError,
        match=r"memory_budget: .* leaves only an inefficient plan "
        r"\(estimated .* s, against .* s with more memory\); the "
        r"smallest budget within 3x of that is about",
    ):
        pk.plan(model.float(), ck, X, out="k.npy", memory_budget=60_000, spill=False)
    assert roomy.est_seconds > 0 and len(roomy.tiles) >= 1
    # allowed a scratch file, the same budget keeps the features instead of recomputing them
    spilled = pk.plan(model.float(), ck, X, out="k.npy", memory_budget=60_000)
    assert spilled.spill_bytes > 0 and spilled.est_seconds <= 3 * roomy.est_seconds
    assert "kept in a scratch file" in str(spilled)
    # the plan says how often it extracts each example: once per checkpoint when it keeps
    # them, more when it recomputes
    assert "(1.00 per example and checkpoint)" in str(spilled)
    T = len(ck)
    again = pk.plan(model.float(), ck, X, out="k.npy", memory_budget=16_000_000, spill=False)
    per = again.extractions / (3000 * T)
    assert per > 1 and f"({per:.2f} per example and checkpoint)" in str(again)


def test_features_larger_than_the_budget_allows_are_held_one_pass_at_a_time():
    """ResNet-18-sized features (12.8 MB per example) under 2 GB: held whole, a column block
    beside its row block forces slivers of 16 x 16 tiles whose column features are read
    again for every row block; held one extraction pass at a time (the next read ahead from
    the scratch file behind the Grams), the row blocks grow and the reads fall."""
    from pathkernel._drivers import tiling

    P = tiling._Problem(
        M=1024, N=1024, T=2, symmetric=True, fb=12_810_536, cc=8, fixed=50 << 20,
        pair_flops=15.1e6, out_item=4, spill=True, scratch=51_242_144,
    )  # fmt: skip
    c = tiling.Costs(
        call=0.05, per_example=0.03, gram_call=1e-3, gram_rate=1.2e11, commit=1e-3,
        per_byte=1e-9, spill_write=1e-9, spill_read=5.3e-10, disk_read=5.3e-10,
    )  # fmt: skip
    best = tiling._solve(P, c, 2 << 30)
    whole = min(
        (tiling._cost(P, R, R, band, k, chunk, c, True)
         for R in (16, 32, 64) for k in (1, 2) for band in (1, 4, 64) for chunk in (16, 64)
         if chunk >= R),
        key=lambda x: x.est if x.memory <= 2 << 30 else float("inf"),
    )  # fmt: skip
    assert whole.R == 16 and not whole.passes
    assert best.passes and best.R >= 64 and best.memory <= 2 << 30
    assert best.est < 0.5 * whole.est, (best, whole)
    # read ahead from the disk, the column reads overlap the Grams, but their CPU time is
    # shared with the Grams' threads: a read thread's time over the cores shows (on one core,
    # all of it; on a GPU, none while the Grams take longer); from the page cache a read is
    # a copy on the same cores, and counts in full
    args = (P, best.R, best.Cb, best.band, best.k, best.chunk)
    cached = tiling._cost(*args, c, True, True)
    c.cache_bytes = 0.0
    one = tiling._cost(*args, c, True, True)
    c.cores = 2.0
    two = tiling._cost(*args, c, True, True)
    c.cores = float("inf")
    gpu = tiling._cost(*args, c, True, True)
    assert one.est == cached.est  # the disk reads as fast as the page cache here
    assert gpu.est < two.est < one.est and gpu.parts[1] == two.parts[1] == one.parts[1]
    assert two.est - gpu.est == pytest.approx((one.est - gpu.est) / 2)


def test_resume_keeps_the_interrupted_runs_tiling(tmp_path, monkeypatch):
    """A resumed run keeps the recorded tiling, so the file is bit-identical even when the
    cost model now favours another one (another version of pathkernel, say)."""
    from pathkernel._drivers import tiling

    model = mlp(d_in=4, hidden=(6,), d_out=3)
    ck = checkpoints(model, T=3)
    X = torch.randn(300, 4, dtype=torch.float64)
    costs = [
        tiling.Costs(0.0, 1e-6, 1e-6, 1e8, 1e-3, 1e-9),  # passes cost nothing
        tiling.Costs(0.05, 1e-6, 1e-6, 1e8, 1e-3, 1e-9),
    ]  # passes are dear: fewer, wider
    clean, part = str(tmp_path / "clean.npy"), str(tmp_path / "part.npy")

    def tiling_with(c, budget):
        monkeypatch.setattr(tiling, "_nominal_costs", lambda *a, **k: c)
        p = pk.plan(model, ck, X, out=str(tmp_path / "probe.npy"), memory_budget=budget)
        return (p.row_block, p.col_block, p.ckpt_group, p.job.chunk)

    # a budget where the two cost models choose different tilings
    budget = next(
        b
        for b in range(60_000, 600_000, 10_000)
        if tiling_with(costs[0], b) != tiling_with(costs[1], b)
    )
    monkeypatch.setattr(tiling, "_nominal_costs", lambda *a, **k: costs[0])
    p0 = pk.plan(model, ck, X, out=clean, memory_budget=budget)
    pk.path_kernel(model, ck, X, out=clean, memory_budget=budget, progress=False)
    pk.path_kernel(model, ck, X, out=part, memory_budget=budget, progress=False)
    lines = open(part + ".journal").read().splitlines()
    assert len(lines) > 3
    with open(part + ".journal", "w") as f:  # interrupted after two tiles, one record torn
        f.write("\n".join(lines[:3]) + '\n{"tile": [')
    monkeypatch.setattr(tiling, "_nominal_costs", lambda *a, **k: costs[1])
    fresh = pk.plan(model, ck, X, out=str(tmp_path / "other.npy"), memory_budget=budget)
    assert (fresh.row_block, fresh.col_block, fresh.ckpt_group, fresh.job.chunk) != (
        p0.row_block,
        p0.col_block,
        p0.ckpt_group,
        p0.job.chunk,
    )
    resumed = pk.plan(model, ck, X, out=part, memory_budget=budget)
    assert (resumed.row_block, resumed.col_block, resumed.ckpt_group, resumed.job.chunk) == (
        p0.row_block,
        p0.col_block,
        p0.ckpt_group,
        p0.job.chunk,
    )
    pk.path_kernel(model, ck, X, out=part, memory_budget=budget, progress=False)
    assert open(clean, "rb").read() == open(part, "rb").read()


def test_background_writer_commits_in_order_and_raises_its_failure(tmp_path):
    """Bands are written and journalled behind the computation; a write that fails is raised
    in the caller, and only the bands written before it count as done."""
    from pathkernel._storage.store import FileStore, Writer

    store = FileStore(tmp_path / "k.npy", (4, 6), torch.float32, {"run": 1}, resume=False)
    calls = []
    real = store.write

    def write(i0, j0, tile):
        calls.append((i0, j0))
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(i0, j0, tile)

    store.write = write
    w = Writer(store)
    late = torch.zeros(2, 3)  # filled by `ready`, as an asynchronous device copy would be
    w.submit(
        [(0, 0, torch.ones(2, 3)), (0, 3, late)], [(0, 0), (0, 1)], ready=lambda: late.fill_(2)
    )
    with pytest.raises(OSError, match="No space left"):
        w.submit([(2, 0, torch.ones(2, 3))], [(1, 0)])
        w.close()
    store.close()
    reopened = FileStore(tmp_path / "k.npy", (4, 6), torch.float32, {"run": 1}, resume=True)
    assert reopened.verified_done() == {(0, 0), (0, 1)}
    assert np.array_equal(np.load(tmp_path / "k.npy")[:2], np.array([[1, 1, 1, 2, 2, 2]] * 2))
    reopened.close()


def test_writer_releases_each_band_once_written(tmp_path):
    """A written band's tiles are let go at once (the commit may follow), so the caller holds
    one band's finished tiles at most: what the plan's memory counts."""
    import gc
    import weakref

    from pathkernel._storage.store import FileStore, Writer

    store = FileStore(tmp_path / "k.npy", (4, 6), torch.float32, {"run": 2}, resume=False)
    w = Writer(store)
    strip = torch.ones(2, 6)
    gone = weakref.ref(strip)
    w.submit([(0, 0, strip)], [(0, 0)])
    del strip
    w.wait_written()
    gc.collect()
    assert gone() is None
    w.submit([(2, 0, torch.full((2, 6), 2.0))], [(1, 0)])
    w.close()
    store.close()
    assert np.array_equal(np.load(tmp_path / "k.npy"), np.array([[1.0] * 6] * 2 + [[2.0] * 6] * 2))


def _passes_only(monkeypatch):
    """Plans in column passes whatever they cost, so that small problems take them too."""
    from pathkernel._drivers import tiling

    cost = tiling._cost

    def passes_only(*a, **k):
        c = cost(*a, **k)
        c.est += 0.0 if c.passes else 1e9
        return c

    monkeypatch.setattr(tiling, "_cost", passes_only)


def _dear_passes(monkeypatch):
    """Costs under which recomputing features is dear: small budgets spill them."""
    from pathkernel._drivers import tiling

    slow = tiling.Costs(1e-3, 1e-2, 1e-4, 1e11, 1e-3, 1e-9)
    monkeypatch.setattr(tiling, "_nominal_costs", lambda *a, **k: slow)
    monkeypatch.setattr(tiling, "_measure", lambda *a, **k: slow)


class _CountingSpill:
    """FeatureSpill that counts the blocks it serves."""

    reads = 0
    threads: set = set()  # whether each read ran on the main thread

    def __init__(self, folder, name=None):
        from pathkernel._storage.spill import FeatureSpill

        self._s = FeatureSpill(folder, name)

    def __contains__(self, key):
        return key in self._s

    def put(self, key, block):
        self._s.put(key, block)

    def get(self, key):
        _CountingSpill.reads += 1
        _CountingSpill.threads.add(threading.current_thread() is threading.main_thread())
        return self._s.get(key)

    def close(self):
        self._s.close()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("outputs", ["trace", "full"])
def test_spilled_features_give_the_same_bits(tmp_path, monkeypatch, symmetric, outputs):
    """Features kept in the scratch file are read back bit for bit: the file equals a run
    that recomputes them, and the float64 reference. A CNN: materialized and factored
    groups."""
    from pathkernel._drivers import path_kernel as driver

    _dear_passes(monkeypatch)
    monkeypatch.setattr(driver, "FeatureSpill", _CountingSpill)
    torch.manual_seed(0)
    model = CNN().double()
    ck = checkpoints(model, T=3)
    X = torch.randn(40, 1, 6, 6, dtype=torch.float64)
    Xq = None if symmetric else torch.randn(19, 1, 6, 6, dtype=torch.float64)
    kw = dict(outputs=outputs, dtype=torch.float64)

    def spills(b):
        try:
            p = pk.plan(model, ck, X, Xq, out=str(tmp_path / "p.npy"), memory_budget=b, **kw)
        except ValueError:  # too small
            return False
        return p.spill_bytes > 0 and len(p.tiles) > 3

    budget = next(b for b in range(100_000, 4_000_000, 10_000) if spills(b))
    runs = {}
    for spill in (True, False):
        out = str(tmp_path / f"k{spill}.npy")
        _CountingSpill.reads = 0
        pk.path_kernel(
            model, ck, X, Xq, out=out, memory_budget=budget, spill=spill, progress=False, **kw
        )
        assert (_CountingSpill.reads > 0) == spill
        runs[spill] = open(out, "rb").read()
    assert runs[True] == runs[False]
    K = torch.from_numpy(np.load(str(tmp_path / "kTrue.npy")))
    assert_close(K, reference(model, ck, X if symmetric else Xq, X, outputs), torch.float64)
    assert not [f for f in os.listdir(tmp_path) if "features" in f]  # the scratch file is gone


@pytest.mark.parametrize("symmetric", [True, False])
def test_column_passes_read_ahead_give_the_same_bits(tmp_path, monkeypatch, symmetric):
    """Column blocks consumed one extraction pass at a time, the passes kept in the scratch
    file read ahead in a thread while the Grams run: the file equals the same tiling run
    recomputing every pass, and the float64 reference."""
    from pathkernel._drivers import path_kernel as driver

    _dear_passes(monkeypatch)
    _passes_only(monkeypatch)
    monkeypatch.setattr(driver, "FeatureSpill", _CountingSpill)
    torch.manual_seed(0)
    model = CNN().double()
    ck = checkpoints(model, T=2)
    X = torch.randn(150, 1, 6, 6, dtype=torch.float64)
    Xq = None if symmetric else torch.randn(37, 1, 6, 6, dtype=torch.float64)
    kw = dict(outputs="trace", dtype=torch.float64)

    def plan(out, b):
        return pk.plan(model, ck, X, Xq, out=str(tmp_path / out), memory_budget=b, **kw)

    def fits(b):
        try:
            p = plan("p.npy", b)
        except ValueError:  # too small
            return False
        return p.spill_bytes > 0 and p.col_block >= 2 * p.col_pass and len(p.tiles) > 2

    budget = next(b for b in range(100_000, 4_000_000, 20_000) if fits(b))
    runs = {}
    for keep in (True, False):
        p = plan(f"k{keep}.npy", budget)
        assert p.passes and f"held {p.col_pass} examples at a time" in str(p)
        if not keep:  # the same tiling, every pass recomputed
            p.spill_bytes, p.spill_sides = 0, (False, False)
        _CountingSpill.reads, _CountingSpill.threads = 0, set()
        driver.run_plan(p, progress=False)
        assert (_CountingSpill.reads > 0) == keep
        if keep:  # some passes came from the thread that reads ahead
            assert False in _CountingSpill.threads
        runs[keep] = open(tmp_path / f"k{keep}.npy", "rb").read()
    assert runs[True] == runs[False]
    K = torch.from_numpy(np.load(str(tmp_path / "kTrue.npy")))
    assert_close(K, reference(model, ck, X if symmetric else Xq, X, "trace"), torch.float64)
    journal = json.loads(open(tmp_path / "kTrue.npy.journal").readline())
    assert journal["tiles"] == [p.row_block, p.col_block, p.ckpt_group, p.job.chunk, p.col_pass]


def test_too_little_disk_for_the_spill_recomputes_with_a_warning(tmp_path, monkeypatch):
    from collections import namedtuple

    from pathkernel._drivers import path_kernel as driver

    _dear_passes(monkeypatch)
    model = mlp(d_in=4, hidden=(6,), d_out=3)
    ck = checkpoints(model, T=2)
    X = torch.randn(300, 4, dtype=torch.float64)
    kw = dict(memory_budget=60_000, dtype=torch.float64, progress=False)
    full = str(tmp_path / "full.npy")
    assert pk.plan(model, ck, X, out=full, memory_budget=60_000).spill_bytes > 0
    pk.path_kernel(model, ck, X, out=str(tmp_path / "roomy.npy"), **kw)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(driver.shutil, "disk_usage", lambda _: usage(1 << 20, 1 << 20, 1000))
    with pytest.warns(UserWarning, match="too little to keep .* of features there"):
        pk.path_kernel(model, ck, X, out=full, **kw)
    assert open(full, "rb").read() == open(tmp_path / "roomy.npy", "rb").read()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="Linux descriptors")
def test_feature_spill_falls_back_to_buffered_writes(tmp_path, monkeypatch):
    """A filesystem that opens the scratch file for direct writes but refuses them: the
    block is written through the page cache instead, and so is every later one."""
    from pathkernel._capture.blocks import Block, Factor
    from pathkernel._storage import spill as spill_mod

    monkeypatch.setattr(  # a descriptor that refuses writes (EBADF)
        spill_mod,
        "_direct_writer",
        lambda fd: (
            os.open(f"/proc/self/fd/{fd}", os.O_RDONLY),
            spill_mod.mmap.mmap(-1, spill_mod._STAGE),
        ),
    )
    s = spill_mod.FeatureSpill(str(tmp_path))
    assert s._direct is not None
    blocks = [
        Block(2, 1, {0: Factor(None, torch.randn(2, 1, 1, 5000 + i), 0.0, True)}) for i in range(2)
    ]
    for i, b in enumerate(blocks):
        s.put(i, b)
    assert s._direct is None
    for i, b in enumerate(blocks):
        assert torch.equal(s.get(i).factors[0].D, b.factors[0].D)
    s.close()


def test_feature_spill_round_trip(tmp_path):
    """Every kind of factor (float A, token A, none, materialized, empty) comes back equal,
    in fresh tensors."""
    from pathkernel._capture.blocks import Block, Factor
    from pathkernel._storage.spill import FeatureSpill

    g = torch.Generator().manual_seed(0)
    b = Block(
        3,
        2,
        {
            0: Factor(torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 2, 6, generator=g), 1.0),
            1: Factor(torch.randint(-1, 9, (3, 4), generator=g), torch.randn(3, 4, 2, 3), 0.0),
            2: Factor(None, torch.randn(3, 1, 2, 7, dtype=torch.float64), 0.0, True),
            -1: Factor(None, torch.randn(3, 1, 2, 0), 0.0, True),
        },
    )
    s = FeatureSpill(str(tmp_path))
    s.put(("train", 0, 3, 1), b)
    strided = torch.arange(8.0).reshape(1, 1, 2, 4)[..., ::2]  # not contiguous
    s.put("other", Block(1, 2, {0: Factor(None, strided, 0.0, True)}))
    assert ("train", 0, 3, 1) in s and s.get("missing") is None
    r = s.get(("train", 0, 3, 1))
    assert (r.n, r.C) == (3, 2) and list(r.factors) == list(b.factors)
    for k, f in b.factors.items():
        rf = r.factors[k]
        assert (rf.beta, rf.materialized) == (f.beta, f.materialized)
        for x, y in ((f.A, rf.A), (f.D, rf.D)):
            if x is None:
                assert y is None
                continue
            assert y.dtype == x.dtype and torch.equal(x, y)
            assert y.numel() == 0 or y.data_ptr() != x.data_ptr()
    assert torch.equal(s.get("other").factors[0].D, strided)
    s.close()
    assert os.listdir(tmp_path) == []
