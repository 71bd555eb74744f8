"""Where a path kernel's tiles go: RAM, or a ``.npy`` file with a journal for resume.

The file is a plain ``.npy`` (``np.load(path, mmap_mode="r")`` reads it). Tiles are written
with ``pwrite`` at their offsets, so the file's pages never count against the process's
memory, then fsync'ed; only then is the tile appended to the journal (``<path>.journal``).
A tile that is not in the journal is recomputed on resume, so a run killed at any moment
never leaves a half-written tile that counts as done.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional, Set, Tuple

import numpy as np
import torch

JOURNAL_VERSION = 1


class MemoryStore:
    def __init__(self, shape, dtype: torch.dtype):
        self.tensor = torch.zeros(shape, dtype=dtype)
        self.done: Set[Tuple[int, int]] = set()

    def write(self, i0: int, j0: int, tile: torch.Tensor) -> None:
        self.tensor[i0:i0 + tile.shape[0], j0:j0 + tile.shape[1]] = tile

    def commit(self, keys) -> None:
        self.done.update(tuple(k) for k in keys)

    def result(self):
        return self.tensor

    def close(self):
        pass


class FileStore:
    """A ``.npy`` file of ``shape`` written tile by tile, with a journal of completed tiles."""

    def __init__(self, path, shape, dtype: torch.dtype, fingerprint: dict, resume: bool):
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
        header = {"version": JOURNAL_VERSION, "shape": list(self.shape),
                  "dtype": self.np_dtype.str, **fingerprint}
        self.done: Set[Tuple[int, int]] = set()
        if resume and os.path.exists(self.path) and os.path.exists(self.journal_path):
            self._open_existing(header)
        else:
            self._create(header)
        self.fd = os.open(self.path, os.O_RDWR)
        self.journal = open(self.journal_path, "a")

    def _open_existing(self, header: dict) -> None:
        with open(self.journal_path) as f:
            lines = f.read().splitlines()
        try:
            old = json.loads(lines[0])
        except (IndexError, json.JSONDecodeError):
            raise ValueError(f"out: the journal {self.journal_path!r} is unreadable; delete it and "
                             "the store to start over, or pass resume=False") from None
        diff = [k for k in sorted(set(old) | set(header)) if old.get(k) != header.get(k)]
        if diff:
            raise ValueError(
                f"out: {self.path!r} holds a run with other arguments (differs in: "
                f"{', '.join(diff)}); nothing was overwritten. Pass another out= path, or "
                "resume=False to start over")
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line: that tile is simply recomputed
            self.done.add((rec["tile"][0], rec["tile"][1]))
        self.offset = self._data_offset()

    def _create(self, header: dict) -> None:
        arr = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.np_dtype, shape=self.shape)
        del arr
        self.offset = self._data_offset()
        with open(self.journal_path, "w") as f:
            f.write(json.dumps(header) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _data_offset(self) -> int:
        arr = np.load(self.path, mmap_mode="r")
        shape, dtype, offset = arr.shape, arr.dtype, arr.offset
        del arr
        if tuple(shape) != self.shape or dtype != self.np_dtype:
            raise ValueError(f"out: {self.path!r} has shape {shape} and dtype {dtype}, "
                             f"expected {self.shape} and {self.np_dtype}")
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
        raise ValueError(f"memory_budget: expected a positive number of bytes or a string like "
                         f"'2GB', got {budget!r}")
    return int(value)


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


def open_store(out: Optional[str], shape, dtype, fingerprint, resume):
    if out is None:
        return MemoryStore(shape, dtype)
    return FileStore(out, shape, dtype, fingerprint, resume)
