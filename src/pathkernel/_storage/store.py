"""Where a path kernel's tiles go: RAM, or a ``.npy`` file with journals for resume.

The file is a plain ``.npy`` (``np.load(path, mmap_mode="r")`` reads it). Rank 0 (or a single
process) takes the output's lock (``lock.py``), creates the file, claims its space and writes
the run's header (the fingerprint of the problem) as the first line of ``<path>.journal``.
Tiles are written with checked ``pwrite``s at their offsets (the file's pages never count
against the process's memory), then fsync'ed; only then are their bands appended to a journal,
with the CRC-32 of every write: rank 0 to ``<path>.journal``, rank r > 0 to
``<path>.journal.<r>``. Resuming reads every journal and keeps the tiles whose bytes still
match, so a run killed at any moment (on any rank) is finished by the same call with any
number of ranks; a tile in no journal, in a torn last line or with other bytes is recomputed.
"""

from __future__ import annotations

import glob
import json
import os
import queue
import re
import threading
import time
import warnings
import zlib
from typing import Callable, Iterable, List, Optional, Set, Tuple

import numpy as np
import torch

from .diskio import SPACE_ERRNOS, store_error, unallocated_bytes, write_all
from .lock import OutputLock

JOURNAL_VERSION = 2


class MemoryStore:
    """The whole kernel in RAM; on a rank of a group, only that rank's tiles (gathered by
    rank 0 at the end)."""

    def __init__(self, shape, dtype: torch.dtype, whole: bool = True):
        self.shape, self.dtype = tuple(shape), dtype
        self.tensor = torch.zeros(shape, dtype=dtype) if whole else None
        self.tiles: List[Tuple[int, int, torch.Tensor]] = []
        self.done: Set[Tuple[int, int]] = set()

    def write(self, i0: int, j0: int, tile: torch.Tensor) -> None:
        if self.tensor is not None:
            self.tensor[i0 : i0 + tile.shape[0], j0 : j0 + tile.shape[1]] = tile
        else:
            self.tiles.append((i0, j0, tile.clone()))

    def assemble(self, tiles: Iterable[Tuple[int, int, torch.Tensor]]) -> torch.Tensor:
        """The kernel from every rank's tiles (copied, so -0.0 stays -0.0)."""
        self.tensor = torch.zeros(self.shape, dtype=self.dtype)
        for i0, j0, t in tiles:
            self.tensor[i0 : i0 + t.shape[0], j0 : j0 + t.shape[1]] = t
        return self.tensor

    def commit(self, keys) -> None:
        self.done.update(tuple(k) for k in keys)

    def verified_done(self) -> Set[Tuple[int, int]]:
        return self.done

    def result(self):
        return self.tensor

    def close(self):
        pass


