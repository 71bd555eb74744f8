"""Where the time of the architecture rows goes, and what two of the capture's paths are
worth, each against the torch.func tutorial recipe in the same process (float32, trace):

    python bench/trace_breakdown.py paired [rows]    # with and without each path, alternated
    python bench/trace_breakdown.py ceilings [rows]  # the part no method avoids, per row
    python bench/trace_breakdown.py vit32            # ViT-32, one output: the 70% arithmetic

- ``paired``: ``tangent_kernel`` as shipped, without the backward formulas that vmap batches
  (``_capture/batchable.py``: captures run unbatched) and without the one-GEMM-per-example
  materialization of trace layers (``materialize(stacked=False)``), and the peer, timed
  alternately, best of 7.
- ``ceilings``: torch's forward and channel-batched backward, timed inside our call, plus the
  Gram's FLOPs at the sgemm rate; the peer's time over that is the most any method could
  gain on the row (it leaves out the per-example gradients' FLOPs and every overhead).
- ``vit32``: the real-width ViT row's FLOP limit against torch's two passes inside our call.
"""

import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import pathkernel as pk
from pathkernel._capture import extract
from pathkernel.bench.arch_bench import _flops
from pathkernel.bench.architectures import ARCHITECTURES, ViT, architecture
from pathkernel.bench.real_width import margin
from pathkernel.bench.workloads import flop_limit, gemm_rate, torch_func_ntk

_timed: dict = {}


def _timing(name):
    real = getattr(extract, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        out = real(*a, **k)
        _timed[name] = _timed.get(name, 0.0) + time.perf_counter() - t
        return out

    setattr(extract, name, wrapper)
    return real


def _best(fns: dict, repeats: int = 7) -> dict:
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def paired(names):
    run_captured, materialize = extract.run_captured, extract.materialize

    def without(**patch):
        def call(model, x):
            saved = {k: getattr(extract, k) for k in patch}
            for k, v in patch.items():
                setattr(extract, k, v)
            try:
                pk.tangent_kernel(model, x)
            finally:
                for k, v in saved.items():
                    setattr(extract, k, v)

        return call

    unbatched = without(run_captured=lambda p, s, x, t, batched=False: run_captured(p, s, x, t))
    per_channel = without(
        materialize=lambda g, f, into=None, stacked=False: materialize(g, f, into)
    )
    for name in names:
        model, x = architecture(name)
        pk.tangent_kernel(model, x)
        b = _best(
            {
                "shipped": lambda: pk.tangent_kernel(model, x),
                "no batched formulas": lambda: unbatched(model, x),
                "GEMM per channel": lambda: per_channel(model, x),
                "peer": lambda: torch_func_ntk(model, x),
            }
        )
        print(
            f"{name:10s} "
            + ", ".join(f"{k} {v * 1e3:.1f} ms ({b['peer'] / v:.2f}x)" for k, v in b.items())
        )


def ceilings(names):
    for n in ("run_captured", "_output_grads"):
        _timing(n)
    rate = gemm_rate(2048)
    print(f"sgemm {rate / 1e9:.0f} GFLOP/s")
    geo, geo_c = 1.0, 1.0
    for name in names:
        model, x = architecture(name)
        pk.tangent_kernel(model, x)
        ours = passes = peer = float("inf")
        for _ in range(5):
            _timed.clear()
            t = time.perf_counter()
            pk.tangent_kernel(model, x)
            ours = min(ours, time.perf_counter() - t)
            passes = min(passes, _timed["run_captured"] + _timed["_output_grads"])
            t = time.perf_counter()
            torch_func_ntk(model, x)
            peer = min(peer, time.perf_counter() - t)
        gram = _flops(model, x)[1] / rate
        ceiling = peer / (passes + gram)
        geo *= (peer / ours) ** (1 / len(names))
        geo_c *= ceiling ** (1 / len(names))
        print(
            f"{name:10s} ours {ours * 1e3:6.1f} ms, peer {peer * 1e3:6.1f} ms, "
            f"{peer / ours:.2f}x; torch's passes {passes * 1e3:6.1f} ms + Gram at sgemm "
            f"{gram * 1e3:5.1f} ms -> ceiling {ceiling:.2f}x"
        )
    print(f"geometric mean {geo:.2f}x, of the ceilings {geo_c:.2f}x")


def vit32():
    for n in ("run_captured", "_output_grads"):
        _timing(n)
    torch.manual_seed(0)
    model = ViT(32, 4, 192, 3, 6, 10).eval()
    x = torch.randn(96, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pk.tangent_kernel(model, x, outputs=margin)
    rate = gemm_rate(2048)
    limit = flop_limit(model, x, margin, rate)
    best = None
    for _ in range(4):
        _timed.clear()
        t = time.perf_counter()
        pk.tangent_kernel(model, x, outputs=margin)
        t = time.perf_counter() - t
        if best is None or t < best[0]:
            best = (t, dict(_timed))
    t, parts = best
    passes = parts["run_captured"] + parts["_output_grads"]
    with FlopCounterMode(display=False) as fc:  # the linear layers' per-example gradients
        with torch.no_grad():  # cost as many FLOPs as their forward
            model(x)
    grads = fc.get_total_flops()
    n, P = x.shape[0], sum(p.numel() for p in model.parameters())
    gram = n * (n + 1) / 2 * P * 2
    left = limit / 0.7 - passes
    print(
        f"sgemm {rate / 1e9:.0f} GFLOP/s; FLOP limit {limit:.3f} s; ours {t:.3f} s "
        f"({limit / t:.0%}); torch's forward {parts['run_captured']:.3f} s + output-gradient "
        f"backward {parts['_output_grads']:.3f} s; 70% allows {limit / 0.7:.3f} s, leaving "
        f"{left:.3f} s for {grads / 1e9:.1f} GFLOP of per-example gradients and "
        f"{gram / 1e9:.1f} GFLOP of Gram: {(grads + gram) / left / 1e9:.0f} GFLOP/s"
    )


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "paired"
    rows = sys.argv[2:] or list(ARCHITECTURES)
    {"paired": lambda: paired(rows), "ceilings": lambda: ceilings(rows), "vit32": vit32}[what]()
