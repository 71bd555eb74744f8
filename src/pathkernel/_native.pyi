"""Type stub of the native CPU core (cpp/bindings.cpp)."""

from typing import Optional, Sequence, Tuple

import numpy as np

__version__: str

# (A [n, S, da] or None, D [n, S, C, dd], beta, scale); scale is optional (default 1)
Term = Tuple[Optional[np.ndarray], np.ndarray, float, float]

def accumulate(
    out: np.ndarray,
    side1: Sequence[Term],
    side2: Optional[Sequence[Term]] = None,
    alpha: float = 1.0,
    col_weights: Optional[np.ndarray] = None,
    tile: int = 512,
    threads: int = 0,
) -> None:
    """out[i,j,c1,c2] += alpha * w_j * sum_l scale_l sum_{s1,s2} (A1.A2 + beta_l) * (D1.D2);
    side2=None is the symmetric mode (side 2 = side 1). Raises ValueError naming the argument."""

def info() -> dict:
    """{"blas": str, "openmp": bool, "threads": int}"""

class _testing:  # submodule: internals exposed for the tests
    @staticmethod
    def tasks(
        M: int, N: int, bm: int, bn: int, symmetric: bool, panel: int
    ) -> list[Tuple[int, int, int, int]]: ...
    @staticmethod
    def cuda_tile_coords(
        t: int, rb: int, cb: int, symmetric: bool, group: int
    ) -> Tuple[int, int]: ...
    @staticmethod
    def cuda_tile_count(rb: int, cb: int, symmetric: bool) -> int: ...
    @staticmethod
    def cuda_owns(i: int, j: int, symmetric: bool) -> bool: ...
    @staticmethod
    def cuda_mirrors(i: int, j: int, symmetric: bool) -> bool: ...
    @staticmethod
    def cuda_fuse(acc: float, ag: float, dg: float, beta: float, has_a: bool) -> float: ...
