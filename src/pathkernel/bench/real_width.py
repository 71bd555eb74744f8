"""Real-width rows of ``pathkernel bench``: ResNet-18 (CIFAR), a GPT-2-width decoder and a ViT
for 32x32 images at N = 64-96, and the ResNet-18 path kernel at N = 1,024 under a budget
below its features' size, so that the growth with N shows.

One scalar output (a logit margin, ``f_0 - f_1``), float32, ``x`` against itself. The peer
is the recipe a user writes when the Jacobian fits: ``vmap(grad)`` per-example gradients in
chunks of 32, flattened, one GEMM. Every row gives its fraction of the FLOP limit
(``workloads.flop_limit``).
"""

from __future__ import annotations

import tempfile
import time
from typing import List

import torch

from .architectures import GPT2Style, ViT, _images, randomize_norm_stats, resnet18_cifar
from .workloads import (
    flop_limit,
    gemm_rate,
    paired_best,
    perturbed_checkpoints,
    torch_func_grad_ntk,
)


def margin(o: torch.Tensor) -> torch.Tensor:
    return o[:, 0] - o[:, 1]


def _cases(quick: bool):
    h = 2 if quick else 1
    g = torch.Generator().manual_seed(1)
    return [
        (
            "resnet18",
            64 // h,
            "ResNet-18 (CIFAR, 11.2M params), 3x32x32",
            lambda n: (randomize_norm_stats(resnet18_cifar(10)), _images(n, 3, 32)),
        ),
        (
            "gpt2-width",
            64 // h,
            "GPT-2-width decoder (d 384, 4 blocks, 64 tokens, vocab 50257, tied head)",
            lambda n: (
                GPT2Style(50257, 384, 6, 4, 64),
                torch.randint(0, 50257, (n, 64), generator=g),
            ),
        ),
        (
            "vit-32",
            96 // h,
            "ViT (32x32 images, 4x4 patches, d 192, 3 heads, 6 blocks)",
            lambda n: (ViT(32, 4, 192, 3, 6, 10), _images(n, 3, 32)),
        ),
    ]


def real_width_rows(quick: bool, row) -> List:
    from .._drivers.tangent import tangent_kernel

    rate = gemm_rate(1024 if quick else 2048)
    rows = []
    per_pair_64 = None
    for name, n, what, make in _cases(quick):
        torch.manual_seed(0)
        model, x = make(n)
        model = model.eval()
        tangent_kernel(model, x, outputs=margin)  # warm: probe, caches
        ours, peer = paired_best(
            lambda: tangent_kernel(model, x, outputs=margin),
            lambda: torch_func_grad_ntk(model, x, margin),
            1,
        )
        limit = flop_limit(model, x, margin, rate)
        if name == "resnet18":
            per_pair_64 = ours / (n * (n + 1) / 2)
        rows.append(
            row(
                name,
                f"{what}, N={n}",
                ours,
                {"torch.func vmap(grad)": peer},
                f"{limit / ours:.0%} of the FLOP limit ({limit:.2f} s at sgemm "
                f"{rate / 1e9:.0f} GFLOP/s)",
            )
        )
    rows.append(_resnet_path_kernel(quick, rate, per_pair_64, row))
    return rows


def _resnet_path_kernel(quick: bool, rate: float, per_pair_64, row):
    """ResNet-18 train x train path kernel, 2 checkpoints, a 2 GB budget (its features at
    this N need several times that)."""
    from .._drivers.path_kernel import path_kernel
    from .._drivers.tiling import plan

    n, T = (256 if quick else 1024), 2
    torch.manual_seed(0)
    model = randomize_norm_stats(resnet18_cifar(10)).eval()
    x = _images(n, 3, 32)
    ckpts = perturbed_checkpoints(model, T)
    with tempfile.TemporaryDirectory() as d:
        # the plan of the run itself (with out=, features may be kept in a scratch file)
        p = plan(model, ckpts, x, outputs=margin, out=f"{d}/k.npy", memory_budget="2GB")
        t = time.perf_counter()
        path_kernel(
            model, ckpts, x, outputs=margin, out=f"{d}/k.npy", memory_budget="2GB", progress=False
        )
        t = time.perf_counter() - t
    limit = T * flop_limit(model, x, margin, rate)
    pairs = T * n * (n + 1) / 2
    growth = "" if per_pair_64 is None else f"; per pair {t / pairs / per_pair_64:.2f}x N=64's"
    return row(
        "resnet18-path",
        f"ResNet-18 path kernel, N={n}, {T} checkpoints, 2 GB budget",
        t,
        {"FLOP limit": limit},
        f"{limit / t:.0%} of the FLOP limit{growth}; plan estimated "
        f"{p.est_seconds:.1f} s ({t / p.est_seconds:.2f}x off)",
    )
