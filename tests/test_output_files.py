"""out= files that are never silently wrong: checked writes, a full disk, one writer per
file, and a fingerprint that refuses to resume another problem."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

import pathkernel as pk
from models import mlp
from test_path_kernel import checkpoints

BUDGET = 150_000  # 10 tiles of 64 x 64 for 200 examples of this MLP


def _problem(n=200, seed=0):
    model = mlp(d_in=4, hidden=(6,), d_out=3)
    X = torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return model, checkpoints(model), X


def _run(model, ck, X, path, **kw):
    kw.setdefault("memory_budget", BUDGET)
    return pk.path_kernel(model, ck, X, out=str(path), progress=False, **kw)


def _clean(tmp_path, model, ck, X, name="clean.npy", **kw):
    path = tmp_path / name
    _run(model, ck, X, path, **kw)
    return path.read_bytes()


# ---- writes that are checked ------------------------------------------------------------------


def test_short_writes_are_completed(tmp_path, monkeypatch):
    model, ck, X = _problem()
    clean = _clean(tmp_path, model, ck, X)
    real = os.pwrite
    calls = []

    def short(fd, data, offset):  # a filling disk: at most 20 bytes per call
        calls.append(1)
        return real(fd, memoryview(data)[:20], offset)

    monkeypatch.setattr(os, "pwrite", short)
    _run(model, ck, X, tmp_path / "short.npy")
    monkeypatch.undo()
    assert len(calls) > 100
    assert (tmp_path / "short.npy").read_bytes() == clean


def test_a_failing_write_raises_naming_the_file_and_resume_gives_the_clean_file(
    tmp_path, monkeypatch
):
    model, ck, X = _problem()
    clean = _clean(tmp_path, model, ck, X)
    path = tmp_path / "k.npy"
    real = os.pwrite
    calls = []

    def counting(fd, data, offset):
        calls.append(1)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", counting)
    _run(model, ck, X, tmp_path / "counted.npy")
    half, calls[:] = len(calls) // 2, []
    assert half > 5

    def failing(fd, data, offset):  # a partial write, then the disk is full
        calls.append(1)
        if len(calls) == half:
            return real(fd, memoryview(data)[:7], offset)
        if len(calls) > half:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    with pytest.raises(pk.StoreWriteError, match=r"writing tiles to .*k\.npy.* No space left .*"):
        _run(model, ck, X, path)
    monkeypatch.undo()
    journaled = path.with_suffix(".npy.journal").read_text().splitlines()
    assert 1 < len(journaled), "some bands were done before the failure"
    _run(model, ck, X, path)  # space freed: the same call resumes
    assert path.read_bytes() == clean


def test_a_changed_file_is_detected_by_its_checksums(tmp_path):
    model, ck, X = _problem()
    path = tmp_path / "k.npy"
    _run(model, ck, X, path)
    clean = path.read_bytes()
    arr = np.load(path, mmap_mode="r+")
    arr[3, 5] += 1.0  # a tile is changed after the run journaled it
    arr.flush()
    del arr
    with pytest.warns(UserWarning, match="no longer hold the bytes that were written"):
        _run(model, ck, X, path)
    assert path.read_bytes() == clean


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (skipped where mounting is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_before_the_run_is_refused_and_nothing_is_left(tmp_path, small_disk):
    model, ck, X = _problem(n=600)  # 600 x 600 float32: 1.4 MiB, more than the disk
    with pytest.raises(pk.StoreWriteError, match=r"creating .* free in .*more is needed.*resume"):
        _run(model, ck, X, small_disk / "k.npy", memory_budget="4MB")
    assert not os.path.exists(small_disk / "k.npy")
    assert not os.path.exists(small_disk / "k.npy.journal")


def test_disk_filling_mid_run_then_freed_resumes_to_the_clean_file(
    tmp_path, small_disk, monkeypatch
):
    """A filesystem without fallocate (sparse files): the disk fills while tiles are
    written; the run raises, keeps what it journaled, and resumes after space is freed."""
    model, ck, X = _problem(n=300)  # 300 x 300 float32: 352 KiB
    clean = _clean(tmp_path, model, ck, X, memory_budget="2MB")

    def unsupported(*a):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (800 << 10))  # about 200 KiB left
    path = small_disk / "k.npy"
    with pytest.raises(pk.StoreWriteError, match=r"No space left on device .*more is needed"):
        _run(model, ck, X, path, memory_budget="2MB", spill=False)
    filler.unlink()
    _run(model, ck, X, path, memory_budget="2MB", spill=False)
    assert path.read_bytes() == clean


def test_plan_on_a_full_disk_does_not_crash(tmp_path, small_disk):
    model, ck, X = _problem()
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:  # until the disk is full
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    p = pk.plan(model, ck, X, out=str(small_disk / "k.npy"), memory_budget=BUDGET)
    assert len(p.tiles) > 1


# ---- one writer per output --------------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    from pathkernel._storage.lock import OutputLock

    model, ck, X = _problem()
    path = tmp_path / "k.npy"
    lock = OutputLock(str(path))
    with pytest.raises(
        pk.OutputBusyError, match=rf"being written by another run \(process {os.getpid()}"
    ):
        _run(model, ck, X, path)
    with pytest.raises(pk.OutputBusyError):
        _run(model, ck, X, path, resume=False)
    assert not path.exists()
    lock.release()
    _run(model, ck, X, path)


HOLDER = textwrap.dedent("""
    import sys, time
    from pathkernel._storage.lock import OutputLock
    lock = OutputLock(sys.argv[1])
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    model, ck, X = _problem()
    path = tmp_path / "k.npy"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(pk.OutputBusyError, match=rf"process {proc.pid} on "):
        _run(model, ck, X, path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    clean = _clean(tmp_path, model, ck, X)
    _run(model, ck, X, path)
    assert path.read_bytes() == clean


WRITER = textwrap.dedent("""
    import sys, time, torch, pathkernel as pk
    sys.path.insert(0, {tests!r})
    from test_output_files import _problem
    model, ck, X = _problem(n=1500, seed=int(sys.argv[2]))
    while time.time() < float(sys.argv[3]):
        pass
    pk.path_kernel(model, ck, X, out=sys.argv[1], memory_budget="2MB", progress=False)
""")


def test_two_writers_started_together_never_mix(tmp_path):
    """Two runs with other data on one out=: one finishes, the other is refused (busy, or
    a run with other arguments); the file is the finisher's, byte for byte."""
    tests = os.path.dirname(__file__)
    path = str(tmp_path / "k.npy")
    script = WRITER.format(tests=tests)
    start = time.time() + 6  # both past their imports, then off together
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, path, str(seed), str(start)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (0, 1)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    ok = [seed for seed, (rc, _) in zip((0, 1), results) if rc == 0]
    assert len(ok) == 1, results
    err = results[1 - ok[0]][1]
    assert "being written by another run" in err or "holds a run with other arguments" in err
    model, ck, X = _problem(n=1500, seed=ok[0])
    clean = _clean(tmp_path, model, ck, X, memory_budget="2MB")
    assert open(path, "rb").read() == clean


# ---- a fingerprint that covers what the result depends on -------------------------------------


def test_a_changed_model_or_outputs_callable_is_refused(tmp_path):
    model, ck, X = _problem()
    path = tmp_path / "k.npy"
    c = 0
    _run(model, ck, X, path, outputs=lambda o: o[:, c])
    before = path.read_bytes()
    c = 1  # the same lambda's code, another captured value
    with pytest.raises(ValueError, match=r"differs in outputs \(.*callable"):
        _run(model, ck, X, path, outputs=lambda o: o[:, c])
    with pytest.raises(ValueError, match=r"differs in outputs"):
        _run(model, ck, X, path, outputs=lambda o: o[:, 0] - o[:, 1])
    other = mlp(d_in=4, hidden=(6,), d_out=3)
    other[1] = nn.ReLU()  # Tanh -> ReLU: same parameters, another model
    with pytest.raises(ValueError, match=r"differs in the model .*resume=False to start over"):
        _run(other, ck, X, path, outputs=lambda o: o[:, 0])
    assert path.read_bytes() == before
    c = 0
    _run(model, ck, X, path, outputs=lambda o: o[:, c])  # the same problem resumes
    assert path.read_bytes() == before
    _run(other, ck, X, path, outputs=lambda o: o[:, 0], resume=False)  # starts over
    assert path.read_bytes() != before


def _net(activation):
    class Net(nn.Module):  # one class name and structure, two forward functions
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        if activation == "tanh":

            def forward(self, x):
                return self.b(torch.tanh(self.a(x)))

        else:

            def forward(self, x):
                return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    return Net().double()


def test_a_changed_forward_is_refused(tmp_path):
    a, b = _net("tanh"), _net("relu")
    X = torch.randn(30, 4, dtype=torch.float64)
    path = tmp_path / "k.npy"
    _run(a, [(a.state_dict(), 1.0)], X, path)
    with pytest.raises(ValueError, match="differs in the model"):
        _run(b, [(b.state_dict(), 1.0)], X, path)


def test_nan_in_a_checkpoint_names_it(tmp_path):
    model, ck, X = _problem()
    sd = dict(ck[1][0])
    sd["0.weight"] = sd["0.weight"].clone()
    sd["0.weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(
        ValueError, match=r"checkpoints\[1\] \('.*bad\.pt'\): '0\.weight' contains NaN"
    ):
        pk.path_kernel(model, [ck[0], (str(tmp_path / "bad.pt"), 1.0)], X, progress=False)
