"""Checkpoint paths: ``[(weights, weight), ...]``; weights are a state_dict, the path of a
saved one (or of a saved dict holding one), or a model whose state_dict is taken."""

from __future__ import annotations

import math
import os
import pickle
import warnings
import zipfile
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from .._autograd import normal_tensor
from .._capture.plan import ModelPlan, model_state


def check_checkpoints(checkpoints) -> List[Tuple[object, float]]:
    if isinstance(checkpoints, (str, bytes, dict)) or not isinstance(checkpoints, Sequence):
        raise TypeError(
            "checkpoints: expected a sequence of (state_dict or path, weight) pairs, "
            f"got {type(checkpoints).__name__}"
        )
    if not checkpoints:
        raise ValueError("checkpoints: expected at least one (weights, weight) pair, got none")
    out = []
    for i, c in enumerate(checkpoints):
        if not isinstance(c, (tuple, list)) or len(c) != 2:
            raise TypeError(f"checkpoints[{i}]: expected a pair (state_dict or path, weight)")
        w, lr = c
        if isinstance(w, nn.Module):
            w = {k: v.detach() for k, v in w.state_dict().items()}  # read when the kernel runs
        if not isinstance(w, (dict, str, os.PathLike)):
            raise TypeError(
                f"checkpoints[{i}]: weights must be a state_dict, a path or an "
                f"nn.Module, got {type(w).__name__}"
            )
        if isinstance(lr, torch.Tensor):
            lr = lr.item()
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
            raise ValueError(
                f"checkpoints[{i}]: weight must be a finite number (the step's "
                f"learning rate), got {lr!r}"
            )
        if isinstance(w, (str, os.PathLike)) and not os.path.exists(w):
            raise ValueError(f"checkpoints[{i}]: no file at {os.fspath(w)!r}")
        out.append((w, float(lr)))
    return out


def checkpoint_state(
    plan: ModelPlan, weights, dtype: torch.dtype, i: int
) -> Dict[str, torch.Tensor]:
    """The ``functional_call`` state of checkpoint ``i``."""
    sd = weights if isinstance(weights, dict) else load_state_dict(weights, i)
    sd = _unwrap(sd)
    state = model_state(plan, dtype)
    if sd and not set(sd) & set(state) and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}  # saved from a DDP-wrapped model
    unknown = sorted(set(sd) - set(state))
    if unknown:
        raise ValueError(f"checkpoints[{i}]: keys not in the model: {unknown[:5]}")
    missing = sorted(n for n in plan.params if n not in sd)
    if missing:
        raise ValueError(f"checkpoints[{i}]: missing trainable parameters {missing[:5]}")
    for n, v in sd.items():
        if tuple(v.shape) != tuple(state[n].shape):
            raise ValueError(
                f"checkpoints[{i}]: '{n}' has shape {tuple(v.shape)}, the model's is "
                f"{tuple(state[n].shape)}"
            )
        t = normal_tensor(v.detach()).to(state[n].device)  # a host checkpoint for a GPU model
        t = t.to(dtype) if t.is_floating_point() else t
        if t.is_floating_point() and not torch.isfinite(t).all():
            where = "" if isinstance(weights, dict) else f" ({os.fspath(weights)!r})"
            raise ValueError(
                f"checkpoints[{i}]{where}: '{n}' contains NaN or Inf "
                f"({int((~torch.isfinite(t)).sum())} of {t.numel()} values)"
            )
        state[n] = t.requires_grad_(state[n].requires_grad)
    return state


_HINT = (
    "a state_dict is expected: save one with torch.save(model.state_dict(), path) (a dict "
    "holding it under 'state_dict', 'model_state_dict' or 'model' also works), or pass "
    "the loaded nn.Module itself"
)


def load_state_dict(path, i: int) -> dict:
    """``torch.load`` of checkpoint ``i`` with ``weights_only=True``, or a ValueError that names
    the checkpoint and says what is expected."""
    where = f"checkpoints[{i}] ({os.fspath(path)!r})"
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of random bytes
            warnings.simplefilter("ignore")
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # random bytes can make the unpickler raise anything
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError:
            magic = b""
        if zipfile.is_zipfile(path) and isinstance(e, pickle.UnpicklingError):
            raise ValueError(
                f"{where}: holds pickled objects, not only tensors (a whole model "
                f"saved with torch.save(model)?); {_HINT}"
            ) from None
        if magic.startswith(b"PK"):  # a torch archive that does not read back
            raise ValueError(
                f"{where}: cannot be read, truncated or corrupt ({first}); {_HINT}"
            ) from None
        raise ValueError(f"{where}: not a torch checkpoint ({first}); {_HINT}") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{where}: holds a {type(sd).__name__}; {_HINT}")
    return sd


def _unwrap(sd: dict) -> dict:
    """A state_dict saved inside a training checkpoint dict."""
    if sd and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(sd.get(key), dict):
                return sd[key]
    return sd


def allocated_bytes(weights, plan: ModelPlan, dtype: torch.dtype) -> int:
    """Bytes a checkpoint's state takes beyond the caller's own tensors: a loaded file, or a
    cast to ``dtype`` (a state_dict already in ``dtype`` is used in place)."""
    item = torch.finfo(dtype).bits // 8
    total = sum(p.numel() for p in plan.model.parameters()) * item
    if not isinstance(weights, dict):
        return total
    same = all(
        not v.is_floating_point() or v.dtype == dtype
        for v in weights.values()
        if isinstance(v, torch.Tensor)
    )
    return 0 if same else total
