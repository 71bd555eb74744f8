"""Path kernels under tight memory budgets, against the same run with 2 GB (issue: tight
budgets must not fall off a cliff). Each workload's plan, estimate and measured time:

    python bench/tight_budget.py [--budgets 16MB 24MB 48MB 2GB]

- digits-mlp-full: MLP 64-256-256-10, 256 x 256 train x train, outputs="full", 24 checkpoints
- small-cnn: conv16-conv32-linear on 8x8 images, one output (a binary classifier), 1,200 query
  x 6,000 train, 3 checkpoints
- small-cnn-10: the same with 10 outputs, "trace": 200 KB of features per example and
  checkpoint, so a 16 MB budget cannot hold the smallest tiles and is refused

With ``out=`` a small budget keeps the features that later tiles need again (the column
blocks) in a scratch file beside the output rather than recomputing them (``spill``).
"""

import argparse
import tempfile
import time

import torch

import pathkernel as pk
from pathkernel.bench.workloads import DigitsCNN, mlp, perturbed_checkpoints


def workloads():
    g = torch.Generator().manual_seed(0)
    m = mlp([64, 256, 256, 10], seed=0)
    yield (
        "digits-mlp-full",
        m,
        perturbed_checkpoints(m, 24),
        torch.rand(256, 64, generator=g),
        None,
        "full",
    )
    X, Xq = torch.randn(6000, 1, 8, 8, generator=g), torch.randn(1200, 1, 8, 8, generator=g)
    for classes in (1, 10):
        torch.manual_seed(0)
        c = DigitsCNN(classes)
        yield (
            ("small-cnn" if classes == 1 else "small-cnn-10"),
            c,
            perturbed_checkpoints(c, 3),
            X,
            Xq,
            "trace",
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", nargs="*", default=["16MB", "24MB", "48MB", "2GB"])
    args = ap.parse_args()
    for name, model, ck, X, Xq, outputs in workloads():
        ref = None
        rows = []
        for b in reversed(args.budgets):  # the roomiest first: the reference time
            with tempfile.TemporaryDirectory() as d:
                out = f"{d}/k.npy"
                try:
                    p = pk.plan(model, ck, X, Xq, outputs=outputs, out=out, memory_budget=b)
                except ValueError as e:
                    rows.append(f"  {b:>6}: refused: {e}")
                    continue
                t = time.perf_counter()
                pk.path_kernel(
                    model, ck, X, Xq, outputs=outputs, out=out, memory_budget=b, progress=False
                )
                t = time.perf_counter() - t
            ref = ref or t
            rows.append(
                f"  {b:>6}: {len(p.tiles):5d} tiles of {p.row_block} x {p.col_block}, "
                f"{p.ckpt_group} ckpt(s) at a time, band {p.band}; estimated "
                f"{p.est_seconds:7.2f} s, measured {t:7.2f} s = {t / ref:.2f}x the "
                f"{args.budgets[-1]} time"
            )
        print(name)
        print("\n".join(reversed(rows)), flush=True)


if __name__ == "__main__":
    main()
