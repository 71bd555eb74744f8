"""scikit-learn interoperability: path kernels in the orientation precomputed kernels expect."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from .._checks import split_targets
from .path_kernel import path_kernel


def sklearn_kernels(
    model, checkpoints, X_train, X_query=None, **kwargs
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Path kernels for ``sklearn`` estimators with ``kernel="precomputed"``.

    Returns ``(K_fit, K_predict)``: ``K_fit [N, N]`` (train x train) for ``fit`` and
    ``K_predict [M, N]`` (query x train) for ``predict``/``decision_function``, or None when
    ``X_query`` is None. Keyword arguments go to ``path_kernel`` (``outputs`` must give a
    scalar kernel: ``"trace"``, an int or a callable; ``targets``: ``Y_train``, or
    ``(Y_train, Y_query)`` with ``X_query``, for kernels of per-example losses; ``group``: a
    collective call whose rank 0 gets the arrays and the other ranks ``(None, None)``).

    Example::

        K_fit, K_test = pathkernel.sklearn_kernels(model, ckpts, X_train, X_test)
        svm = sklearn.svm.SVC(kernel="precomputed").fit(K_fit, y_train)
        y_pred = svm.predict(K_test)
    """
    if kwargs.get("outputs") == "full":
        raise ValueError(
            "outputs: sklearn's precomputed kernels are scalar; use 'trace', an int or a callable"
        )
    if "out" in kwargs:
        raise ValueError(
            "out: sklearn_kernels returns arrays; call path_kernel(..., out=) once per "
            "orientation to write them to disk"
        )
    kwargs.setdefault("progress", False)
    targets = kwargs.pop("targets", None)
    y_train, _ = split_targets(targets, X_query is not None, ("X_train", "X_query"))
    K_fit = _numpy(path_kernel(model, checkpoints, X_train, None, targets=y_train, **kwargs))
    K_pred = None
    if X_query is not None:
        K_pred = _numpy(
            path_kernel(model, checkpoints, X_train, X_query, targets=targets, **kwargs)
        )
    return K_fit, K_pred


def _numpy(K):
    return None if K is None else K.double().numpy()