class FileStore:
    """A ``.npy`` file of ``shape`` written tile by tile, with journals of completed tiles.

    Rank 0 (``create``) holds the output's lock (``lock.py``) from before it looks at the file
    until ``close``. Every write is checked (``diskio.write_all``) and its CRC-32 recorded;
    a band of tiles is journaled, with those checksums, only after its bytes are synced, and
    ``verified_done`` accepts a journaled tile only if the file still holds those bytes."""

    def __init__(
        self,
        path,
        shape,
        dtype: torch.dtype,
        fingerprint: dict,
        resume: bool,
        rank: int = 0,
        create: bool = True,
    ):
        self.path = os.fspath(path)
        if not self.path.endswith(".npy"):
            raise ValueError(f"out: expected a path ending in .npy, got {self.path!r}")
        self.journal_path = self.path + ".journal"
        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise ValueError(f"out: cannot create the folder {folder!r} ({e.strerror})") from None
        self.shape = tuple(int(s) for s in shape)
        self.np_dtype = np.dtype(np.float32 if dtype == torch.float32 else np.float64)
        self.header = {
            "version": JOURNAL_VERSION,
            "shape": list(self.shape),
            "dtype": self.np_dtype.str,
            **fingerprint,
        }
        self.lock = OutputLock(self.path) if create else None
        self.fd = self.journal_fd = -1
        try:
            if create:  # rank 0: a new run, or the check that the existing one is this problem
                if resume and os.path.exists(self.path) and os.path.exists(self.journal_path):
                    self._check_header()
                else:
                    self._create()
            else:
                self._check_header()
            self.offset = self._data_offset()
            self.fd = os.open(self.path, os.O_RDWR)
            own = self.journal_path if rank == 0 else f"{self.journal_path}.{rank}"
            self.journal_path_own = own
            self.journal_fd = os.open(own, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if os.fstat(self.journal_fd).st_size and not _ends_with_newline(own):
                self._append(b"\n")  # after a torn last record: the next one on its own line
        except BaseException:
            self.close()
            raise
        self.pending: List[list] = []  # [row, column, rows, columns, crc32] of each write
        self.done: Set[Tuple[int, int]] = set()

    def _journals(self) -> List[str]:
        return [self.journal_path] + sorted(glob.glob(glob.escape(self.journal_path) + ".*"))

    def _check_header(self) -> None:
        try:
            with open(self.journal_path) as f:
                old = json.loads(f.readline())
            if not isinstance(old, dict):
                raise ValueError
        except (OSError, ValueError):
            raise ValueError(
                f"out: the journal {self.journal_path!r} is unreadable; delete it and "
                "the store to start over, or pass resume=False"
            ) from None
        diff = [k for k in sorted(set(old) | set(self.header)) if old.get(k) != self.header.get(k)]
        if diff:
            raise ValueError(
                f"out: {self.path!r} holds a run with other arguments (it differs in "
                f"{'; '.join(_CHANGED.get(k, k) for k in diff)}); nothing was overwritten. Pass "
                "another out= path, or resume=False to start over"
            )

    def records(self) -> List[Tuple[List[Tuple[int, int]], List[list]]]:
        """(tiles, regions) of every band in every rank's journal (torn lines are ignored)."""
        out = []
        for path in self._journals():
            try:
                with open(path) as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            for line in lines[1 if path == self.journal_path else 0 :]:
                try:
                    rec = json.loads(line)
                    tiles = [(int(t[0]), int(t[1])) for t in rec["tiles"]]
                    regions = [[int(v) for v in r] for r in rec["regions"]]
                    if any(len(r) != 5 for r in regions):
                        continue
                except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
                    continue  # a torn last line: those tiles are simply recomputed
                out.append((tiles, regions))
        return out

    def verified_done(self) -> Set[Tuple[int, int]]:
        """The journaled tiles whose bytes in the file match their recorded checksums; the
        others are recomputed (with a warning)."""
        done: Set[Tuple[int, int]] = set()
        bad: Set[Tuple[int, int]] = set()
        records = self.records()
        if records:
            arr = np.load(self.path, mmap_mode="r")
            for tiles, regions in records:
                if all(_crc(arr[r : r + h, c : c + w]) == crc for r, c, h, w, crc in regions):
                    done.update(tiles)
                else:
                    bad.update(tiles)
            del arr
        if bad - done:
            warnings.warn(
                f"out: {len(bad - done)} journaled tile(s) of {self.path!r} no longer hold the "
                "bytes that were written (the file was changed after the run wrote it?); they "
                "are computed again",
                stacklevel=4,
            )
        self.done = done
        return done

    def _create(self) -> None:
        for old in glob.glob(glob.escape(self.journal_path) + ".*"):
            os.remove(old)  # other ranks' records of an earlier run
        for old in (self.journal_path, self.path):
            if os.path.exists(old):
                os.remove(old)  # the journal first: never a journal over a foreign file
        try:
            arr = np.lib.format.open_memmap(
                self.path, mode="w+", dtype=self.np_dtype, shape=self.shape
            )
            del arr
            with open(self.path, "rb+") as f:
                size = os.fstat(f.fileno()).st_size
                try:  # claim the space now: a full disk then fails here, not mid-run
                    os.posix_fallocate(f.fileno(), 0, size)
                except OSError as e:
                    if e.errno in SPACE_ERRNOS:
                        raise
                os.fsync(f.fileno())
            with open(self.journal_path, "w") as f:
                f.write(json.dumps(self.header) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            need = int(np.prod(self.shape)) * self.np_dtype.itemsize
            for p in (self.journal_path, self.path):
                if os.path.exists(p):
                    os.remove(p)
            raise store_error(e, self.path, "creating", need) from None

    def _data_offset(self) -> int:
        arr = np.load(self.path, mmap_mode="r")
        shape, dtype, offset = arr.shape, arr.dtype, arr.offset
        del arr
        if tuple(shape) != self.shape or dtype != self.np_dtype:
            raise ValueError(
                f"out: {self.path!r} has shape {shape} and dtype {dtype}, "
                f"expected {self.shape} and {self.np_dtype}"
            )
        return offset

    def write(self, i0: int, j0: int, tile: torch.Tensor) -> None:
        a = np.ascontiguousarray(tile.numpy().astype(self.np_dtype, copy=False))
        row = int(np.prod(self.shape[1:])) * self.np_dtype.itemsize
        inner = int(np.prod(self.shape[2:])) * self.np_dtype.itemsize
        try:
            if j0 == 0 and a.shape[1] == self.shape[1]:  # whole rows: one write
                write_all(self.fd, a, self.offset + i0 * row)
            else:
                for r in range(a.shape[0]):
                    write_all(self.fd, a[r], self.offset + (i0 + r) * row + j0 * inner)
        except OSError as e:
            raise store_error(
                e, self.path, "writing tiles to", unallocated_bytes(self.path)
            ) from None
        self.pending.append([i0, j0, a.shape[0], a.shape[1], _crc(a)])

    def commit(self, keys) -> None:
        """Make the tiles written so far durable, then record ``keys`` (and the checksums of
        their writes) as done."""
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise store_error(e, self.path, "syncing") from None
        rec = {"tiles": [list(k) for k in keys], "regions": self.pending}
        self._append((json.dumps(rec) + "\n").encode())
        self.pending = []
        self.done.update(tuple(k) for k in keys)

    def _append(self, data: bytes) -> None:
        try:
            write_all(self.journal_fd, data)
            os.fsync(self.journal_fd)
        except OSError as e:
            raise store_error(e, self.journal_path_own, "journaling tiles in", 1 << 20) from None

    def result(self):
        return self.path

    def close(self):
        for fd in (self.fd, self.journal_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.journal_fd = -1
        if self.lock is not None:
            self.lock.release()


# what a journal header's keys stand for, in the message that refuses to resume
_CHANGED = {
    "version": "the journal's format (written by another pathkernel version)",
    "shape": "the kernel's shape",
    "dtype": "dtype",
    "model": "the model (its classes, structure, parameters or forward code)",
    "outputs": "outputs (the mode, or the callable's code or captured values)",
    "checkpoints": "the checkpoints or their weights",
    "train": "the train data",
    "query": "the query data",
    "tiles": "the tiling",
}


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1))


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(budget) -> int:
    """``"2GB"`` (binary units: 2 GiB), ``"512MB"``, or a number of bytes."""
    value = None
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        value = float(budget)
    elif isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)I?B?\s*", budget.upper())
        if m:
            value = float(m.group(1)) * _UNITS[m.group(2)]
    if value is None or not value > 0:
        raise ValueError(
            f"memory_budget: expected a positive number of bytes or a string like "
            f"'2GB', got {budget!r}"
        )
    return int(value)


