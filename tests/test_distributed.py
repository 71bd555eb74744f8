"""torch.distributed (gloo, CPU): collective path kernels are byte-identical to one process
whatever the world size, survive a killed rank, and refuse ranks that do not join or that
were handed other arguments. Each job is a torchrun subprocess (tests/distributed_job.py)."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)
JOB = os.path.join(os.path.dirname(__file__), "distributed_job.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(scenario, d, ranks=None, restarts=0, env=None, check=True, timeout=180):
    """torchrun with ``ranks`` processes (None: one plain process), one thread each."""
    os.makedirs(d, exist_ok=True)
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if ranks is None:
        cmd = [sys.executable, JOB, scenario, str(d)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={ranks}",
            f"--max-restarts={restarts}",
            "--master-addr=127.0.0.1",
            f"--master-port={_port()}",
            JOB,
            scenario,
            str(d),
        ]
    p = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def same_bytes(a, b):
    return open(a, "rb").read() == open(b, "rb").read()


@pytest.mark.parametrize(
    "scenario",
    [
        "file",
        "file-query",
        "file-full",
        "ram",
        "ram-query",
        "file-spill",
        "file-query-spill",
        "file-spill-passes",
        "file-query-spill-passes",
        "file-project",
    ],
)
def test_two_ranks_byte_identical_to_one_process(scenario, tmp_path):
    run(scenario, tmp_path / "one")
    run(scenario, tmp_path / "two", ranks=2)
    assert same_bytes(tmp_path / "one" / "k.npy", tmp_path / "two" / "k.npy")
    if scenario.startswith("file"):  # both ranks wrote tiles and journalled them
        assert os.path.getsize(tmp_path / "two" / "k.npy.journal.1") > 0
    if "spill" in scenario:
        _check_shared_extraction(tmp_path, query="query" in scenario)


def _check_shared_extraction(d, query: bool):
    """The ranks kept features in scratch files (now gone) and shared them: every example's
    features were extracted once per checkpoint across the ranks, split about evenly, and
    the plan said what each rank does."""
    N, M, T = 203, 57 if query else 0, 3  # tests/distributed_job.py's problem
    for run_dir, ranks in (("one", [0]), ("two", [0, 1])):
        for r in ranks:
            assert int(open(d / run_dir / f"spill{r}.txt").read()) > 0
        assert not [f for f in os.listdir(d / run_dir) if "features" in f]
    one = int(open(d / "one" / "extracted0.txt").read())
    two = [int(open(d / "two" / f"extracted{r}.txt").read()) for r in (0, 1)]
    assert sum(two) == (M + N) * T <= one, (two, one)
    assert max(two) < 0.7 * sum(two), two
    plan = open(d / "two" / "plan0.txt").read()
    assert "on 2 ranks" in plan and "rank 1: " in plan and "extracted once across" in plan
    assert "on 2 ranks" not in open(d / "one" / "plan0.txt").read()


def test_killed_rank_restarted_by_torchrun_resumes(tmp_path):
    run("file", tmp_path / "one")
    run("file-kill", tmp_path / "two", ranks=2, restarts=1)
    assert same_bytes(tmp_path / "one" / "k.npy", tmp_path / "two" / "k.npy")


@pytest.mark.parametrize(
    "world,kind", [(None, "file"), (3, "file"), (3, "file-spill"), (3, "file-spill-passes")]
)
def test_crash_finished_with_another_world_size(world, kind, tmp_path):
    run(kind, tmp_path / "one")
    crashed = run(kind + "-crash", tmp_path / "two", ranks=2, check=False)
    assert crashed.returncode != 0
    d = tmp_path / "two"
    assert os.path.exists(d / "k.npy.journal.1")
    run(kind, d, ranks=world)
    assert same_bytes(tmp_path / "one" / "k.npy", d / "k.npy")
    assert not [f for f in os.listdir(d) if "features" in f]


def test_a_rank_that_does_not_join_gives_an_error_not_a_hang(tmp_path):
    run("rank0-only", tmp_path, ranks=2, env={"PATHKERNEL_JOIN_TIMEOUT": "4"}, timeout=90)
    msg = (tmp_path / "error.txt").read_text()
    assert "rank(s) [1] of the group did not join the call within 4 s" in msg


def test_ranks_with_other_arguments_are_refused(tmp_path):
    run("differ", tmp_path, ranks=2)
    for r in (0, 1):
        msg = (tmp_path / f"error{r}.txt").read_text()
        assert msg.startswith("train: differs between the ranks (ranks [0] vs ranks [1])"), msg


def test_tangent_kernel_on_two_ranks(tmp_path):
    """Split by rows over the ranks (the path-kernel engine, float64 tiles): the single
    process's kernel up to float32 rounding."""
    from reference import TOL

    run("tangent", tmp_path / "one")
    run("tangent", tmp_path / "two", ranks=2)
    a, b = np.load(tmp_path / "one" / "k.npy"), np.load(tmp_path / "two" / "k.npy")
    assert a.shape == (40, 31, 3, 3)
    assert np.abs(a - b).max() <= TOL["gram", torch.float32] * np.abs(a).max()


