"""Once per process and configuration, the CUDA kernel a call will use is run on a small
problem and compared with the CPU core in float64: a wrong GPU kernel raises here instead of
returning a silently wrong kernel. (CI has no GPU, so tests/test_cuda.py runs only where a
GPU is lent; this guards every other machine.)"""

from __future__ import annotations

import torch

from . import Term, accumulate

# Tolerances of the CUDA kernels against float64, by input dtype and precision.
_CUDA_TOL = {
    ("float32", "3xtf32"): 1e-5,
    ("float32", "tf32"): 5e-3,
    ("float32", "exact"): 1e-5,
    ("float16", "3xtf32"): 5e-3,
    ("float16", "tf32"): 5e-3,
    ("float16", "exact"): 5e-3,
    ("bfloat16", "3xtf32"): 3e-2,
    ("bfloat16", "tf32"): 3e-2,
    ("bfloat16", "exact"): 3e-2,
    ("float64", "3xtf32"): 1e-10,
    ("float64", "tf32"): 1e-10,
    ("float64", "exact"): 1e-10,
}
_CHECKED: dict = {}


def selfcheck(out_dtype, in_dtype, precision, device, tensor_cores: bool) -> None:
    """Raise if the CUDA kernel for this configuration disagrees with the CPU core."""
    key = (str(out_dtype), str(in_dtype), precision, str(device), tensor_cores)
    if key in _CHECKED:
        return
    g = torch.Generator().manual_seed(0)
    S, C = (1, 1) if tensor_cores else (2, 2)

    def side(n):
        return [
            Term(
                torch.randn(n, S, 19, generator=g, dtype=torch.float64),
                torch.randn(n, S, C, 23, generator=g, dtype=torch.float64),
                1.0,
                0.5,
            ),
            Term(None, torch.randn(n, S, C, 7, generator=g, dtype=torch.float64), 0.0, 1.5),
        ]

    cpu1, cpu2 = side(37), side(45)
    ref = accumulate(torch.zeros(37, 45, C, C, dtype=torch.float64), cpu1, cpu2)
    # the reference sees the inputs rounded to the GPU's input dtype
    rounded = accumulate(
        torch.zeros(37, 45, C, C, dtype=torch.float64),
        _cast(cpu1, in_dtype, "cpu", torch.float64),
        _cast(cpu2, in_dtype, "cpu", torch.float64),
    )
    got = torch.zeros(37, 45, C, C, dtype=out_dtype, device=device)
    _CHECKED[key] = "running"
    accumulate(
        got,
        _cast(cpu1, in_dtype, device, in_dtype),
        _cast(cpu2, in_dtype, device, in_dtype),
        precision=precision,
    )
    err = (got.double().cpu() - rounded).abs().max().item() / ref.abs().max().item()
    tol = _CUDA_TOL.get((str(in_dtype).replace("torch.", ""), precision), 1e-2)
    if out_dtype == torch.float32:
        tol = max(tol, 1e-6)
    if not err <= tol:
        del _CHECKED[key]
        raise RuntimeError(
            f"pathkernel CUDA self-check failed for {in_dtype} inputs, {out_dtype} output, "
            f"precision={precision!r}{' (tensor cores)' if tensor_cores else ''}: relative error "
            f"{err:.2e} > {tol:.0e}. Use CPU tensors, or precision='exact', and report this"
        )
    _CHECKED[key] = True


def _cast(terms, rounding, device, dtype):
    """Terms rounded to ``rounding``, then stored as ``dtype`` on ``device``."""
    conv = lambda t: t.to(rounding).to(device=device, dtype=dtype)
    return [Term(None if t.A is None else conv(t.A), conv(t.D), t.beta, t.scale) for t in terms]
