"""Scaling of a path kernel over ranks on one machine (torch.distributed, gloo):

    python bench/scaling.py [--n 6000] [--checkpoints 4]

times the same train x train ``path_kernel`` (MLP 64-256-256-10, trace, into a .npy) as
1 rank x 1 thread, 2 ranks x 1 thread (torchrun) and 1 rank x 2 threads, each in a fresh
process, checks the files are byte-identical where the threads per process match, and prints
the speed-up and parallel efficiency.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

JOB = """
import sys, time, torch, pathkernel as pk
from pathkernel.bench.workloads import mlp, perturbed_checkpoints
n, T, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if "RANK" in __import__("os").environ:
    from pathkernel.cli.distributed import init_process_group
    init_process_group("gloo")
model = mlp([64, 256, 256, 10], seed=0)
X = torch.randn(n, 64, generator=torch.Generator().manual_seed(1))
ck = perturbed_checkpoints(model, T)
t = time.perf_counter()
pk.path_kernel(model, ck, X, out=out, memory_budget="96MB", progress=False)
if torch.distributed.is_initialized():
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        print(f"seconds {time.perf_counter() - t:.2f}")
    torch.distributed.destroy_process_group()
else:
    print(f"seconds {time.perf_counter() - t:.2f}")
"""


def run(ranks: int, threads: int, n: int, T: int, out: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if ranks == 1:
        cmd = [sys.executable, "-c", JOB, str(n), str(T), out]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={ranks}",
            "--master-addr=127.0.0.1",
            "--master-port=29577",
            "--no-python",
            sys.executable,
            "-c",
            JOB,
            str(n),
            str(T),
            out,
        ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return float(
        [line for line in p.stdout.splitlines() if line.startswith("seconds")][-1].split()[1]
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=6000)
    ap.add_argument("--checkpoints", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        runs = {}
        for ranks, threads in [(1, 1), (2, 1), (1, 2)]:
            out = f"{d}/k{ranks}x{threads}.npy"
            t = time.perf_counter()
            runs[ranks, threads] = run(ranks, threads, args.n, args.checkpoints, out)
            print(
                f"{ranks} rank(s) x {threads} thread(s): {runs[ranks, threads]:.2f} s "
                f"(wall {time.perf_counter() - t:.1f} s with start-up)",
                flush=True,
            )
        same = open(f"{d}/k1x1.npy", "rb").read() == open(f"{d}/k2x1.npy", "rb").read()
    s = runs[1, 1] / runs[2, 1]
    print(
        f"2 ranks x 1 thread vs 1 x 1: {s:.2f}x (efficiency {s / 2:.0%}); files "
        f"{'byte-identical' if same else 'DIFFER'}"
    )
    print(f"2 ranks x 1 thread vs 1 rank x 2 threads: {runs[1, 2] / runs[2, 1]:.2f}x")


if __name__ == "__main__":
    main()
