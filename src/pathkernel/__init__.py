"""pathkernel: the kernels a model trained by gradient descent is.

Tangent kernels, path kernels and exact kernel machines for PyTorch models, computed by a
native core that accumulates factored per-layer Grams in tiles.

Layout: ``_capture`` (per-example features: rules, model plan, capture, blocks, probe),
``_drivers`` (the entry points: tangent kernel, checkpoint path kernel, recorder and kernel
machine), ``_storage`` (stores, sources, checkpoints), ``_backend`` (the one door to the
native modules), ``losses`` (per-example losses for ``targets=``), ``cli`` and ``bench``
(apart from the core; nothing in it imports them).
"""

from . import losses
from ._backend import __version__
from ._backend import info as backend_info
from ._capture.describe import Description, describe
from ._drivers.machine import KernelMachine
from ._drivers.path_kernel import path_kernel
from ._drivers.projection_error import projection_error
from ._drivers.recorder import PathRecorder, StepMismatchError
from ._drivers.sklearn import sklearn_kernels
from ._drivers.tangent import tangent_kernel
from ._drivers.tiling import PathKernelPlan, plan
from ._storage.diskio import StoreWriteError
from ._storage.lock import OutputBusyError

__all__ = [
    "Description",
    "KernelMachine",
    "describe",
    "losses",
    "PathKernelPlan",
    "PathRecorder",
    "path_kernel",
    "plan",
    "projection_error",
    "sklearn_kernels",
    "StepMismatchError",
    "StoreWriteError",
    "OutputBusyError",
    "backend_info",
    "tangent_kernel",
    "__version__",
]
