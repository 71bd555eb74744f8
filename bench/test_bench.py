"""pytest-benchmark suite over the reference workloads (run with ``pytest bench``).

Each workload is timed for pathkernel and its peers in the same session; compare the rows
of one run (``--benchmark-group-by=group``), not absolute seconds across machines.
The ratio table with the GEMM roofline comes from ``pathkernel bench``.
"""

import pytest
import torch
from torch import nn

import pathkernel as pk
from pathkernel.bench.workloads import (
    DigitsCNN,
    checkpoint_path,
    mlp,
    torch_factored_ntk,
    torch_func_ntk,
    wide_mlp,
)


@pytest.fixture(scope="module")
def wide():
    return wide_mlp(2048)


@pytest.mark.benchmark(group="wide-mlp NTK N=2048")
def test_wide_mlp_pathkernel(benchmark, wide):
    model, x = wide
    benchmark.pedantic(pk.tangent_kernel, args=(model, x), rounds=3, warmup_rounds=1)


@pytest.mark.benchmark(group="wide-mlp NTK N=2048")
def test_wide_mlp_torch_factored(benchmark, wide):
    model, x = wide
    benchmark.pedantic(torch_factored_ntk, args=(model, x), rounds=3, warmup_rounds=1)


@pytest.mark.benchmark(group="wide-mlp NTK N=256")
def test_wide_mlp_small_pathkernel(benchmark):
    model, x = wide_mlp(256)
    benchmark.pedantic(pk.tangent_kernel, args=(model, x), rounds=3, warmup_rounds=1)


@pytest.mark.benchmark(group="wide-mlp NTK N=256")
def test_wide_mlp_small_torch_func(benchmark):
    model, x = wide_mlp(256)
    benchmark.pedantic(torch_func_ntk, args=(model, x), rounds=1)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return DigitsCNN(), torch.randn(256, 1, 8, 8)


@pytest.mark.benchmark(group="digits-cnn NTK N=256 full")
def test_digits_cnn_pathkernel(benchmark, cnn):
    model, x = cnn
    benchmark.pedantic(
        pk.tangent_kernel, args=(model, x), kwargs=dict(outputs="full"), rounds=2, warmup_rounds=1
    )


@pytest.mark.benchmark(group="checkpoint path 20000x200")
def test_checkpoint_path_pathkernel(benchmark):
    model, ck, X, Xq = checkpoint_path(20000, 200, 3)
    benchmark.pedantic(
        pk.path_kernel,
        args=(model, ck, X, Xq),
        kwargs=dict(progress=False),
        rounds=2,
        warmup_rounds=1,
    )


@pytest.mark.benchmark(group="digits-mlp recorded step")
def test_digits_mlp_recorded_steps(benchmark):
    g = torch.Generator().manual_seed(0)
    X, Y = torch.rand(1437, 64, generator=g), torch.randint(0, 10, (1437,), generator=g)
    Xq = torch.rand(360, 64, generator=g)
    loss_fn = nn.CrossEntropyLoss()
    idxs = [torch.randperm(1437, generator=g)[:64] for _ in range(5)]

    def run():
        model = mlp([64, 256, 256, 10], seed=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rec = pk.PathRecorder(model, opt, loss_fn, (X, Y), Xq, quadrature=4)
        for idx in idxs:
            with rec.step(idx):
                opt.zero_grad()
                loss_fn(model(X[idx]), Y[idx]).backward()
                opt.step()

    benchmark.pedantic(run, rounds=2)


@pytest.fixture(scope="module")
def tiny():
    from pathkernel.bench.workloads import tiny_transformer

    return tiny_transformer(512)


@pytest.mark.benchmark(group="tiny-transformer NTK N=512")
def test_tiny_transformer_pathkernel(benchmark, tiny):
    model, x = tiny
    benchmark.pedantic(pk.tangent_kernel, args=(model, x), rounds=3, warmup_rounds=1)


@pytest.mark.benchmark(group="tiny-transformer NTK N=512")
def test_tiny_transformer_torch_func(benchmark, tiny):
    model, x = tiny
    benchmark.pedantic(torch_func_ntk, args=(model, x), rounds=2, warmup_rounds=1)


@pytest.mark.benchmark(group="large-n (reduced: 20000 x 500, 3 checkpoints, 2 GB)")
def test_large_n_reduced(benchmark, tmp_path):
    model, ck, X, Xq = checkpoint_path(20000, 500, 3)
    out = str(tmp_path / "k.npy")
    benchmark.pedantic(
        pk.path_kernel,
        args=(model, ck, X, Xq),
        kwargs=dict(out=out, memory_budget="2GB", resume=False, progress=False),
        rounds=2,
    )
