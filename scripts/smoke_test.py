"""Smoke test of an installed pathkernel (a wheel, in a fresh environment): the native core
loads with its BLAS, and a tangent kernel equals the dense (torch.func) one."""

import torch
from torch import nn

import pathkernel as pk

info = pk.backend_info()
assert "OpenBLAS" in info["blas"] and info["version"] == pk.__version__, info
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
x = torch.randn(20, 5, dtype=torch.float64)
K = pk.tangent_kernel(model, x, outputs="full")
ref = pk.tangent_kernel(model, x, outputs="full", implementation="dense")
assert (K - ref).abs().max() <= 1e-10 * ref.abs().max()
print(f"smoke test passed: pathkernel {pk.__version__} from {pk.__file__}, {info['blas']}")
