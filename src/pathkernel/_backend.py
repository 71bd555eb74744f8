"""The one door to native code.

CPU tensors cross to ``pathkernel._native`` as numpy views (no copy when they are already
contiguous); the native side re-validates what it is handed. CUDA tensors are refused with a
message that says how to get the CUDA module.
"""
from __future__ import annotations

import ctypes
import os
from typing import List, NamedTuple, Optional, Sequence

import numpy as np
import torch


def _preload_openblas() -> None:
    # The extension links libscipy_openblas.so by soname; loading it here first makes the
    # import independent of where pip put the two packages.
    import scipy_openblas32 as sob

    ctypes.CDLL(os.path.join(sob.get_lib_dir(), sob.get_library(True)), mode=ctypes.RTLD_GLOBAL)


_preload_openblas()
from . import _native  # noqa: E402

try:  # built only where nvcc was found
    from . import _native_cuda  # type: ignore  # noqa: F401
except ImportError:
    _native_cuda = None


class Term(NamedTuple):
    """One per-layer factor pair of one side: ``A [n, S, da]`` (or None), ``D [n, S, C, dd]``."""

    A: Optional[torch.Tensor]
    D: torch.Tensor
    beta: float = 0.0


def _as_numpy(t: torch.Tensor, name: str) -> np.ndarray:
    if t.device.type != "cpu":
        if _native_cuda is None:
            raise ValueError(
                f"{name}: got a tensor on {t.device}, but pathkernel was built without CUDA; "
                "reinstall on a machine with nvcc (CMake option PATHKERNEL_CUDA=ON) or move "
                "the model and inputs to the CPU")
        raise ValueError(f"{name}: CUDA tensors are not accepted by the CPU accumulator")
    return t.detach().contiguous().numpy()


def _side(terms: Sequence[Term], name: str) -> list:
    return [(None if t.A is None else _as_numpy(t.A, f"{name}[{i}].A"),
             _as_numpy(t.D, f"{name}[{i}].D"), float(t.beta)) for i, t in enumerate(terms)]


def accumulate(out: torch.Tensor, side1: Sequence[Term], side2: Optional[Sequence[Term]] = None,
               *, alpha: float = 1.0, col_weights: Optional[torch.Tensor] = None,
               tile: int = 512, threads: int = 0) -> torch.Tensor:
    """``out[i,j,c1,c2] += alpha * w_j * sum_l sum_{s,s'} (A1.A2 + beta_l)(D1.D2)`` in place.

    ``side2=None`` means side 2 is side 1 (symmetric: only the upper half is computed).
    ``out`` must be a contiguous CPU tensor of shape ``[n1, n2, C1, C2]``.
    """
    if not out.is_contiguous():
        raise ValueError("out: expected a contiguous tensor")
    o = _as_numpy(out, "out")
    w = None if col_weights is None else _as_numpy(col_weights, "col_weights")
    _native.accumulate(o, _side(side1, "side1"), None if side2 is None else _side(side2, "side2"),
                       float(alpha), w, int(tile), int(threads))
    return out


def info() -> dict:
    from . import __version__

    d = dict(_native.info())
    d["version"] = __version__
    d["cuda"] = _native_cuda is not None
    if _native_cuda is not None:
        d.update({f"cuda_{k}": v for k, v in _native_cuda.info().items()})
    return d
