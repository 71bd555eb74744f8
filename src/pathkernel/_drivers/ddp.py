"""Recording a DistributedDataParallel training run: what differs from one process.

Each rank records its own shard of every step (global example indices). DDP averages the
ranks' gradients, so each example's share of the update is its local share divided by the
world size; the predicted update is summed over the ranks (an all-reduce of one parameter
vector per step) before it is checked against the update the optimizer made. The part of an
update that no example carries (weight decay, optimizer state from before recording) is
counted on rank 0 only. ``kernel_machine()`` sums the ranks' accumulators onto rank 0.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn


class DataParallel:
    """The ranks of a DDP model (``world == 1``: an ordinary model, nothing to do)."""

    def __init__(self, model: nn.Module):
        self.ddp: Optional[nn.Module] = None
        self.module = model
        self.rank, self.world = 0, 1
        ddp_cls = getattr(torch.nn.parallel, "DistributedDataParallel", None)
        if ddp_cls is None or not isinstance(model, ddp_cls):
            return
        import torch.distributed as dist

        self.ddp, self.module = model, model.module
        self.dist = dist
        group = model.process_group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        ranks = list(dist.get_process_group_ranks(group))
        # CPU float64 traffic over gloo, whatever backend the model's gradients use
        self.group = (
            group
            if dist.get_backend(group) == "gloo"
            else dist.new_group(ranks, backend="gloo", use_local_synchronization=True)
        )
        self.root = ranks[0]
        self.check_hooks()

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def check_hooks(self) -> None:
        """A communication hook that compresses gradients (PowerSGD, fp16) makes the applied
        update differ from the mean of the recorded gradients: refused."""
        if self.ddp is None:
            return
        hooks = [
            h
            for h, _ in getattr(self.ddp, "_comm_hooks", [])
            if getattr(h, "__name__", "") != "allreduce_hook"
        ]
        try:
            builtin = self.ddp._get_ddp_logging_data().get("comm_hook", "")
        except (AttributeError, RuntimeError):
            builtin = ""
        names = [getattr(h, "__qualname__", repr(h)) for h in hooks]
        if builtin and builtin not in names and "allreduce" not in builtin:
            names.append(builtin)
        if names:
            raise ValueError(
                f"model: DistributedDataParallel with the communication hook {names[0]} changes "
                "the all-reduced gradient (compression), so the update is not the mean of the "
                "recorded per-example gradients; record without it"
            )

    def allreduce(self, vec: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The sum over the ranks of parameter-shaped float64 tensors (one flat message)."""
        if not self.active:
            return vec
        names = sorted(vec)
        flat = torch.cat([vec[n].reshape(-1).double().cpu() for n in names])
        self.dist.all_reduce(flat, group=self.group)
        out, i = {}, 0
        for n in names:
            k = vec[n].numel()
            out[n] = flat[i : i + k].reshape(vec[n].shape).to(vec[n].device)
            i += k
        return out

    def reduce_to_lead(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """The sum over the ranks of ``t`` (a copy) on rank 0; None elsewhere."""
        if not self.active:
            return t.clone()
        total = t.detach().double().cpu().contiguous().clone()
        self.dist.reduce(total, dst=self.root, group=self.group)
        return total if self.lead else None
