"""Features kept on disk while a path kernel runs, instead of being extracted again.

Under a small memory budget the tiles are small, so the features of a column block are
needed again by every row block (and a row block's by every band when the checkpoints are
streamed). Recomputing them costs a forward and backward pass per example each time; reading
them back costs a copy. A ``FeatureSpill`` writes each block once to an unnamed scratch file
(gone when closed, or when the process dies) and reads it back into fresh tensors with
``pread`` (no mapping: only the blocks in use count against the process's memory). The
bytes read back are the bytes extracted, so a spilled run is bit-identical to one that
recomputes.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Dict, Hashable, List, Optional, Tuple

import torch

from .._capture.blocks import Block, Factor
from .diskio import SPACE_ERRNOS, fmt_bytes, store_error, write_all

_Tensor = Tuple[int, Tuple[int, ...], torch.dtype]  # offset, shape, dtype


class FeatureSpill:
    """Blocks of features by key, in a scratch file in ``folder``."""

    def __init__(self, folder: str):
        self.folder = folder
        self.full = False  # the disk filled up: nothing more is kept, the rest is recomputed
        try:
            self._file = tempfile.TemporaryFile(dir=folder, prefix=".pathkernel-features-")
        except OSError as e:
            raise store_error(
                e, os.path.join(folder, ".pathkernel-features-*"), "creating"
            ) from None
        self._fd = self._file.fileno()
        self._index: Dict[Hashable, Tuple[int, int, List[tuple]]] = {}
        self._end = 0
        self.bytes_written = 0
        self.bytes_read = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._index

    def put(self, key: Hashable, block: Block) -> None:
        """Keep ``block`` under ``key``; on a full disk, warn once and keep nothing more (the
        caller recomputes what is not here, with the same result)."""
        if self.full:
            return
        try:
            entries = [
                (
                    k,
                    f.beta,
                    f.materialized,
                    None if f.A is None else self._write(f.A),
                    self._write(f.D),
                )
                for k, f in block.factors.items()
            ]
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
        self._index[key] = (block.n, block.C, entries)

    def get(self, key: Hashable) -> Optional[Block]:
        entry = self._index.get(key)
        if entry is None:
            return None
        n, C, entries = entry
        factors = {
            k: Factor(None if a is None else self._read(a), self._read(d), beta, materialized)
            for k, beta, materialized, a, d in entries
        }
        return Block(n, C, factors)

    def close(self) -> None:
        self._file.close()
        self._index.clear()

    def _write(self, t: torch.Tensor) -> _Tensor:
        raw = _bytes(t.detach().to("cpu").contiguous())
        offset, view = self._end, memoryview(raw.numpy())
        self._end += len(view)  # even when the write fails: no later block overlaps it
        write_all(self._fd, view, offset)
        self.bytes_written += len(view)
        return offset, tuple(t.shape), t.dtype

    def _read(self, spec: _Tensor) -> torch.Tensor:
        offset, shape, dtype = spec
        t = torch.empty(shape, dtype=dtype)
        view = memoryview(_bytes(t).numpy())
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise OSError("pathkernel: the feature scratch file ended early")
            done += got
        self.bytes_read += len(view)
        return t


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat uint8 tensor (shares memory)."""
    return t.reshape(-1).view(torch.uint8)
