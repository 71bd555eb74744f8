"""Peak memory of a tangent kernel with a 500-token vocabulary (issue: the dense path kept a
whole per-example Jacobian and was killed at 24 GiB at N = 64):

    python bench/dense_memory.py [--n 64] [--vocab 500]

The GPT-2-style decoder of bench/architectures (d = 32, 2 blocks, 12 tokens, tied head),
float32, outputs="trace", x against itself; each implementation in a fresh process, which
prints its time and peak RSS. "dense" forces every parameter through the dense path (the
per-example Jacobians, bounded by batch size and channel chunks); "auto" is the default.
"""

import argparse
import subprocess
import sys

CHILD = """
import resource, sys, time, torch
import pathkernel as pk
from pathkernel.bench.architectures import GPT2Style
n, vocab, impl = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
model = GPT2Style(vocab=vocab, d=32, heads=4, layers=2, seq=12)
x = torch.randint(0, vocab, (n, 12), generator=torch.Generator().manual_seed(1))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
t = time.perf_counter()
K = pk.tangent_kernel(model, x, outputs="trace", implementation=impl)
t = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(f"{impl:>5}: N = {n}, vocab {vocab}: {t:6.2f} s, peak RSS {peak:.2f} GiB "
      f"({base:.2f} GiB before the call); trace of K = {K.trace().item():.6g}")
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=500)
    args = ap.parse_args()
    for impl in ("auto", "dense"):
        subprocess.run(
            [sys.executable, "-c", CHILD, str(args.n), str(args.vocab), impl], check=True
        )


if __name__ == "__main__":
    main()
