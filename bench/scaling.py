"""Scaling of a path kernel over ranks on one machine (torch.distributed, gloo):

    python bench/scaling.py [--cases mlp,query,train]

Each case runs the same ``path_kernel`` into a .npy as 1 rank x 1 thread, as 2 ranks x 1
thread (torchrun), and as two independent 1 x 1 processes at once (what this machine's shared
caches and memory let two processes do: the ceiling of any 2-rank speed-up here), each in
fresh processes. It prints the time in the call (the slowest rank), the whole job's wall time,
whether the files are byte-identical, the time of the collective ``plan()`` (join, argument
fingerprints, probe and cost model: the start-up of a call), and the plan's per-rank
estimates for 8 and 64 ranks (the slowest rank against 1/W of one process's estimate).

Cases:
  mlp    train x train, MLP 64-256-256-10, N = 6,000, 4 checkpoints, 96 MB (cheap features)
  query  query x train, small CNN, 20,000 train x 2,000 query, 3 checkpoints, 12 MB per rank
  train  train x train, CNN with features as dear as its Grams, N = 6,000, 2 checkpoints, 64 MB
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

JOB = r"""
import json, os, sys, time, torch, pathkernel as pk
from torch import nn
from pathkernel.bench.workloads import mlp, perturbed_checkpoints
case, out = sys.argv[1], sys.argv[2]
dist = "RANK" in os.environ
if dist:
    from pathkernel.cli.distributed import init_process_group
    init_process_group("gloo")
torch.manual_seed(0)
g = torch.Generator().manual_seed(1)
Xq = None
if case == "mlp":
    model, T, budget = mlp([64, 256, 256, 10], seed=0), 4, "96MB"
    X = torch.randn(6000, 64, generator=g)
elif case == "query":
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(64, 10),
    )
    X, Xq = torch.randn(20000, 3, 16, 16, generator=g), torch.randn(2000, 3, 16, 16, generator=g)
    T, budget = 3, "12MB"
else:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    X, T, budget = torch.randn(6000, 3, 16, 16, generator=g), 2, "64MB"
ck = perturbed_checkpoints(model, T)
kw = dict(out=out, memory_budget=budget, outputs=0 if case != "mlp" else "trace")
t = time.perf_counter()
p = pk.plan(model, ck, X, Xq, **kw)
res = {"plan": time.perf_counter() - t, "est": p.est_seconds}
if not dist:
    for w in (8, 64):
        res[f"slowest{w}"] = max(r.seconds for r in p.ranks(w)) / (p.est_seconds / w)
t = time.perf_counter()
pk.path_kernel(model, ck, X, Xq, progress=False, **kw)
res["call"] = time.perf_counter() - t
print("RESULT " + json.dumps(res), flush=True)
if dist:
    torch.distributed.destroy_process_group()
"""


def _cmd(ranks: int, case: str, out: str, port: int):
    if ranks == 1:
        return [sys.executable, "-c", JOB, case, out]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={ranks}",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        "--no-python",
        sys.executable,
        "-c",
        JOB,
        case,
        out,
    ]


def _results(p: subprocess.CompletedProcess):
    if p.returncode != 0:
        raise RuntimeError(p.stdout[-2000:] + p.stderr[-2000:])
    return [json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")]


def run(ranks: int, case: str, out: str, threads: int = 1, port: int = 29577):
    """(the ranks' results, the job's wall time)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    p = subprocess.run(_cmd(ranks, case, out, port), env=env, capture_output=True, text=True)
    return _results(p), time.perf_counter() - t


def run_pair(case: str, d: str):
    """Two independent single processes at once: each one's time in the call."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            _cmd(1, case, f"{d}/pair{k}.npy", 0), env=env, stdout=subprocess.PIPE, text=True
        )
        for k in range(2)
    ]
    outs = [q.communicate()[0] for q in procs]
    return [
        json.loads(line[7:])["call"]
        for o in outs
        for line in o.splitlines()
        if line.startswith("RESULT ")
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="mlp,query,train")
    args = ap.parse_args()
    for case in args.cases.split(","):
        with tempfile.TemporaryDirectory() as d:
            (one,), wall1 = run(1, case, f"{d}/one.npy")
            two, wall2 = run(2, case, f"{d}/two.npy")
            pair = run_pair(case, d)
            same = open(f"{d}/one.npy", "rb").read() == open(f"{d}/two.npy", "rb").read()
        call2 = max(r["call"] for r in two)
        ceiling = 2 * one["call"] / (sum(pair) / len(pair))
        print(
            f"{case}: 1 rank {one['call']:.2f} s in the call (estimated {one['est']:.1f} s), "
            f"2 ranks {call2:.2f} s: {one['call'] / call2:.2f}x (this machine's ceiling "
            f"{ceiling:.2f}x: two lone processes at once take {sum(pair) / len(pair):.2f} s "
            f"each); whole job {wall1:.1f} s vs {wall2:.1f} s: {wall1 / wall2:.2f}x; files "
            f"{'byte-identical' if same else 'DIFFER'}; plan() {one['plan']:.2f} s alone, "
            f"{max(r['plan'] for r in two):.2f} s on 2 ranks; simulated slowest rank / (1/W of "
            f"one process): {one['slowest8']:.3f} at 8 ranks, {one['slowest64']:.3f} at 64",
            flush=True,
        )


if __name__ == "__main__":
    main()
