"""Capturing per-layer inputs and outputs with torch hooks.

Forward hooks on the plan's modules record, for every call, the input factor ``A`` and the
output ``y``; the output factor ``D`` is later the gradient of the kernel's function with
respect to ``y``. In recording mode a tensor hook also keeps the gradient that the user's own
backward pass sends to each ``y``, and a hook on the root keeps the model's output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from .plan import ModelPlan


@dataclass
class Use:
    group: int
    module: torch.nn.Module
    a: Optional[torch.Tensor]
    y: torch.Tensor
    version: int = 0                     # y._version when recorded (in-place ops bump it)
    grad: Optional[torch.Tensor] = None  # filled by a tensor hook in recording mode


class Capture:
    """Context manager: hooks on every module of the plan (and the root in recording mode)."""

    def __init__(self, plan: ModelPlan, record_grads: bool = False, copy_outputs: bool = True):
        self.plan = plan
        self.record_grads = record_grads
        self.copy_outputs = copy_outputs
        self.uses: List[Use] = []
        self.root_outputs: List[torch.Tensor] = []
        self.root_inputs: List[tuple] = []
        self.root_grads: List[Optional[torch.Tensor]] = []
        self._handles = []

    def __enter__(self):
        for k, g in enumerate(self.plan.groups):
            for m in g.modules:
                self._handles.append(m.register_forward_hook(self._hook(k)))
        if self.record_grads:
            root = self.plan.model
            self._handles.append(root.register_forward_hook(self._root_hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _hook(self, k: int):
        g = self.plan.groups[k]

        def hook(module, args, output):
            if not torch.is_grad_enabled():
                return None
            a = g.rule.a_factor(module, args).detach() if g.weight is not None else None
            use = Use(k, module, a, output, output._version)
            self.uses.append(use)
            if self.record_grads and output.requires_grad:
                output.register_hook(lambda grad, u=use: setattr(u, "grad", grad.detach()))
            # With copies, an in-place op after the module cannot change the tensor whose
            # gradient we read; without, the caller checks the versions and retries.
            return output.clone() if self.copy_outputs else None

        return hook

    def _root_hook(self, module, args, output):
        if not torch.is_grad_enabled():
            return None
        self.root_inputs.append(args)
        self.root_outputs.append(output)
        i = len(self.root_grads)
        self.root_grads.append(None)
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda grad: self.root_grads.__setitem__(i, grad.detach()))
        return None
