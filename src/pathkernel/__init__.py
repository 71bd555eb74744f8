"""pathkernel: the kernels a model trained by gradient descent is.

Tangent kernels, path kernels and exact kernel machines for PyTorch models, computed by a
native core that accumulates factored per-layer Grams in tiles.
"""
__version__ = "0.1.0"

from ._backend import info as backend_info
from ._interop import sklearn_kernels
from ._machine import KernelMachine
from ._pathkernel import PathKernelPlan, path_kernel, plan
from ._recorder import PathRecorder, StepMismatchError
from ._tangent import tangent_kernel

__all__ = ["KernelMachine", "PathKernelPlan", "PathRecorder", "path_kernel", "plan",
           "sklearn_kernels", "StepMismatchError", "backend_info", "tangent_kernel",
           "__version__"]
