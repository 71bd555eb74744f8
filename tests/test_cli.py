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


def test_checkpoint_globs_in_natural_order_with_the_mapping_printed(tmp_path):
    """`ckpt_2` before `ckpt_10`, so each weight goes to the checkpoint it was given for."""
    import numpy as np
    import torch
    from torch import nn

    import pathkernel as pk

    (tmp_path / "factory.py").write_text(
        "import torch\nfrom torch import nn\n\n\ndef mlp():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))\n"
    )
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    steps = (1, 2, 10)
    for s in steps:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1 * torch.randn(p.shape))
        torch.save(m.state_dict(), tmp_path / f"ckpt_{s}.pt")
    X = torch.randn(20, 5)
    np.save(tmp_path / "train.npy", X.numpy())
    r = subprocess.run(
        [sys.executable, "-m", "pathkernel", "path-kernel", "--model", "factory:mlp"]
        + ["--checkpoints", "ckpt_*.pt", "--weights", "1", "2", "3", "--train", "train.npy"]
        + ["--out", "K.npy", "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    mapping = [line.strip() for line in r.stderr.splitlines() if line.startswith("  ckpt")]
    assert mapping == ["ckpt_1.pt -> 1", "ckpt_2.pt -> 2", "ckpt_10.pt -> 3"]
    ck = [(str(tmp_path / f"ckpt_{s}.pt"), w) for s, w in zip(steps, (1.0, 2.0, 3.0))]
    K = pk.path_kernel(m, ck, X, progress=False)
    assert np.array_equal(np.load(tmp_path / "K.npy"), K.numpy())
