"""scikit-learn interoperability: precomputed kernels in the orientation sklearn expects."""

import numpy as np
import pytest
import torch

import pathkernel as pk
from models import mlp

pytest.importorskip("sklearn")


def test_sklearn_orientation_and_svc_round_trip():
    from sklearn.svm import SVC

    torch.manual_seed(0)
    model = mlp(d_in=4, hidden=(8,), d_out=2)
    X = torch.randn(30, 4, dtype=torch.float64)
    y = (X[:, 0] > 0).long().numpy()
    Xq = torch.randn(7, 4, dtype=torch.float64)
    ck = [(model.state_dict(), 1.0)]
    K_fit, K_pred = pk.sklearn_kernels(model, ck, X, Xq, dtype=torch.float64)
    assert K_fit.shape == (30, 30) and K_pred.shape == (7, 30)
    assert np.allclose(K_fit, K_fit.T)
    # one checkpoint of weight 1 is the tangent kernel: check orientation against it
    assert np.allclose(K_pred, pk.tangent_kernel(model, Xq, X).numpy(), rtol=1e-12, atol=0)
    svm = SVC(kernel="precomputed").fit(K_fit, y)
    assert svm.predict(K_pred).shape == (7,)
    assert svm.score(K_fit, y) > 0.8
    with pytest.raises(ValueError, match="outputs: sklearn's precomputed kernels are scalar"):
        pk.sklearn_kernels(model, ck, X, outputs="full")
