"""Issue targets for the out-of-core path kernel, each run in a fresh process for its RSS.

    python bench/large_scale.py large-n            # 200,000 x 2,000, 10 checkpoints, 2 GB budget
    python bench/large_scale.py symmetric DIR      # 50,000 x 50,000 (10 GB store), 4 GB budget,
                                                   # kill -9 halfway, resume, compare with a clean run
"""
import os
import resource
import signal
import subprocess
import sys
import time

import torch

RUN = """
import resource, sys, time, torch, pathkernel as pk
from pathkernel._workloads import mlp
kind, out, budget = sys.argv[1], sys.argv[2], sys.argv[3]
model = mlp([64, 256, 1], seed=0)
g = torch.Generator().manual_seed(0)
ckpts = []
m = mlp([64, 256, 1], seed=0)
for t in range(10):
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    ckpts.append(({k: v.clone() for k, v in m.state_dict().items()}, 0.1))
if kind == "large-n":
    X, Xq = torch.randn(200000, 64, generator=g), torch.randn(2000, 64, generator=g)
else:
    X, Xq = torch.randn(50000, 64, generator=g), None
print(pk.plan(model, ckpts, X, Xq, out=out, memory_budget=budget), flush=True)
t = time.perf_counter()
pk.path_kernel(model, ckpts, X, Xq, out=out, memory_budget=budget, progress=False)
print(f"seconds {time.perf_counter() - t:.1f}  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB", flush=True)
"""


def run(kind, out, budget):
    return subprocess.run([sys.executable, "-c", RUN, kind, out, budget], check=True)


def main():
    kind = sys.argv[1]
    if kind == "large-n":
        out = "/tmp/pathkernel-large-n.npy"
        for p in (out, out + ".journal"):
            if os.path.exists(p):
                os.remove(p)
        run("large-n", out, "2GB")
        from pathkernel._workloads import gemm_rate, mlp_factored_flops, native_gemm_rate
        flops = mlp_factored_flops([64, 256, 1], 2000, 200000, False) * 10
        rate = max(gemm_rate(2048), native_gemm_rate(2048))
        print(f"GEMM roofline {flops / rate:.1f} s ({flops / 1e12:.2f} TFLOP at {rate / 1e9:.0f} GFLOP/s)")
        return
    d = sys.argv[2]
    clean, part = os.path.join(d, "clean.npy"), os.path.join(d, "part.npy")
    for p in (clean, part, clean + ".journal", part + ".journal"):
        if os.path.exists(p):
            os.remove(p)
    run("symmetric", clean, "4GB")
    total = len(open(clean + ".journal").read().splitlines()) - 1
    proc = subprocess.Popen([sys.executable, "-c", RUN, "symmetric", part, "4GB"])
    while True:
        time.sleep(0.2)
        if os.path.exists(part + ".journal") and len(open(part + ".journal").read().splitlines()) - 1 >= total // 2:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(open(part + ".journal").read().splitlines()) - 1
    print(f"killed with {done}/{total} tiles done; resuming")
    run("symmetric", part, "4GB")
    same = subprocess.run(["cmp", clean, part]).returncode == 0
    print("resumed file identical to the clean run:", same)


if __name__ == "__main__":
    main()
