"""Checkpoint paths: ``[(weights, weight), ...]`` with weights a state_dict or a saved one."""
from __future__ import annotations

import math
import os
from typing import Dict, List, Sequence, Tuple

import torch

from .._autograd import normal_tensor
from .._capture.plan import ModelPlan, model_state


def check_checkpoints(checkpoints) -> List[Tuple[object, float]]:
    if isinstance(checkpoints, (str, bytes, dict)) or not isinstance(checkpoints, Sequence):
        raise TypeError("checkpoints: expected a sequence of (state_dict or path, weight) pairs, "
                        f"got {type(checkpoints).__name__}")
    if not checkpoints:
        raise ValueError("checkpoints: expected at least one (weights, weight) pair, got none")
    out = []
    for i, c in enumerate(checkpoints):
        if not isinstance(c, (tuple, list)) or len(c) != 2:
            raise TypeError(f"checkpoints[{i}]: expected a pair (state_dict or path, weight)")
        w, lr = c
        if not isinstance(w, (dict, str, os.PathLike)):
            raise TypeError(f"checkpoints[{i}]: weights must be a state_dict or a path, got "
                            f"{type(w).__name__}")
        if isinstance(lr, torch.Tensor):
            lr = lr.item()
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
            raise ValueError(f"checkpoints[{i}]: weight must be a finite number (the step's "
                             f"learning rate), got {lr!r}")
        if isinstance(w, (str, os.PathLike)) and not os.path.exists(w):
            raise ValueError(f"checkpoints[{i}]: no file at {os.fspath(w)!r}")
        out.append((w, float(lr)))
    return out


def checkpoint_state(plan: ModelPlan, weights, dtype: torch.dtype, i: int) -> Dict[str, torch.Tensor]:
    """The ``functional_call`` state of checkpoint ``i``."""
    sd = torch.load(weights, map_location="cpu", weights_only=True) if not isinstance(weights, dict) else weights
    state = model_state(plan, dtype)
    unknown = sorted(set(sd) - set(state))
    if unknown:
        raise ValueError(f"checkpoints[{i}]: keys not in the model: {unknown[:5]}")
    missing = sorted(n for n in plan.params if n not in sd)
    if missing:
        raise ValueError(f"checkpoints[{i}]: missing trainable parameters {missing[:5]}")
    for n, v in sd.items():
        if tuple(v.shape) != tuple(state[n].shape):
            raise ValueError(f"checkpoints[{i}]: '{n}' has shape {tuple(v.shape)}, the model's is "
                             f"{tuple(state[n].shape)}")
        t = normal_tensor(v.detach())
        t = t.to(dtype) if t.is_floating_point() else t
        state[n] = t.requires_grad_(state[n].requires_grad)
    return state
