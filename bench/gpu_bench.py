"""GPU timings for the CUDA backend (run by gpu_check.sh on a machine with a GPU).

wide-mlp factor Grams (N = 16384): pathkernel's fused kernels against a torch composition of
the same computation (matmul for both Grams, elementwise product, add) and against the plain
torch.matmul rate of the same precision measured in the same run; then the whole
tangent-kernel pipeline on GPU against the CPU one for the same work. Each kernel's result is
checked against the composition before it is timed. Times are medians of CUDA-event timings.
Writes a Markdown section with the card's name.
"""

import argparse
import os
import statistics
import time

import torch

import pathkernel as pk
from pathkernel._backend import Term, accumulate, last_cuda_kernel
from pathkernel._capture.extract import tangent_batches
from pathkernel._drivers.tangent import prepare
from pathkernel.bench.workloads import best_time, mlp_factored_flops, wide_mlp


def cuda_time(fn, reps=7):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def matmul_rate(n, k, dtype, dev):
    a = torch.randn(n, k, device=dev, dtype=dtype)
    t = cuda_time(lambda: a @ a.T)
    return 2.0 * n * n * k / t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--pipeline-n", type=int, default=4096)
    ap.add_argument("--out", default="bench/RESULTS.md")
    variants = os.environ.get("GPU_BENCH_VARIANTS", "ldm32 wg32 ws")
    ap.add_argument("--variants", default=variants.replace(" ", ","))
    ap.add_argument(
        "--profile",
        default=None,
        help="launch the bf16 fused kernel of this variant once (under ncu) and exit",
    )
    args = ap.parse_args()
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    n = args.n
    model, x = wide_mlp(n)
    model, x = model.to(dev), x.to(dev)
    plan, spec, dtype, x1, _ = prepare(model, x, None, "trace", "auto", None, None, None)
    s32, _, _ = next(tangent_batches(plan, spec, dtype, x1, None, 4096, at_once=True))
    sides = {
        "float32": s32,
        "bfloat16": [
            Term(None if t.A is None else t.A.bfloat16(), t.D.bfloat16(), t.beta) for t in s32
        ],
        "float16": [Term(None if t.A is None else t.A.half(), t.D.half(), t.beta) for t in s32],
    }
    if args.profile:
        os.environ["PATHKERNEL_CUDA_FUSED"] = args.profile
        out = torch.zeros(n, n, 1, 1, device=dev)
        for _ in range(2):  # the first call also runs the small self-check launch
            accumulate(out, sides["bfloat16"], sides["bfloat16"])
        torch.cuda.synchronize()
        return
    sizes = [128, 1024, 1024, 1]
    fl_full = mlp_factored_flops(sizes, n, n, False)
    fl_sym = mlp_factored_flops(sizes, n, n, True)
    print(
        f"{name}: wide-mlp N={n}, terms "
        f"{[(None if t.A is None else t.A.shape[-1], t.D.shape[-1]) for t in s32]}",
        flush=True,
    )

    def composition(side):
        K = torch.zeros(n, n, device=dev)
        for t in side:
            d = t.D.reshape(n, -1)
            g = (d @ d.T).float()
            if t.A is not None:
                a = t.A.reshape(n, -1)
                g = ((a @ a.T).float() + t.beta) * g
            K += g
        return K

    rates, rows, comp_t = {}, [], {}
    ref = None
    for label, dt, tf32 in [
        ("float32", "float32", False),
        ("tf32", "float32", True),
        ("bfloat16", "bfloat16", False),
        ("float16", "float16", False),
    ]:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        rates[label] = matmul_rate(n, 4096, getattr(torch, dt), dev)
        comp_t[label] = cuda_time(lambda: composition(sides[dt]), 5)
        if label == "float32":
            ref = composition(sides[dt])
        rows.append((f"torch composition ({label})", comp_t[label], fl_full, rates[label], None))
        print(rows[-1], flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    ref_norm = ref.norm().item()
    out = torch.zeros(n, n, 1, 1, device=dev)
    for variant in args.variants.split(","):
        os.environ["PATHKERNEL_CUDA_FUSED"] = variant
        # 3xTF32 has float32 accuracy: its peer is the float32 composition and matmul
        for dt, prec, rate_key in [
            ("float32", "tf32", "tf32"),
            ("float32", "3xtf32", "float32"),
            ("bfloat16", "tf32", "bfloat16"),
            ("float16", "tf32", "float16"),
        ]:
            for sym in [False, True]:
                side2 = None if sym else sides[dt]
                out.zero_()
                accumulate(out, sides[dt], side2, precision=prec)
                used = last_cuda_kernel()  # a forced variant that cannot run falls back
                got = out[:, :, 0, 0]
                if sym:
                    got = got.triu() + got.triu(1).T
                err = (got - ref).norm().item() / ref_norm
                t = cuda_time(lambda: accumulate(out, sides[dt], side2, precision=prec), 5)
                what = (
                    f"{variant} {dt}{'/' + prec if dt == 'float32' else ''}"
                    f"{' symmetric' if sym else ''} [{used}]"
                )
                fl = fl_sym if sym else fl_full
                rows.append((what, t, fl, rates[rate_key], (comp_t[rate_key] / t, err)))
                print(rows[-1], flush=True)
    os.environ.pop("PATHKERNEL_CUDA_FUSED", None)

    # the whole pipeline, GPU against CPU, same work (float32, trace)
    pn = args.pipeline_n
    cm, cx = wide_mlp(pn)
    gm, gx = wide_mlp(pn)
    gm, gx = gm.to(dev), gx.to(dev)
    t_cpu = best_time(lambda: pk.tangent_kernel(cm, cx), 2)
    t_gpu = cuda_time(lambda: pk.tangent_kernel(gm, gx), 5)
    kc, kg = pk.tangent_kernel(cm, cx), pk.tangent_kernel(gm, gx).cpu()
    perr = ((kc - kg).norm() / kc.norm()).item()

    lines = [
        f"## CUDA backend on {name} ({time.strftime('%Y-%m-%d')}, `bash bench/gpu_check.sh`)",
        "",
        f"wide-mlp (128-1024-1024-1) factor Grams, N = {n} ({fl_full / 1e12:.2f} TFLOP full, "
        f"{fl_sym / 1e12:.2f} symmetric). Median of CUDA-event timings. 'vs composition' = torch "
        "composition time at the same precision / this time; 'of matmul' = factored TFLOP/s / "
        "torch.matmul TFLOP/s at the same precision (N x 4096 @ 4096 x N, same run); error = "
        "relative Frobenius error against the float32 composition.",
        "",
        "| what | ms | TFLOP/s | of matmul | vs composition | rel. error |",
        "|---|---|---|---|---|---|",
    ]
    for what, t, fl, rate, extra in rows:
        tf = fl / t / 1e12
        vs, err = ("", "") if extra is None else (f"{extra[0]:.2f}x", f"{extra[1]:.1e}")
        lines.append(
            f"| {what} | {t * 1e3:.2f} | {tf:.1f} | {tf * 1e12 / rate:.0%} | {vs} | {err} |"
        )
    lines += [
        "",
        "matmul rates (TFLOP/s): " + ", ".join(f"{k} {v / 1e12:.0f}" for k, v in rates.items()),
        "",
        f"tangent_kernel pipeline, wide-mlp N = {pn}, float32 trace: CPU ({os.cpu_count()} cores) "
        f"{t_cpu:.3f} s, GPU {t_gpu * 1e3:.1f} ms, ratio {t_cpu / t_gpu:.0f}x "
        f"(relative difference {perr:.1e})",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    with open(args.out, "a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
