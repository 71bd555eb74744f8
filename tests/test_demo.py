"""The demo in a reduced size: the kernel machine reproduces the network, plots are written."""

import os

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def test_demo_small(tmp_path):
    from pathkernel.cli.demo import format_report, run_demo

    s = run_demo(
        out=str(tmp_path), steps=12, seed=1, quadrature=4, checkpoint_every=4, progress=False
    )
    for f in s["files"]:
        assert os.path.getsize(f) > 1000, f
    assert s["km_relative_error"] < 1e-8
    assert s["km_agreement"] == 1.0
    assert 0.0 <= s["path_kernel_svm_accuracy"] <= 1.0
    text = format_report(s)
    assert "kernel machine vs network" in text and "against:" in text
