"""Recording a training step of the user's own loop.

While the block is open, the model's forward pass (and only it: loss and optimizer code run
untouched) is recorded by an ``OpCapture`` entered in a forward pre-hook of the root module and
left in its forward hook; tensor hooks keep the gradient that the user's backward pass sends
to each use's output and to the model's output.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .ops import OpCapture, Use
from .outputs import output_tensor
from .plan import ModelPlan, Trace


class StepRecording:
    def __init__(self, plan: ModelPlan, trace: Trace):
        self.plan = plan
        self.trace = trace
        self.ids = {id(p): n for n, p in plan.params.items()}
        self.uses: List[List[Use]] = []  # one list per forward pass of the root
        self.root_inputs: List[tuple] = []
        self.root_outputs: List[torch.Tensor] = []
        self.root_grads: List[Optional[torch.Tensor]] = []
        self._mode: Optional[OpCapture] = None
        self._handles = []

    def __enter__(self):
        root = self.plan.model
        self._handles = [
            root.register_forward_pre_hook(self._pre, with_kwargs=True),
            root.register_forward_hook(self._post, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._leave()
        return False

    def _leave(self):
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def _pre(self, module, args, kwargs):
        if not torch.is_grad_enabled() or self._mode is not None:
            return None
        keys = self.plan.keys  # keyword inputs: the tensors named by the train set's keys
        ins = tuple(args) + tuple(kwargs.get(k) for k in keys) if keys else tuple(args)
        first = next((t for t in ins if isinstance(t, torch.Tensor)), None)
        n = first.shape[0] if first is not None and first.dim() else 1
        self._mode = OpCapture(self.ids, n, self.trace.expand, record_grads=True)
        self._mode.__enter__()
        self.root_inputs.append(ins)
        return None

    def _post(self, module, args, kwargs, output):
        if self._mode is None:
            return None
        self.uses.append(self._mode.uses)
        self._leave()
        self.root_outputs.append(output)
        i = len(self.root_grads)
        self.root_grads.append(None)
        out = output_tensor(output)  # a ModelOutput's logits, as the output modes read
        if out.requires_grad:
            out.register_hook(lambda grad: self.root_grads.__setitem__(i, grad.detach()))
        return None
