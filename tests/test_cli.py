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


FACTORY = (
    "import torch\nfrom torch import nn\n\n\ndef mlp():\n    torch.manual_seed(0)\n"
    "    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))\n"
)


def _cli(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "pathkernel", *args], cwd=tmp_path, capture_output=True, text=True
    )


@pytest.fixture
def cli_files(tmp_path):
    import numpy as np
    import torch

    (tmp_path / "factory.py").write_text(FACTORY)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((12, 5), "float32"))
    sys.path.insert(0, str(tmp_path))
    try:
        from factory import mlp
    finally:
        sys.path.pop(0)
        sys.modules.pop("factory", None)
    sd = mlp().state_dict()
    torch.save(sd, tmp_path / "plain.pt")
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "ddp.pt")  # DDP's names
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    return tmp_path


PK = ["path-kernel", "--model", "factory:mlp", "--train", "x.npy", "--no-progress"]


@pytest.mark.parametrize(
    "args, says",
    [
        (["describe", "--model", "factory:mlp", "--input", "nope.npy"], "--input: no file"),
        (["describe", "--model", "factory:mlp", "--input", "factory.py"], "--input: "),
        (
            ["describe", "--model", "factory:mlp", "--input", "x.npy", "--outputs", "42"],
            "--outputs: output index 42 is out of range",
        ),
        (
            PK + ["--checkpoints", "plain.pt", "--out", "k.npy", "--memory-budget", "lots"],
            "--memory-budget: expected",
        ),
        (PK + ["--checkpoints", "junk.pt", "--out", "k.npy"], "--checkpoints[0] ('junk.pt')"),
        (
            ["describe", "--model", "factory:mlp", "--input", "x.npy", "--device", "cuda"],
            "--device: cuda",
        ),
        (["describe", "--model", "factory:nope", "--input", "x.npy"], "--model: cannot load"),
        (PK + ["--checkpoints", "plain.pt", "--out", "k.npy", "--project", "0"], "--project:"),
    ],
)
def test_user_errors_are_one_line_with_exit_status_2(cli_files, args, says):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a CUDA device is there")
    r = _cli(cli_files, *args)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(err) == 1 and says in err[0], r.stderr
    assert "Traceback" not in r.stderr
    r = _cli(cli_files, *args, "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_ddp_checkpoints_and_projection_on_the_command_line(cli_files):
    """A checkpoint saved from a DDP-wrapped model (`module.` names) gives the plain one's
    kernel; --project K --seed S gives path_kernel(project=K, seed=S)."""
    import numpy as np
    import torch

    import pathkernel as pk

    for ck in ("plain", "ddp"):
        r = _cli(cli_files, *PK, "--checkpoints", f"{ck}.pt", "--out", f"{ck}.npy")
        assert r.returncode == 0, r.stderr[-2000:]
    assert np.array_equal(np.load(cli_files / "plain.npy"), np.load(cli_files / "ddp.npy"))
    r = _cli(cli_files, *PK, "--checkpoints", "ddp.pt", "--out", "p.npy", "--project", "9")
    assert r.returncode == 0, r.stderr[-2000:]
    sd = torch.load(cli_files / "plain.pt")
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    X = torch.from_numpy(np.load(cli_files / "x.npy"))
    K = pk.path_kernel(model, [(sd, 1.0)], X, project=9, seed=0, progress=False)
    assert np.array_equal(np.load(cli_files / "p.npy"), K.numpy())
    d = _cli(cli_files, "describe", "--model", "factory:mlp", "--input", "x.npy", "--project", "9")
    assert d.returncode == 0 and "projected to k = 9" in d.stdout


KEYWORDS = """
import torch
from torch import nn


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.lin = nn.Embedding(9, 4), nn.Linear(4, 2)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask[..., None]
        return {"logits": self.lin(h.sum(1))}
"""


def test_keyword_inputs_on_the_command_line(tmp_path):
    """--train NAME=FILE.npy ... is path_kernel(x={NAME: array, ...}): keyword inputs."""
    import numpy as np
    import torch

    import pathkernel as pk

    (tmp_path / "kw.py").write_text(KEYWORDS)
    rng = np.random.default_rng(0)
    ids, mask = rng.integers(0, 9, (10, 4)), (rng.random((10, 4)) > 0.3).astype(np.float32)
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "mask.npy", mask)
    sys.path.insert(0, str(tmp_path))
    try:
        from kw import Masked
    finally:
        sys.path.pop(0)
        sys.modules.pop("kw", None)
    m = Masked()
    torch.save(m.state_dict(), tmp_path / "m.pt")
    inputs = ["--train", "attention_mask=mask.npy", "input_ids=ids.npy"]
    args = ["path-kernel", "--model", "kw:Masked", "--checkpoints", "m.pt", "--out", "k.npy"]
    r = _cli(tmp_path, *args, *inputs, "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    x = {"attention_mask": torch.from_numpy(mask), "input_ids": torch.from_numpy(ids)}
    K = pk.path_kernel(m, [(m.state_dict(), 1.0)], x, progress=False)
    assert np.array_equal(np.load(tmp_path / "k.npy"), K.numpy())
    d = _cli(tmp_path, "describe", "--model", "kw:Masked", "--input", *inputs[1:])
    assert d.returncode == 0 and "emb.weight" in d.stdout, d.stderr[-2000:]
    r = _cli(tmp_path, *args, "--train", "input_ids=ids.npy", "mask.npy")
    assert r.returncode == 2 and "--train: give every input as NAME=FILE.npy" in r.stderr
