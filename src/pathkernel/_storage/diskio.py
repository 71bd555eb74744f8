"""Writes that are checked, and the errors a full or failing disk becomes.

``os.pwrite`` / ``os.write`` may write fewer bytes than asked (a filling disk, a signal): every
write here loops until the whole buffer is on its way or the system says why not, and that
reason becomes an exception naming the file, the space still needed and what to do next.
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import Optional

# disk full, quota exceeded, file too large: freeing space (or another folder) fixes them
SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class StoreWriteError(OSError):
    """A write to an output or scratch file failed; what was completed before is kept."""

    def __init__(self, message: str, errno_: int, strerror: str):
        super().__init__(errno_, strerror)
        self.message = message

    def __str__(self) -> str:
        return self.message


def write_all(fd: int, data, offset: Optional[int] = None) -> None:
    """Write every byte of ``data`` (a buffer) at ``offset`` (None: at the descriptor's own
    position, e.g. the end of an append-only journal), or raise ``OSError``."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        if n <= 0:  # POSIX allows 0 only for an empty buffer; never spin on it
            raise OSError(errno.EIO, "write wrote no bytes")
        view = view[n:]
        if offset is not None:
            offset += n


def free_bytes(path: str) -> Optional[int]:
    try:
        return shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    except OSError:
        return None


def unallocated_bytes(path: str) -> int:
    """Bytes of a (sparse) file that the filesystem has not allocated yet."""
    try:
        st = os.stat(path)
    except OSError:
        return 0
    return max(0, st.st_size - 512 * getattr(st, "st_blocks", st.st_size // 512))


def store_error(e: OSError, path: str, what: str, need: int = 0) -> StoreWriteError:
    """``e`` raised while ``what`` (e.g. "writing tiles to") ``path``, as a StoreWriteError
    that says how much space is missing and that the run can be resumed."""
    reason = e.strerror or str(e)
    msg = f"out: {what} {path!r} failed: {reason}"
    if e.errno in SPACE_ERRNOS:
        free = free_bytes(path)
        msg += (
            f" ({fmt_bytes(free) if free is not None else 'unknown'} free in "
            f"{os.path.dirname(os.path.abspath(path))!r}"
            + (f"; about {fmt_bytes(need)} more is needed" if need > 0 else "")
            + ")"
        )
    msg += (
        ". Every tile recorded in the journal before the failure is kept: fix the cause and "
        "run the same call again to resume"
    )
    return StoreWriteError(msg, e.errno or errno.EIO, reason)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
