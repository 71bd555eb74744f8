"""The command line: info, argument errors, the bench table."""

import subprocess
import sys

import pytest


def test_cli_info_and_bad_args():
    out = subprocess.run(
        [sys.executable, "-m", "pathkernel", "info"], capture_output=True, text=True, check=True
    ).stdout
    assert '"blas"' in out
    bad = subprocess.run(
        [sys.executable, "-m", "pathkernel", "demo", "--steps", "0"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "--steps must be positive" in bad.stderr


def test_bench_table_smoke():
    """`pathkernel bench` prints a ratio row per peer (one quick workload)."""
    from pathkernel.bench.suite import run_bench

    text = run_bench(quick=True, only=["digits-cnn"])
    assert "ratio" in text and "digits-cnn" in text and "torch.func" in text
    with pytest.raises(SystemExit, match="unknown workloads"):
        run_bench(quick=True, only=["nope"])
