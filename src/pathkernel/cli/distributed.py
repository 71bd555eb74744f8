"""Process-group set-up for commands launched by torchrun (one process per rank)."""

from __future__ import annotations

import os

import torch


def init_process_group(backend: str) -> None:
    """``torch.distributed.init_process_group`` from torchrun's environment, with the
    process group's keys under a prefix of this restart attempt: after
    ``torchrun --max-restarts`` restarts the workers, the agent's store still holds the
    addresses the killed workers published, and gloo would connect to those."""
    import torch.distributed as dist

    store, rank, world = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"pathkernel-attempt-{attempt}/", store),
        rank=rank,
        world_size=world,
    )
    if backend == "nccl" and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
