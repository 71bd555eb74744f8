"""Issue targets for the out-of-core path kernel, each run in a fresh process for its RSS.

python bench/large_scale.py large-n            # 200,000 x 2,000, 10 checkpoints, 2 GB budget
python bench/large_scale.py symmetric DIR      # 50,000 x 50,000 (10 GB store), 4 GB budget,
                                               # kill -9 halfway, resume, compare with a clean run
"""

import os
import signal
import subprocess
import sys
import time

RUN = """
import resource, sys, time, torch, pathkernel as pk
from pathkernel.bench.workloads import checkpoint_path
kind, out, budget = sys.argv[1], sys.argv[2], sys.argv[3]
if kind == "large-n":
    model, ckpts, X, Xq = checkpoint_path(200000, 2000, 10)
else:
    model, ckpts, X, _ = checkpoint_path(50000, 1, 10)
    Xq = None
print(pk.plan(model, ckpts, X, Xq, out=out, memory_budget=budget), flush=True)
t = time.perf_counter()
pk.path_kernel(model, ckpts, X, Xq, out=out, memory_budget=budget, progress=False)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(f"seconds {time.perf_counter() - t:.1f}  peak RSS {rss:.2f} GiB", flush=True)
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
        from pathkernel.bench.workloads import gemm_rate, mlp_factored_flops, native_gemm_rate

        flops = mlp_factored_flops([64, 256, 1], 2000, 200000, False) * 10
        rate = max(gemm_rate(2048), native_gemm_rate(2048))
        print(
            f"GEMM roofline {flops / rate:.1f} s ({flops / 1e12:.2f} TFLOP at "
            f"{rate / 1e9:.0f} GFLOP/s)"
        )
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
        if (
            os.path.exists(part + ".journal")
            and len(open(part + ".journal").read().splitlines()) - 1 >= total // 2
        ):
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
