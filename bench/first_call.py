"""First against second call of ``tangent_kernel`` on ResNet-18 (CIFAR), float32, one output:
the first call pays the probe (float64 checks of the factors on a few examples).

    python bench/first_call.py [N]
"""

import sys
import time

import torch

import pathkernel as pk
from pathkernel.bench.architectures import randomize_norm_stats, resnet18_cifar

torch.manual_seed(0)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 64
model = randomize_norm_stats(resnet18_cifar(10)).eval()
x = torch.randn(N, 3, 32, 32)
times = []
for _ in range(2):
    t = time.perf_counter()
    pk.tangent_kernel(model, x, outputs=0)
    times.append(time.perf_counter() - t)
print(f"N={N}: first {times[0]:.2f} s, second {times[1]:.2f} s, ratio {times[0] / times[1]:.2f}")
