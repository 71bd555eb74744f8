"""Features kept on disk while a path kernel runs, instead of being extracted again.

Under a small memory budget the tiles are small, so the features of a column block are
needed again by every row block (and a row block's by every band when the checkpoints are
streamed). Recomputing them costs a forward and backward pass per example each time; reading
them back costs a copy. A ``FeatureSpill`` writes each block once to an unnamed scratch file
(gone when closed, or when the process dies) and reads it back into fresh tensors with
``pread`` (no mapping: only the blocks in use count against the process's memory). The
bytes read back are the bytes extracted, so a spilled run is bit-identical to one that
recomputes.

Where the filesystem allows it, blocks are written past the page cache (``O_DIRECT``, through
a page-aligned staging buffer, each tensor at an aligned offset): a scratch file of tens of
GiB written through the cache is throttled to the cache's writeback rate (measured here: 0.5
GB/s buffered against 1.6 GB/s direct), and its dirty pages would push out the pages the
reads want. Reads stay buffered, so blocks read again come from the cache where it holds them.

The ranks of a collective run share their spills: each writes a named file (``name``: a
prefix, the output's), hands the others its ``shared()`` index, ``attach``es theirs, and once
every rank has opened every file, ``unlink``s its own (the data stays readable until the
files are closed). A job killed before that leaves named files; the next run on the same
output removes them (``remove_stale``, under the output's lock).
"""

from __future__ import annotations

import glob
import mmap
import os
import tempfile
import warnings
from typing import Dict, Hashable, List, Optional, Tuple

import torch

from .._capture.blocks import Block, Factor
from .diskio import SPACE_ERRNOS, fmt_bytes, store_error, write_all

_Tensor = Tuple[int, Tuple[int, ...], torch.dtype]  # offset, shape, dtype
PREFIX = ".pathkernel-features-"
_ALIGN = 4096  # offsets and lengths of direct writes
_STAGE = 8 << 20  # bytes of the staging buffer of direct writes


