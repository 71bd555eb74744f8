"""The demo in a reduced size, the CLI, and the sklearn helpers."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import pathkernel as pk
from models import mlp

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def test_demo_small(tmp_path):
    from pathkernel.cli.demo import format_report, run_demo

    s = run_demo(out=str(tmp_path), steps=12, seed=1, quadrature=4, checkpoint_every=4,
                 progress=False)
    for f in s["files"]:
        assert os.path.getsize(f) > 1000, f
    assert s["km_relative_error"] < 1e-8
    assert s["km_agreement"] == 1.0
    assert 0.0 <= s["path_kernel_svm_accuracy"] <= 1.0
    text = format_report(s)
    assert "kernel machine vs network" in text and "against:" in text


def test_cli_info_and_bad_args():
    out = subprocess.run([sys.executable, "-m", "pathkernel", "info"], capture_output=True, text=True,
                         check=True).stdout
    assert '"blas"' in out
    bad = subprocess.run([sys.executable, "-m", "pathkernel", "demo", "--steps", "0"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--steps must be positive" in bad.stderr


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


def test_bench_table_smoke():
    """`pathkernel bench` prints a ratio row per peer (one quick workload)."""
    from pathkernel.bench.suite import run_bench
    text = run_bench(quick=True, only=["digits-cnn"])
    assert "ratio" in text and "digits-cnn" in text and "torch.func" in text
    with pytest.raises(SystemExit, match="unknown workloads"):
        run_bench(quick=True, only=["nope"])