@pytest.mark.parametrize("scenario", ["file-targets", "file-query-targets", "tangent-targets"])
def test_loss_gradient_kernels_on_two_ranks(scenario, tmp_path):
    """Kernels of per-example cross-entropy gradients: two ranks byte-identical to one
    process, and both equal to the float64 per-example autograd reference."""
    sys.path.insert(0, os.path.dirname(__file__))
    import pathkernel as pk
    from distributed_job import labels, problem, targets_problem
    from reference import assert_close
    from test_targets import loss_grads

    run(scenario, tmp_path / "one")
    run(scenario, tmp_path / "two", ranks=2)
    assert same_bytes(tmp_path / "one" / "k.npy", tmp_path / "two" / "k.npy")
    model, ck, X, Xq = targets_problem(*problem("query" not in scenario))
    Y = labels(X.shape[0], 0)
    ce = pk.losses.cross_entropy
    if scenario == "tangent-targets":
        G1, G2 = loss_grads(model, X[:40], Y[:40], ce), loss_grads(model, X[40:71], Y[40:71], ce)
        ref = G1 @ G2.T
    else:
        rows, yr = (X, Y) if Xq is None else (Xq, labels(Xq.shape[0], 1))
        ref = 0
        for w, lr in ck:
            model.load_state_dict(w)
            ref = ref + lr * loss_grads(model, rows, yr, ce) @ loss_grads(model, X, Y, ce).T
    assert_close(np.load(tmp_path / "two" / "k.npy"), ref, torch.float64)


def test_command_line_under_torchrun(tmp_path):
    """`torchrun -m pathkernel path-kernel` with a model factory, saved checkpoints and .npy
    inputs equals the same command in one process; `pathkernel describe` reads the factory."""
    (tmp_path / "factory.py").write_text(
        "import torch\nfrom torch import nn\n\n\ndef mlp():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        from factory import mlp
    finally:
        sys.path.pop(0)
    g = torch.Generator().manual_seed(0)
    m = mlp()
    for t in range(3):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        torch.save(m.state_dict(), tmp_path / f"ck{t}.pt")
    np.save(tmp_path / "train.npy", torch.randn(150, 5, generator=g).numpy())
    args = [
        "path-kernel",
        "--model",
        "factory:mlp",
        "--checkpoints",
        "ck*.pt",
        "--weights",
        "0.1",
        "--train",
        "train.npy",
        "--memory-budget",
        "100000",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "pathkernel", *args, "--out", "one.npy"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0 and one.stdout.strip() == "one.npy", one.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            "--master-addr=127.0.0.1",
            f"--master-port={_port()}",
            "-m",
            "pathkernel",
            *args,
            "--out",
            "two.npy",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0 and two.stdout.strip() == "two.npy", two.stderr[-2000:]
    assert same_bytes(tmp_path / "one.npy", tmp_path / "two.npy")
    d = subprocess.run(
        [
            sys.executable,
            "-m",
            "pathkernel",
            "describe",
            "--model",
            "factory:mlp",
            "--input",
            "train.npy",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert d.returncode == 0 and "0.weight" in d.stdout and "factored" in d.stdout, d.stderr


@pytest.mark.parametrize("scenario", ["ddp-sgd", "ddp-adamw", "ddp-sgd-nosync"])
def test_ddp_recording_equals_one_process(scenario, tmp_path):
    """Two ranks, each recording its shard of every global batch (the last one uneven), give
    rank 0 the kernel machine of a single-process recording that weights the examples as DDP
    does: contributions to 1e-10 relative in float64."""
    run(scenario, tmp_path / "one")
    run(scenario, tmp_path / "two", ranks=2)
    a, b = np.load(tmp_path / "one" / "km.npz"), np.load(tmp_path / "two" / "km.npz")
    for key in ("contributions", "bias", "predict", "path_kernel", "fT"):
        scale = np.abs(a[key]).max()
        assert np.abs(a[key] - b[key]).max() <= 1e-10 * scale, key
    assert np.abs(b["predict"] - b["fT"]).max() <= 1e-6 * np.abs(b["fT"] - a["bias"]).max()


def test_ddp_compression_hook_refused(tmp_path):
    run("ddp-sgd-powersgd", tmp_path, ranks=2)
    msg = (tmp_path / "error0.txt").read_text()
    assert msg.startswith("model: DistributedDataParallel with the communication hook"), msg