class FeatureSpill:
    """Blocks of features by key, in a scratch file in ``folder``."""

    def __init__(self, folder: str, name: Optional[str] = None):
        self.folder = folder
        self.full = False  # the disk filled up: nothing more is kept, the rest is recomputed
        self.path: Optional[str] = None  # a named file's, until it is unlinked
        try:
            if name is not None:
                fd, self.path = tempfile.mkstemp(dir=folder, prefix=name)
                self._file = os.fdopen(fd, "w+b")
            else:
                self._file = tempfile.TemporaryFile(dir=folder, prefix=PREFIX)
        except OSError as e:
            raise store_error(e, os.path.join(folder, PREFIX + "*"), "creating") from None
        self._fd = self._file.fileno()
        self._files = [self._file]  # this spill's own file, then the attached ones
        # key -> (file, examples, outputs, per factor: key, beta, materialized, A, D, tied)
        self._index: Dict[Hashable, Tuple[int, int, int, List[tuple]]] = {}
        self._end = 0
        self.bytes_written = 0
        self.bytes_read = 0
        self._direct, self._stage = _direct_writer(self._fd)

    def fileno(self) -> int:
        """This spill's own file."""
        return self._fd

    def __contains__(self, key: Hashable) -> bool:
        return key in self._index

    def put(self, key: Hashable, block: Block) -> None:
        """Keep ``block`` under ``key``; on a full disk, warn once and keep nothing more (the
        caller recomputes what is not here, with the same result)."""
        if self.full:
            return
        try:
            entries = [(k, *self._write_factor(f)) for k, f in block.factors.items()]
        except OSError as e:
            if e.errno not in SPACE_ERRNOS:
                raise store_error(e, self.folder, "keeping features in a scratch file in") from None
            self.full = True
            warnings.warn(
                f"path_kernel: the disk of {self.folder!r} filled up after "
                f"{fmt_bytes(self.bytes_written)} of features were kept there ({e.strerror}); "
                "the rest are recomputed instead (slower, same result)",
                stacklevel=2,
            )
            return
        self._index[key] = (0, block.n, block.C, entries)

    def get(self, key: Hashable) -> Optional[Block]:
        entry = self._index.get(key)
        if entry is None:
            return None
        slot, n, C, entries = entry
        fd = self._files[slot].fileno()
        return Block(n, C, {k: self._read_factor(fd, e) for k, *e in entries})

    def _write_factor(self, f: Factor) -> tuple:
        tied = None if f.tied is None else self._write_factor(f.tied)
        a = None if f.A is None else self._write(f.A)
        return f.beta, f.materialized, a, self._write(f.D), tied

    def _read_factor(self, fd: int, entry: tuple) -> Factor:
        beta, materialized, a, d, tied = entry
        return Factor(
            None if a is None else self._read(fd, a),
            self._read(fd, d),
            beta,
            materialized,
            None if tied is None else self._read_factor(fd, tied),
        )

    def shared(self) -> Tuple[Optional[str], dict]:
        """What another process needs to read the blocks of this spill's own file."""
        return self.path, {k: e[1:] for k, e in self._index.items() if e[0] == 0}

    def attach(self, path: str, index: dict) -> None:
        """Read the blocks of another spill's file (``shared()``'s answer there) too."""
        try:
            f = open(path, "rb")
        except OSError as e:
            raise store_error(e, path, "reading another rank's features from") from None
        self._files.append(f)
        for k, e in index.items():
            self._index.setdefault(k, (len(self._files) - 1, *e))

    def unlink(self) -> None:
        """Remove the named file's name (its blocks stay readable while it is open)."""
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None

    def close(self) -> None:
        self._buffered()
        for f in self._files:
            f.close()
        self.unlink()
        self._index.clear()

    def _buffered(self) -> None:
        """Write through the page cache from now on (or, at close, release the direct
        descriptor; the staging map goes with its last reference: a failed write's
        traceback may still hold a view of it)."""
        direct, self._direct, self._stage = self._direct, None, None
        if direct is not None:
            os.close(direct)

    def _write(self, t: torch.Tensor) -> _Tensor:
        raw = _bytes(t.detach().to("cpu").contiguous())
        view = memoryview(raw.numpy())
        if self._direct is not None:
            offset = -(-self._end // _ALIGN) * _ALIGN
            self._end = offset + -(-len(view) // _ALIGN) * _ALIGN  # even if the write fails
            try:
                self._write_direct(view, offset)
            except OSError as e:
                if e.errno in SPACE_ERRNOS:
                    raise
                self._buffered()  # a filesystem that takes the flag but not the writes
                write_all(self._fd, view, offset)
        else:
            offset = self._end
            self._end += len(view)  # even when the write fails: no later block overlaps it
            write_all(self._fd, view, offset)
        self.bytes_written += len(view)
        return offset, tuple(t.shape), t.dtype

    def _write_direct(self, view: memoryview, offset: int) -> None:
        """``view`` at the aligned ``offset``, staged in aligned pieces (the last padded)."""
        stage = memoryview(self._stage)
        for i in range(0, len(view), _STAGE):
            piece = view[i : i + _STAGE]
            stage[: len(piece)] = piece
            padded = -(-len(piece) // _ALIGN) * _ALIGN
            write_all(self._direct, stage[:padded], offset + i)

    def _read(self, fd: int, spec: _Tensor) -> torch.Tensor:
        offset, shape, dtype = spec
        t = torch.empty(shape, dtype=dtype)
        view = memoryview(_bytes(t).numpy())
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise OSError("pathkernel: the feature scratch file ended early")
            done += got
        self.bytes_read += len(view)
        return t


def _direct_writer(fd: int):
    """(a descriptor that writes ``fd``'s file past the page cache, its staging buffer), or
    (None, None) where the system or the filesystem does not allow it."""
    if not hasattr(os, "O_DIRECT"):
        return None, None
    try:
        direct = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return None, None
    return direct, mmap.mmap(-1, _STAGE)  # anonymous maps are page-aligned


def shared_name(out: str) -> str:
    """The prefix of the named scratch files of a collective run writing ``out``."""
    return f".{os.path.basename(os.fspath(out))}.features-"


def remove_stale(out: str) -> None:
    """Remove the named scratch files a killed collective run on ``out`` left behind (call
    with the output's lock held: no live run on ``out`` owns them)."""
    folder = os.path.dirname(os.path.abspath(os.fspath(out)))
    for path in glob.glob(os.path.join(glob.escape(folder), glob.escape(shared_name(out)) + "*")):
        try:
            os.unlink(path)
        except OSError:
            pass


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat uint8 tensor (shares memory)."""
    return t.reshape(-1).view(torch.uint8)
