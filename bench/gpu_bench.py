"""GPU timings for the CUDA backend (run by gpu_check.sh on a machine with a GPU).

wide-mlp tiles (N = 16384): pathkernel's fused kernel against a torch composition of the
same computation (matmul for both Grams, elementwise product, add) and against the plain
torch.matmul rate measured in the same run; then the whole tangent-kernel pipeline on GPU
against the CPU one for the same work. Writes a Markdown table with the card's name.
"""
import argparse
import time

import torch

import pathkernel as pk
from pathkernel._backend import accumulate
from pathkernel._capture import model_state
from pathkernel._features import to_terms
from pathkernel._tangent import features, prepare
from pathkernel._workloads import best_time, mlp_factored_flops, wide_mlp


def cuda_time(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--pipeline-n", type=int, default=4096)
    ap.add_argument("--out", default="bench/RESULTS.md")
    args = ap.parse_args()
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    n = args.n
    model, x = wide_mlp(n)
    model, x = model.to(dev), x.to(dev)
    plan, spec, dtype, x1, _ = prepare(model, x, None, "trace", "auto", None, None)
    block = features(plan, spec, model_state(plan, dtype), x1, 4096, "x")
    s1, _ = to_terms(plan, block, None)
    sizes = [128, 1024, 1024, 1]
    flops_full = mlp_factored_flops(sizes, n, n, False)
    flops_sym = mlp_factored_flops(sizes, n, n, True)
    out = torch.zeros(n, n, 1, 1, device=dev)
    rows = []

    def torch_composition():
        K = torch.zeros(n, n, device=dev)
        for t in s1:
            d = t.D.reshape(n, -1)
            g = d @ d.T
            if t.A is not None:
                a = t.A.reshape(n, -1)
                g = (a @ a.T + t.beta) * g
            K += g
        return K

    for label, tf32 in [("fp32 (no TF32)", False), ("TF32", True)]:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, 4096, device=dev)
        mm = cuda_time(lambda: a @ a.T)
        rate = 2.0 * n * n * 4096 / mm
        comp = cuda_time(torch_composition, 3)
        rows.append((f"torch composition, {label}", comp, flops_full / comp / 1e12, rate / 1e12))
    torch.backends.cuda.matmul.allow_tf32 = False
    for prec in ["tf32", "3xtf32"]:
        for sym in [True, False]:
            side2 = None if sym else s1
            t = cuda_time(lambda: accumulate(out, s1, side2, precision=prec), 3)
            fl = flops_sym if sym else flops_full
            rows.append((f"pathkernel fused {prec}{' symmetric' if sym else ''}", t, fl / t / 1e12, None))
    half = [pk._backend.Term(None if t.A is None else t.A.bfloat16(), t.D.bfloat16(), t.beta) for t in s1]
    t = cuda_time(lambda: accumulate(out, half, None), 3)
    rows.append(("pathkernel fused bf16 symmetric", t, flops_sym / t / 1e12, None))
    ab = torch.randn(n, 4096, device=dev, dtype=torch.bfloat16)
    mm = cuda_time(lambda: ab @ ab.T)
    rows.append(("torch.matmul bf16 (rate)", mm, 2.0 * n * n * 4096 / mm / 1e12, None))

    # the whole pipeline, GPU against CPU, same work
    pn = args.pipeline_n
    cm, cx = wide_mlp(pn)
    gm, gx = wide_mlp(pn)
    gm, gx = gm.to(dev), gx.to(dev)
    t_cpu = best_time(lambda: pk.tangent_kernel(cm, cx), 2)
    t_gpu = cuda_time(lambda: pk.tangent_kernel(gm, gx), 3)

    lines = [f"## CUDA backend on {name} ({time.strftime('%Y-%m-%d')})", "",
             f"wide-mlp (128-1024-1024-1) factor Grams, N = {n}, float32 factors "
             f"({flops_full / 1e12:.2f} TFLOP full, {flops_sym / 1e12:.2f} symmetric)", "",
             "| what | seconds | TFLOP/s (factored) | matmul TFLOP/s same run |", "|---|---|---|---|"]
    for what, t, tf, rate in rows:
        lines.append(f"| {what} | {t:.4f} | {tf:.1f} | {'' if rate is None else f'{rate:.1f}'} |")
    lines += ["", f"tangent_kernel pipeline N = {pn}: CPU {t_cpu:.3f} s, GPU {t_gpu:.4f} s, "
              f"ratio {t_cpu / t_gpu:.1f}x", ""]
    text = "\n".join(lines)
    print(text)
    with open(args.out, "a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