class Writer:
    """Writes and commits bands of tiles behind the computation: on a background thread for a
    file store (its pwrites and fsyncs overlap the next band's work; one band waits at most),
    inline for RAM. A writer that falls behind commits several bands at once (one pair of
    fsyncs for all of them, at least every ``COMMIT_SECONDS``), so small tiles do not wait
    on the disk. Each band's tiles are released once written (``wait_written`` lets the
    caller hold at most one band's finished tiles: what the plan counts). A failure of the
    writer is raised at the next ``submit`` or ``close``."""

    COMMIT_SECONDS = 1.0

    def __init__(self, store):
        self.store = store
        self.error: Optional[BaseException] = None
        self.queue: Optional["queue.Queue"] = None
        self.submitted = self.written = 0
        self.cond = threading.Condition()
        if isinstance(store, FileStore):
            self.queue = queue.Queue(maxsize=1)
            self.thread = threading.Thread(target=self._run, name="pathkernel-writer", daemon=True)
            self.thread.start()

    def _write(self, writes, ready) -> None:
        if ready is not None:
            ready()
        for i0, j0, tile in writes:
            self.store.write(i0, j0, tile)

    def _run(self) -> None:
        keys: list = []
        last = time.monotonic()
        while True:
            item = self.queue.get()
            end = item is None
            if self.error is None:
                written = len(self.store.pending)
                try:
                    if item is not None:
                        writes, band, ready = item
                        item = None
                        self._write(writes, ready)
                        writes = ready = None  # the band's tiles go as soon as they are written
                        with self.cond:
                            self.written += 1
                            self.cond.notify_all()
                        keys += band
                    # commit when caught up (no band waiting), at the end, or after a while
                    if keys and (
                        end or self.queue.empty() or time.monotonic() - last > self.COMMIT_SECONDS
                    ):
                        self.store.commit(keys)
                        keys, last = [], time.monotonic()
                except BaseException as e:  # noqa: BLE001 -- re-raised in the caller's thread
                    self.error = e
                    # the bands written before the failure stay done (not the failed one)
                    del self.store.pending[written:]
                    if keys:
                        try:
                            self.store.commit(keys)
                        except BaseException:  # noqa: BLE001 -- the first error is raised
                            pass
                    with self.cond:
                        self.cond.notify_all()
            if end:
                return

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, writes, keys, ready: Optional[Callable[[], None]] = None) -> None:
        """``writes``: (row, column, host tile) triples; ``keys``: the tiles they complete;
        ``ready``: waits until the tiles hold their values (asynchronous device copies)."""
        self._check()
        if self.queue is None:
            self._write(writes, ready)
            self.store.commit(keys)
        else:
            self.submitted += 1
            self.queue.put((writes, keys, ready))

    def wait_written(self) -> None:
        """Wait until every submitted band is written (its tiles released; the commit may
        still follow), or the writer has failed."""
        with self.cond:
            while self.queue is not None and self.written < self.submitted and self.error is None:
                self.cond.wait()
        self._check()

    def close(self) -> None:
        """Wait for every submitted band to be durable."""
        if self.queue is not None:
            self.queue.put(None)
            self.thread.join()
            self.queue = None
        self._check()


def resumed_tiling(out, header: dict) -> Optional[Tuple[int, ...]]:
    """The tiling of an interrupted run of the same problem in ``out`` (its journal header
    equal to ``header`` in every field but the tiling), or None."""
    path = os.fspath(out) + ".journal"
    try:
        with open(path) as f:
            old = json.loads(f.readline())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(old, dict) or not isinstance(old.get("tiles"), list):
        return None
    if any(old.get(k) != v for k, v in header.items()):
        return None
    return tuple(int(t) for t in old["tiles"])


def open_store(
    out: Optional[str],
    shape,
    dtype,
    fingerprint,
    resume,
    rank: int = 0,
    create: bool = True,
    whole: bool = True,
):
    if out is None:
        return MemoryStore(shape, dtype, whole)
    return FileStore(out, shape, dtype, fingerprint, resume, rank, create)
