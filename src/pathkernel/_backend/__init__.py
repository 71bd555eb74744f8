"""The one door to native code.

CPU tensors cross to ``pathkernel._native`` as numpy views (no copy when they are already
contiguous); the native side re-validates what it is handed. CUDA tensors cross to
``pathkernel._native_cuda`` as (pointer, shape, strides, dtype, device) with torch's current
stream, or are refused with a message that says how to build the CUDA module.
"""

from __future__ import annotations

import ctypes
import os
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch


def _preload_openblas() -> None:
    # The extension links libscipy_openblas.so by soname; loading it here first makes the
    # import independent of where pip put the two packages.
    import scipy_openblas32 as sob

    ctypes.CDLL(os.path.join(sob.get_lib_dir(), sob.get_library(True)), mode=ctypes.RTLD_GLOBAL)


_preload_openblas()
from .. import _native  # noqa: E402

try:  # built only where nvcc was found
    from .. import _native_cuda  # type: ignore  # noqa: F401
except ImportError:
    _native_cuda = None

__version__: str = _native.__version__  # one source: pyproject -> CMake -> the native module


class Term(NamedTuple):
    """One per-layer factor pair of one side: ``A [n, S, da]`` (or None), ``D [n, S, C, dd]``;
    ``scale`` weights the term (a checkpoint's learning rate, a quadrature weight)."""

    A: Optional[torch.Tensor]
    D: torch.Tensor
    beta: float = 0.0
    scale: float = 1.0


def _as_numpy(t: torch.Tensor, name: str) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _side(terms: Sequence[Term], name: str, conv) -> list:
    return [
        (
            None if t.A is None else conv(t.A, f"{name}[{i}].A"),
            conv(t.D, f"{name}[{i}].D"),
            float(t.beta),
            float(t.scale),
        )
        for i, t in enumerate(terms)
    ]


def _cuda_desc(keep: list):
    """Descriptor (ptr, shape, strides, dtype, device) of a contiguous CUDA tensor; ``keep``
    holds the contiguous copies alive until the launch has been queued on the stream."""

    def conv(t: torch.Tensor, name: str):
        t = t.detach().contiguous()
        keep.append(t)
        return (
            t.data_ptr(),
            tuple(t.shape),
            tuple(t.stride()),
            str(t.dtype).replace("torch.", ""),
            t.device.index,
        )

    return conv


_last_cuda_kernel = ""


def last_cuda_kernel() -> str:
    """The CUDA kernel(s) the last call of ``accumulate`` on a GPU launched ("+"-separated;
    for tests and benchmarks: a variant forced by ``PATHKERNEL_CUDA_FUSED`` that cannot run a
    call falls back to the default)."""
    return _last_cuda_kernel


def accumulate(
    out: torch.Tensor,
    side1: Sequence[Term],
    side2: Optional[Sequence[Term]] = None,
    *,
    alpha: float = 1.0,
    col_weights: Optional[torch.Tensor] = None,
    tile: int = 512,
    threads: int = 0,
    precision: str = "3xtf32",
) -> torch.Tensor:
    """``out[i,j,c1,c2] += alpha * w_j * sum_l scale_l sum_{s,s'} (A1.A2 + beta_l)(D1.D2)``.

    ``side2=None`` means side 2 is side 1 (symmetric: only the upper half is computed).
    ``out`` must be a contiguous tensor of shape ``[n1, n2, C1, C2]``; CPU tensors go to the
    C++ core, CUDA tensors to the CUDA module (``precision``: "tf32", "3xtf32" or "exact" for
    float32 inputs there), all on one device.
    """
    if not out.is_contiguous():
        raise ValueError("out: expected a contiguous tensor")
    tensors = [out] + [
        x for t in list(side1) + list(side2 or []) for x in (t.A, t.D) if x is not None
    ]
    if col_weights is not None:
        tensors.append(col_weights)
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"out: all tensors must be on one device, got {sorted(map(str, devices))}")
    if out.device.type == "cuda":
        if _native_cuda is None:
            raise ValueError(
                f"out: got tensors on {out.device}, but pathkernel was built without CUDA; "
                "reinstall where nvcc is found (pip install . --config-settings="
                "cmake.define.PATHKERNEL_CUDA=ON) or move the model and inputs to the CPU"
            )
        from .cuda_check import selfcheck

        selfcheck(
            out.dtype,
            side1[0].D.dtype,
            precision,
            out.device,
            tensor_cores=all(t.D.shape[1] == 1 for t in side1) and out.shape[2:] == (1, 1),
        )
        keep: list = []
        conv = _cuda_desc(keep)
        stream = torch.cuda.current_stream(out.device).cuda_stream
        global _last_cuda_kernel
        _last_cuda_kernel = _native_cuda.accumulate(
            conv(out, "out"),
            _side(side1, "side1", conv),
            None if side2 is None else _side(side2, "side2", conv),
            float(alpha),
            None if col_weights is None else conv(col_weights, "col_weights"),
            precision,
            stream,
            out.device.index,
        )
        return out
    if out.device.type != "cpu":
        raise ValueError(f"out: tensors on {out.device} are not supported (CPU or CUDA)")
    _native.accumulate(
        _as_numpy(out, "out"),
        _side(side1, "side1", _as_numpy),
        None if side2 is None else _side(side2, "side2", _as_numpy),
        float(alpha),
        None if col_weights is None else _as_numpy(col_weights, "col_weights"),
        int(tile),
        int(threads),
    )
    return out


def info() -> dict:
    """What the native core was built with: ``version``, ``blas``, ``openmp``, ``threads``,
    ``cuda`` (whether ``_native_cuda`` was built) and, if so, ``cuda_devices`` and
    ``cuda_arches``."""
    d = dict(_native.info())
    d["version"] = __version__
    d["cuda"] = _native_cuda is not None
    if _native_cuda is not None:
        d.update({f"cuda_{k}": v for k, v in _native_cuda.info().items()})
    return d
