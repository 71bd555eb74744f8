"""Argument checks shared by the public entry points: fail early, name the argument."""

from __future__ import annotations

import weakref
from typing import Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ._autograd import normal_tensor
from ._capture.plan import call_model, param_signature

FLOAT_DTYPES = (torch.float32, torch.float64)


def input_keys(x, name: str) -> Optional[Tuple[str, ...]]:
    """The keyword names of inputs given as a dict (``{"input_ids": ids, ...}``: the model is
    called as ``model(**x)``), ``None`` for positional inputs."""
    if not isinstance(x, Mapping):
        return None
    if not x or not all(isinstance(k, str) and k.isidentifier() for k in x):
        raise TypeError(
            f"{name}: a dict of inputs needs keyword names (str) for the model's arguments, "
            f"got keys {list(x)[:4]}"
        )
    return tuple(x)


def check_same_keys(k1, k2, n1: str, n2: str) -> None:
    if k1 != k2:
        raise ValueError(
            f"{n2}: expected the same inputs as {n1} "
            f"({'keywords ' + str(list(k1)) if k1 else 'positional'}), got "
            f"{'keywords ' + str(list(k2)) if k2 else 'positional inputs'}"
        )


def as_inputs(x, name: str) -> Tuple[torch.Tensor, ...]:
    """A tensor, a tuple of tensors or a dict of them (values in key order: see
    ``input_keys``), batch-first, one length, non-empty and finite."""
    keys = input_keys(x, name)
    xs = (x,) if isinstance(x, torch.Tensor) else tuple(x.values()) if keys else x
    if (
        not isinstance(xs, (tuple, list))
        or not xs
        or not all(isinstance(t, torch.Tensor) for t in xs)
    ):
        raise TypeError(
            f"{name}: expected a tensor, a tuple of tensors or a dict of them (batch first), "
            f"got {type(x).__name__}"
        )
    xs = tuple(normal_tensor(t) for t in xs)
    for i, t in enumerate(xs):
        if t.dim() == 0:
            raise ValueError(f"{name}: expected a batch dimension, got a 0-d tensor")
        if t.shape[0] != xs[0].shape[0]:
            raise ValueError(
                f"{name}: all input tensors must have the same batch size; "
                f"input 0 has {xs[0].shape[0]}, input {i} has {t.shape[0]}"
            )
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = (~torch.isfinite(t.reshape(t.shape[0], -1))).any(1).nonzero()[:5, 0].tolist()
            raise ValueError(f"{name}: contains NaN or Inf (examples {bad}...)")
    if xs[0].shape[0] == 0:
        raise ValueError(f"{name}: empty batch (0 examples)")
    return xs


def split_targets(targets, pair: bool, names: Tuple[str, str]):
    """``targets=`` as (first side's, second side's): one array where the call has one side
    (``names[1]`` not given), a pair where it has two."""
    if targets is None:
        return None, None
    seq = isinstance(targets, (tuple, list))
    if pair:
        if not (seq and len(targets) == 2):
            raise ValueError(
                f"targets: with {names[1]}=, expected a pair ({names[0]}'s targets, "
                f"{names[1]}'s targets), got {type(targets).__name__}"
            )
        return targets[0], targets[1]
    if seq:
        raise ValueError(
            f"targets: without {names[1]}=, expected one tensor or array ({names[0]}'s "
            f"targets), got a {type(targets).__name__} of {len(targets)}"
        )
    return targets, None


def as_targets(y, n: int, name: str, device: torch.device) -> torch.Tensor:
    """Per-example targets: a tensor or numpy array, one row per example, finite."""
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(np.array(y))
    if not isinstance(y, torch.Tensor):
        raise TypeError(
            f"{name}: expected a tensor or numpy array of per-example targets (batch first), "
            f"got {type(y).__name__}"
        )
    if y.dim() == 0 or y.shape[0] != n:
        raise ValueError(
            f"{name}: expected one target per example ({n}, batch first), got shape "
            f"{tuple(y.shape)}"
        )
    if y.is_floating_point() and not torch.isfinite(y).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    return normal_tensor(y).to(device)


def model_dtypes_device(model: nn.Module) -> Tuple[list, torch.device]:
    """The floating dtypes of the model's parameters (widest first) and their device."""
    ps = [p for p in model.parameters() if p.is_floating_point()]
    if not ps:
        return [torch.get_default_dtype()], torch.device("cpu")
    dtypes = sorted({p.dtype for p in ps}, key=lambda d: -torch.finfo(d).bits)
    return dtypes, ps[0].device


