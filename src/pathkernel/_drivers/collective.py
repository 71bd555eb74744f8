"""Entry points as collective calls on a torch.distributed group.

Every rank of the group calls with the same arguments. Before any collective operation the
ranks meet in the group's c10d store with a bounded wait (a rank that never calls gives the
others a clear error, not a hang); then they compare fingerprints of their arguments (a
difference is named on every rank). Work failures are posted to the store, so a rank that
fails mid-way stops the others at the next meeting point instead of leaving them waiting.
Control and CPU data go over gloo (a gloo group is made when the given one is not).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import time
from datetime import timedelta
from typing import Any, Dict, List, Optional

_CALLS: Dict[tuple, int] = {}  # per group: collective pathkernel calls made so far
_GLOO: Dict[tuple, Any] = {}  # per group: its gloo twin for control traffic


def join_timeout() -> float:
    """Seconds the ranks wait for each other to enter a call (PATHKERNEL_JOIN_TIMEOUT)."""
    return float(os.environ.get("PATHKERNEL_JOIN_TIMEOUT", "300"))


class CollectiveError(RuntimeError):
    """Another rank failed, or did not join the call."""


class Collective:
    """The ranks running one call together (``group=None``: the default group when
    torch.distributed is initialised with more than one rank; ``False``: this process alone;
    a ``ProcessGroup``: its ranks)."""

    def __init__(self, group, what: str):
        self.what = what
        self.group = None
        self.rank, self.world = 0, 1
        if group is False:
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            if group is not None:
                raise ValueError(
                    "group: torch.distributed is not initialised; call "
                    "torch.distributed.init_process_group first, or pass group=None"
                )
            return
        g = dist.group.WORLD if group is None else group
        try:
            world = dist.get_world_size(g)
        except (RuntimeError, ValueError, TypeError) as e:
            raise ValueError(
                f"group: expected a torch.distributed ProcessGroup, None or False, "
                f"got {type(group).__name__} ({e})"
            ) from None
        if world > 1:
            self.dist = dist
            self.group = g
            self.rank, self.world = dist.get_rank(g), world
            self.ranks = list(dist.get_process_group_ranks(g))
            self.store = dist.distributed_c10d._get_default_store()
            key = tuple(self.ranks)
            _CALLS[key] = _CALLS.get(key, 0) + 1
            self.base = f"pathkernel/{'-'.join(map(str, self.ranks))}/{_CALLS[key]}/{what}"
            self._meet("join", join_timeout())
            self.control = self._control_group()

    @property
    def active(self) -> bool:
        return self.group is not None

    def native_threads(self) -> int:
        """Threads of the native core on this rank: OpenMP's choice (OMP_NUM_THREADS, which
        torchrun sets to 1 per rank) when set; otherwise the cores divided among the ranks
        on this machine, so that ranks sharing it do not oversubscribe its cores."""
        if not self.active or "OMP_NUM_THREADS" in os.environ:
            return 0
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        return max(1, (os.cpu_count() or 1) // max(1, local))

    @property
    def lead(self) -> bool:
        return self.rank == 0

    # ---- meeting points in the store ----------------------------------------------------------
    def _meet(self, tag: str, timeout: float, status: str = "ok") -> None:
        """Post this rank's status under ``tag`` and wait for every rank's; raise if one
        failed or did not arrive within ``timeout`` seconds."""
        me = self.ranks[self.rank]
        self.store.set(f"{self.base}/{tag}/{me}", status)
        keys = [f"{self.base}/{tag}/{r}" for r in self.ranks]
        fail = f"{self.base}/failed"
        deadline = time.monotonic() + timeout
        while True:
            if self.store.check([fail]):
                raise CollectiveError(f"{self.what}: {self.store.get(fail).decode()}")
            if self.store.check(keys):
                break
            if time.monotonic() > deadline:
                missing = [r for r, k in zip(self.ranks, keys) if not self.store.check([k])]
                raise CollectiveError(
                    f"{self.what}: rank(s) {missing} of the group did not "
                    f"{'join the call' if tag == 'join' else 'reach ' + tag} within "
                    f"{timeout:.0f} s (every rank must call {self.what} with the same "
                    "arguments; PATHKERNEL_JOIN_TIMEOUT sets the wait)"
                )
            time.sleep(0.02)

    def fail(self, exc: BaseException) -> None:
        """Tell the other ranks this one failed (they stop at their next meeting point)."""
        if self.active:
            msg = f"rank {self.rank} failed: {type(exc).__name__}: {exc}"
            try:
                self.store.compare_set(f"{self.base}/failed", "", msg)
            except Exception:  # the store may be gone when the job is torn down
                pass

    def barrier(self, tag: str, timeout: float = 7 * 24 * 3600.0) -> None:
        if self.active:
            self._meet(tag, timeout)

    # ---- data ---------------------------------------------------------------------------------
    def _control_group(self):
        key = tuple(self.ranks)
        if self.dist.get_backend(self.group) == "gloo":
            return self.group
        if key not in _GLOO:
            _GLOO[key] = self.dist.new_group(
                self.ranks, backend="gloo", use_local_synchronization=True
            )
        return _GLOO[key]

    def gather_objects(self, obj) -> List[Any]:
        out: List[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj, group=self.control)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj if self.lead else None]
        self.dist.broadcast_object_list(box, src=self.ranks[0], group=self.control)
        return box[0]

    def gather_to_lead(self, obj) -> Optional[List[Any]]:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        if not self.active:
            return [obj]
        out = [None] * self.world if self.lead else None
        self.dist.gather_object(obj, out, dst=self.ranks[0], group=self.control)
        return out

    def check_same(self, fields: Dict[str, Any]) -> None:
        """Raise on every rank when the ranks were handed different arguments."""
        if not self.active:
            return
        mine = {k: hashlib.sha1(pickle.dumps(v)).hexdigest() for k, v in fields.items()}
        every = self.gather_objects(mine)
        for k in fields:
            values = [e.get(k) for e in every]
            if len(set(values)) > 1:
                groups: Dict[str, List[int]] = {}
                for r, v in enumerate(values):
                    groups.setdefault(v, []).append(r)
                parts = " vs ".join(f"ranks {g}" for g in groups.values())
                raise ValueError(
                    f"{k}: differs between the ranks ({parts}); every rank must "
                    f"call {self.what} with the same arguments"
                )

    def agree(self, fn, undo=None):
        """Run ``fn`` on every rank; if it raises anywhere, raise on every rank (where it
        succeeded, after ``undo(result)`` when given)."""
        err = None
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 -- re-raised below, on every rank
            err = e
            result = None
        if self.active:
            statuses = self.gather_objects(None if err is None else f"{type(err).__name__}: {err}")
            bad = [(r, s) for r, s in enumerate(statuses) if s is not None]
            if bad and err is None:
                if undo is not None and result is not None:
                    undo(result)
                raise CollectiveError(f"{self.what}: rank {bad[0][0]} failed: {bad[0][1]}")
        if err is not None:
            raise err
        return result


__all__ = ["Collective", "CollectiveError", "join_timeout", "timedelta"]
