"""The data-set-scale GPU workload (bench/gpu_scale.py: ResNet-18, CIFAR variant, the path
kernel of the logit margin over checkpoints of a short training run), on the CPU at small
N and width against a float64 torch.func reference, and on a GPU against the CPU."""

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import pathkernel as pk
from reference import assert_close, reference_ntk

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_scale.py")


def _workload(n=10, width=4, T=2):
    spec = importlib.util.spec_from_file_location("gpu_scale", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from pathkernel.bench.architectures import randomize_norm_stats, resnet18_cifar

    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(0)
    model = randomize_norm_stats(resnet18_cifar(10, width)).double().eval()
    return mod, model, mod.checkpoints(model, X, Y, T), X


def test_resnet18_path_kernel_on_the_cpu_matches_float64_reference():
    mod, model, ck, X = _workload()
    K = pk.path_kernel(
        model, ck, X, outputs=mod.margin, dtype=torch.float64, memory_budget="64MB", progress=False
    )
    R = 0
    for sd, w in ck:
        m = copy.deepcopy(model)
        m.load_state_dict(sd)
        R = R + w * reference_ntk(m, X, None, mod.margin)
    assert_close(K, R, torch.float64)


def test_script_smoke_on_the_cpu():
    p = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--n",
            "24",
            "--width",
            "4",
            "--checkpoints",
            "2",
            "--device",
            "cpu",
            "--memory-budget",
            "256MB",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "extrapolated to N = 50,000" in p.stdout and "peak host RSS" in p.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_resnet18_path_kernel_on_the_gpu_matches_the_cpu():
    mod, model, ck, X = _workload(n=40, width=8, T=2)
    cpu = pk.path_kernel(
        model, ck, X, outputs=mod.margin, dtype=torch.float64, memory_budget="256MB", progress=False
    )
    m32 = copy.deepcopy(model).float().cuda()
    gpu = pk.path_kernel(
        m32,
        [({k: v.float() for k, v in sd.items()}, w) for sd, w in ck],
        X.float(),
        outputs=mod.margin,
        memory_budget="2GB",
        progress=False,
    )
    assert_close(gpu.double(), cpu, torch.float32)
