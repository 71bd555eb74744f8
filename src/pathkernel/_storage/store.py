"""Where a path kernel's tiles go: RAM, or a ``.npy`` file with journals for resume.

The file is a plain ``.npy`` (``np.load(path, mmap_mode="r")`` reads it). Tiles are written
with ``pwrite`` at their offsets, so the file's pages never count against the process's
memory, then fsync'ed; only then are they appended to a journal. Rank 0 (or a single
process) creates and sizes the file and writes the run's header as the first line of
``<path>.journal`` and its records after it; rank r > 0 appends its records to
``<path>.journal.<r>``. Resuming reads every journal, so a run killed at any moment (on any
rank) is finished by the same call with any number of ranks; a tile in no journal, or in a
torn last line, is recomputed.
"""

from __future__ import annotations

import glob
import json
import os
import queue
import re
import threading
from typing import Callable, Iterable, List, Optional, Set, Tuple

import numpy as np
import torch

JOURNAL_VERSION = 1


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

    def result(self):
        return self.tensor

    def close(self):
        pass


class FileStore:
    """A ``.npy`` file of ``shape`` written tile by tile, with journals of completed tiles."""

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
        if create:  # rank 0: a new run, or the check that the existing one is this problem
            if resume and os.path.exists(self.path) and os.path.exists(self.journal_path):
                self._check_header()
            else:
                self._create()
        else:
            self._check_header()
        self.offset = self._data_offset()
        self.done: Set[Tuple[int, int]] = self.read_done()
        self.fd = os.open(self.path, os.O_RDWR)
        own = self.journal_path if rank == 0 else f"{self.journal_path}.{rank}"
        self.journal = open(own, "a")

    def _journals(self) -> List[str]:
        return [self.journal_path] + sorted(glob.glob(glob.escape(self.journal_path) + ".*"))

    def _check_header(self) -> None:
        try:
            with open(self.journal_path) as f:
                old = json.loads(f.readline())
        except (OSError, json.JSONDecodeError):
            raise ValueError(
                f"out: the journal {self.journal_path!r} is unreadable; delete it and "
                "the store to start over, or pass resume=False"
            ) from None
        diff = [k for k in sorted(set(old) | set(self.header)) if old.get(k) != self.header.get(k)]
        if diff:
            raise ValueError(
                f"out: {self.path!r} holds a run with other arguments (differs in: "
                f"{', '.join(diff)}); nothing was overwritten. Pass another out= path, or "
                "resume=False to start over"
            )

    def read_done(self) -> Set[Tuple[int, int]]:
        """The tiles recorded in every rank's journal (torn lines are ignored)."""
        done = set()
        for path in self._journals():
            try:
                with open(path) as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            for line in lines[1 if path == self.journal_path else 0 :]:
                try:
                    rec = json.loads(line)
                    done.add((int(rec["tile"][0]), int(rec["tile"][1])))
                except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
                    continue  # a torn last line: that tile is simply recomputed
        return done

    def _create(self) -> None:
        for old in glob.glob(glob.escape(self.journal_path) + ".*"):
            os.remove(old)  # other ranks' records of an earlier run
        arr = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.np_dtype, shape=self.shape)
        del arr
        with open(self.path, "rb+") as f:
            os.fsync(f.fileno())
        with open(self.journal_path, "w") as f:
            f.write(json.dumps(self.header) + "\n")
            f.flush()
            os.fsync(f.fileno())

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
        for r in range(a.shape[0]):
            os.pwrite(self.fd, a[r].tobytes(), self.offset + (i0 + r) * row + j0 * inner)

    def commit(self, keys) -> None:
        """Make the tiles written so far durable, then record ``keys`` as done."""
        os.fsync(self.fd)
        self.journal.write("".join(json.dumps({"tile": list(k)}) + "\n" for k in keys))
        self.journal.flush()
        os.fsync(self.journal.fileno())
        self.done.update(tuple(k) for k in keys)

    def result(self):
        return self.path

    def close(self):
        os.close(self.fd)
        self.journal.close()


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
    inline for RAM. A failure of the writer is raised at the next ``submit`` or ``close``."""

    def __init__(self, store):
        self.store = store
        self.error: Optional[BaseException] = None
        self.queue: Optional["queue.Queue"] = None
        if isinstance(store, FileStore):
            self.queue = queue.Queue(maxsize=1)
            self.thread = threading.Thread(target=self._run, name="pathkernel-writer", daemon=True)
            self.thread.start()

    def _apply(self, writes, keys, ready) -> None:
        if ready is not None:
            ready()
        for i0, j0, tile in writes:
            self.store.write(i0, j0, tile)
        self.store.commit(keys)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self._apply(*item)
                except BaseException as e:  # noqa: BLE001 -- re-raised in the caller's thread
                    self.error = e

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def submit(self, writes, keys, ready: Optional[Callable[[], None]] = None) -> None:
        """``writes``: (row, column, host tile) triples; ``keys``: the tiles they complete;
        ``ready``: waits until the tiles hold their values (asynchronous device copies)."""
        self._check()
        if self.queue is None:
            self._apply(writes, keys, ready)
        else:
            self.queue.put((writes, keys, ready))

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