def check_inputs_match(model: nn.Module, xs, name: str) -> None:
    mdtypes, mdev = model_dtypes_device(model)
    for t in xs:
        if t.device != mdev:
            raise ValueError(
                f"{name}: is on {t.device} but the model is on {mdev}; move them to the same device"
            )
        if t.is_floating_point() and t.dtype not in mdtypes:
            have = " and ".join(str(d) for d in mdtypes)
            raise TypeError(
                f"{name}: has dtype {t.dtype} but the model's parameters are {have}; "
                "convert one of them (the kernel's precision is set by dtype=)"
            )


def check_same_features(x1, x2, n1: str = "x1", n2: str = "x2") -> None:
    """The same number of input tensors, of the same kinds (float or integer); per-example
    shapes may differ where the model accepts both (adaptive pooling, any sequence length)."""
    if len(x1) != len(x2):
        raise ValueError(f"{n2}: expected {len(x1)} input tensors like {n1}, got {len(x2)}")
    for i, (a, b) in enumerate(zip(x1, x2)):
        if a.is_floating_point() != b.is_floating_point() or a.dim() != b.dim():
            raise ValueError(
                f"{n2}: input {i} is {b.dtype} of per-example shape "
                f"{tuple(b.shape[1:])}, {n1}'s is {a.dtype} of shape "
                f"{tuple(a.shape[1:])}"
            )


def resolve_dtype(dtype: Optional[torch.dtype], model: nn.Module) -> torch.dtype:
    dtypes = model_dtypes_device(model)[0]
    if dtype is None:  # a model of mixed precision is computed in its widest dtype
        dtype = dtypes[0]
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
    if len(dtypes) > 1 and torch.finfo(dtype).bits < torch.finfo(dtypes[0]).bits:
        wide = [n for n, p in model.named_parameters() if p.dtype == dtypes[0]]
        raise ValueError(
            f"dtype: the model mixes {' and '.join(map(str, dtypes))} parameters ({dtypes[0]}: "
            f"{', '.join(wide[:3])}{', ...' if len(wide) > 3 else ''}); it is computed in its "
            f"widest dtype: pass dtype={dtypes[0]} (or None), not {dtype}"
        )
    return dtype


def check_batch_size(batch_size: Optional[int]) -> None:
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size: expected a positive int or None, got {batch_size!r}")


# model -> (its parameters, the inputs it has run on): what run_model_once need not run again
_RAN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def run_model_once(model: nn.Module, xs, name: str, keys=None) -> None:
    """Run the model on one example so a wrong feature shape is reported against ``name``;
    not again for inputs of a shape, dtype and device it ran on with the same parameters
    (a second call on a small model: 1-10 ms)."""
    params = param_signature(model)
    sig = (keys, tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in xs))
    ran = _RAN.get(model)
    if ran is not None and ran[0] == params and sig in ran[1]:
        return
    try:
        with torch.no_grad():
            call_model(model, tuple(t[:1] for t in xs), keys)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        ints = [t.dtype for t in xs if not t.is_floating_point()]
        msg = str(e)
        if ints and any(w in msg for w in ("dtype", "scalar type", "Long", "Int", "Byte")):
            raise TypeError(
                f"{name}: the model rejects {ints[0]} inputs ({msg.splitlines()[0]}); "
                "a model with float parameters takes float inputs: convert them, "
                "e.g. x.float() or x.double()"
            ) from e
        shapes = [tuple(t.shape[1:]) for t in xs]
        raise ValueError(
            f"{name}: the model rejects inputs of per-example shape "
            f"{shapes[0] if len(shapes) == 1 else shapes}: {e}"
        ) from e
    if ran is None or ran[0] != params:
        ran = _RAN[model] = (params, set())
    ran[1].add(sig)


def _all_finite(t: torch.Tensor) -> bool:
    # A sum is NaN/Inf when any element is (and, rarely, when finite values overflow): cheap
    # first, exact only when it fails.
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_finite_block(block, name: str) -> None:
    for f in block.factors.values():
        if not all(_all_finite(t) for t in f.tensors() if t.is_floating_point()):
            raise ValueError(f"{name}: the model's gradients contain NaN or Inf on these inputs")
