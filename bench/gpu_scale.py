"""The ResNet-18 (CIFAR variant) train x train path kernel of a CIFAR-sized set on one device:

    python bench/gpu_scale.py --n 10000                     # on a GPU (cuda:0), 10 checkpoints
    python bench/gpu_scale.py --n 1000 --width 16 --checkpoints 2 --device cpu   # CPU smoke

Synthetic CIFAR-shaped data (no download); the checkpoints come from a short real training run
(SGD on that data). The kernel is the path kernel of one scalar output (the logit margin of
class 0 over class 1: per-example gradients of 11M parameters), written by ``path_kernel`` into
a host ``.npy``. Prints the time, tiles, the Gram work's TFLOP/s, peak device memory, peak host
RSS, and the time extrapolated to N = 50,000 (the work grows as N^2) from the measured rate.
"""

import argparse
import os
import resource
import tempfile
import time

import torch
from torch import nn

import pathkernel as pk
from pathkernel.bench.architectures import randomize_norm_stats, resnet18_cifar


def checkpoints(model, X, Y, T, steps_between=2, lr=0.05):
    """T checkpoints of a short SGD run on (X, Y), each standing for ``steps_between`` steps."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(3)
    out = []
    model.eval()  # BatchNorm as the kernel sees it: running statistics
    for _ in range(T):
        out.append(
            ({k: v.detach().clone() for k, v in model.state_dict().items()}, lr * steps_between)
        )
        for _ in range(steps_between):
            idx = torch.randint(0, X.shape[0], (64,), generator=g)
            opt.zero_grad()
            loss(
                model(X[idx].to(next(model.parameters()).device)),
                Y[idx].to(next(model.parameters()).device),
            ).backward()
            opt.step()
    return out


def margin(out):
    return out[:, 0] - out[:, 1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--checkpoints", type=int, default=10)
    ap.add_argument("--width", type=int, default=64, help="64: ResNet-18 (11M parameters)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--memory-budget",
        default=None,
        help="default: 80%% of the GPU's free memory, or 8GB on the CPU",
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(args.n, 3, 32, 32, generator=g).to(dtype)
    Y = torch.randint(0, 10, (args.n,), generator=g)
    torch.manual_seed(0)
    model = randomize_norm_stats(resnet18_cifar(10, args.width)).to(dev, dtype).eval()
    ck = checkpoints(model, X, Y, args.checkpoints)
    budget = args.memory_budget
    if budget is None:
        budget = int(0.8 * torch.cuda.mem_get_info(dev)[0]) if dev.type == "cuda" else "8GB"
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as d:
        out = args.out or os.path.join(d, "k.npy")
        plan = pk.plan(model, ck, X, outputs=margin, out=out, memory_budget=budget, dtype=dtype)
        print(
            f"ResNet-18 (CIFAR, width {args.width}, {params / 1e6:.1f}M parameters) on "
            f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}, N = "
            f"{args.n}, {args.checkpoints} checkpoints, {args.dtype}"
        )
        print(plan)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t = time.perf_counter()
        pk.path_kernel(
            model,
            ck,
            X,
            outputs=margin,
            out=out,
            memory_budget=budget,
            dtype=dtype,
            progress=True,
            resume=False,
        )
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    gpu = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
    print(
        f"time {t:.1f} s, {len(plan.tiles)} tiles, Gram work {plan.gram_flops / 1e12:.4f} TFLOP "
        f"at {plan.gram_flops / t / 1e12:.4f} TFLOP/s (whole run), peak device memory "
        f"{gpu:.1f} GiB, peak host RSS {rss:.2f} GiB"
    )
    print(f"extrapolated to N = 50,000: {t * (50000 / args.n) ** 2 / 3600:.2f} h")


if __name__ == "__main__":
    main()
