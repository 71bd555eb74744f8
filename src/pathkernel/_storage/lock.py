"""One writer per output file: an advisory lock beside it, held for the whole run.

``<out>.lock`` is locked with ``flock`` by the process that creates or resumes ``out`` (rank 0
of a collective job, whose other ranks write under its lock) and says who holds it. The
kernel drops the lock when its holder exits, however it dies, so a lock left by a killed run
is simply taken by the next one; the file itself stays (removing it would let two runs lock
two different files).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from .diskio import write_all


class OutputBusyError(RuntimeError):
    """Another process is writing the same output file."""


class OutputLock:
    def __init__(self, out: str):
        self.path = os.fspath(out) + ".lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._holder()
            os.close(self.fd)
            raise OutputBusyError(
                f"out: {os.fspath(out)!r} is being written by another run ({holder}); "
                "wait for it to finish, stop it, or pass another out= path"
            ) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(self.fd, 0)
        write_all(self.fd, json.dumps(me).encode(), 0)

    def _holder(self) -> str:
        try:
            with open(self.path) as f:
                h = json.loads(f.read() or "{}")
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(h["since"])))
            return f"process {int(h['pid'])} on {h['host']}, since {since}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not said who it is yet"

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1
