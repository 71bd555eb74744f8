"""``pathkernel bench``: the reference workloads against their peers, in one process.

Every row times pathkernel and its peers side by side (best of a few runs) and reports the
ratio peer / pathkernel; absolute seconds are printed for context only (the machines are
noisy). The GEMM rate measured in the same run gives the roofline of the factored Grams.
"""

from __future__ import annotations

import copy
import platform
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .workloads import (
    DigitsCNN,
    best_time,
    checkpoint_path,
    gemm_rate,
    linear_factors,
    mlp,
    mlp_factored_flops,
    native_gemm_rate,
    paired_best,
    tiny_transformer,
    torch_factored_ntk,
    torch_func_ntk,
    wide_mlp,
)


class Row:
    def __init__(
        self,
        workload: str,
        what: str,
        ours: float,
        peers: Dict[str, Optional[float]],
        note: str = "",
    ):
        self.workload, self.what, self.ours, self.peers, self.note = (
            workload,
            what,
            ours,
            peers,
            note,
        )


def _wide_mlp(quick: bool) -> List[Row]:
    from .._backend import accumulate
    from .._capture.extract import tangent_batches
    from .._drivers.tangent import prepare, tangent_kernel

    n = 1024 if quick else 2048
    model, x = wide_mlp(n)
    reps = 2 if quick else 3
    ours, fact = paired_best(
        lambda: tangent_kernel(model, x), lambda: torch_factored_ntk(model, x), reps + 2
    )
    # the Gram accumulation alone, against the symmetric-GEMM roofline
    plan, spec, dtype, x1, _ = prepare(model, x, None, "trace", "auto", None, None, None)
    side1, side2, _ = next(tangent_batches(plan, spec, dtype, x1, None, 512, at_once=True))
    terms = (side1, side2)
    out = torch.zeros(n, n, 1, 1)
    gram = best_time(lambda: accumulate(out, *terms), reps)
    sizes = [128, 1024, 1024, 1]
    flops = mlp_factored_flops(sizes, n, n, True)
    rate_torch, rate_native = gemm_rate(2048), native_gemm_rate(2048)
    nf = 256 if quick else 512
    small, xs = wide_mlp(nf)
    ours_small = best_time(lambda: tangent_kernel(small, xs), reps)
    tfunc = best_time(lambda: torch_func_ntk(small, xs), 1)
    return [
        Row(
            "wide-mlp",
            f"NTK N={n} float32 (pure-torch factored Gram)",
            ours,
            {"torch factored": fact},
        ),
        Row(
            "wide-mlp",
            f"NTK N={nf} float32 (torch.func Jacobian contraction)",
            ours_small,
            {"torch.func": tfunc},
            "torch.func needs the N x P Jacobian: measured at a smaller N",
        ),
        Row(
            "wide-mlp",
            f"Gram accumulation only, N={n} ({flops / 1e9:.1f} GFLOP)",
            gram,
            {
                "roofline, torch sgemm": flops / rate_torch,
                "roofline, our BLAS": flops / rate_native,
            },
            f"sgemm {rate_torch / 1e9:.0f} GFLOP/s (torch: MKL) / {rate_native / 1e9:.0f} GFLOP/s "
            "(OpenBLAS through the native core), square 2048, this run",
        ),
    ]


def _digits_cnn(quick: bool) -> List[Row]:
    from .._drivers.tangent import tangent_kernel

    n = 128 if quick else 512
    torch.manual_seed(0)
    model = DigitsCNN()
    x = torch.randn(n, 1, 8, 8)
    ours = best_time(lambda: tangent_kernel(model, x, outputs="full"), 2)

    peer = best_time(lambda: torch_func_ntk(model, x, outputs="full"), 1)
    return [Row("digits-cnn", f"NTK N={n}, full 10x10 blocks", ours, {"torch.func": peer})]


def _checkpoint_path(quick: bool) -> List[Row]:
    from .._drivers.path_kernel import path_kernel

    n, m, T = (5000, 100, 3) if quick else (20000, 200, 3)
    model, ckpts, X, Xq = checkpoint_path(n, m, T)
    mm = copy.deepcopy(model)

    def torch_ckpt():
        K = torch.zeros(m, n)
        for sd, w in ckpts:
            mm.load_state_dict(sd)
            K += w * _torch_factored_cross(mm, Xq, X)
        return K

    ours, peer = paired_best(
        lambda: path_kernel(model, ckpts, X, Xq, progress=False), torch_ckpt, 2 if quick else 3
    )
    peers = {"torch factored": peer}
    note = ""
    try:
        peers.update(_captum_tracincp(model, ckpts, X, Xq))
    except ImportError:
        note = "captum not installed"
    return [
        Row(
            "checkpoint-path",
            f"MLP 64-256-1, {n} train x {m} query, {T} checkpoints",
            ours,
            peers,
            note,
        )
    ]


def _captum_tracincp(model, ckpts, X, Xq) -> Dict[str, float]:
    """Captum's TracInCP with the summed output as its loss: the same checkpoint path kernel
    (checked against pathkernel's before timing). Both of its per-example gradient modes."""
    import os
    import tempfile

    from captum.influence import TracInCP
    from torch.utils.data import DataLoader, TensorDataset

    from .._drivers.path_kernel import path_kernel

    class SummedOutput(nn.Module):
        def __init__(self, reduction):
            super().__init__()
            self.reduction = reduction

        def forward(self, out, y):
            return out.sum() if self.reduction == "sum" else out.reshape(-1)

    out = {}
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for t, (sd, _) in enumerate(ckpts):
            paths.append(os.path.join(d, f"ckpt{t}.pt"))
            torch.save(sd, paths[-1])
        weight = {p: w for p, (_, w) in zip(paths, ckpts)}

        def load(m, path):
            m.load_state_dict(torch.load(path, weights_only=True))
            return weight[path]

        data = DataLoader(TensorDataset(X, torch.zeros(len(X))), batch_size=1000)
        ref = path_kernel(model, ckpts, X, Xq, progress=False)
        for label, sample_wise, red in [
            ("captum TracInCP (hooks)", True, "sum"),
            ("captum TracInCP (per-example)", False, "none"),
        ]:
            tr = TracInCP(
                copy.deepcopy(model),
                data,
                paths,
                load,
                loss_fn=SummedOutput(red),
                batch_size=1000,
                sample_wise_grads_per_batch=sample_wise,
            )
            K = tr.influence((Xq, torch.zeros(len(Xq))))
            if (K - ref).abs().max() > 1e-4 * ref.abs().max():
                raise AssertionError(f"{label} disagrees with path_kernel")
            out[label] = best_time(lambda: tr.influence((Xq, torch.zeros(len(Xq)))), 1)
    return out


def _torch_factored_cross(model: nn.Module, xq: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """Pure-torch factored Gram between two input sets (single output)."""
    aq, (dq,) = linear_factors(model, xq, lambda f: [f.sum()])
    at, (dt,) = linear_factors(model, xt, lambda f: [f.sum()])
    return sum((a @ b.T + 1) * (d @ e.T) for a, b, d, e in zip(aq, at, dq, dt))


def _digits_mlp_recorder(quick: bool) -> List[Row]:
    """Recorded training of digits-mlp (n = 4): seconds per step against a pure-torch
    implementation of the same factored accumulation, and against the plain step."""
    from .._drivers.recorder import PathRecorder

    steps = 5 if quick else 20
    g = torch.Generator().manual_seed(0)
    N, M = 1437, 360
    X = torch.rand(N, 64, generator=g)
    Y = torch.randint(0, 10, (N,), generator=g)
    Xq = torch.rand(M, 64, generator=g)
    loss_fn = nn.CrossEntropyLoss()
    idxs = [torch.randperm(N, generator=g)[:64] for _ in range(steps)]

    def plain():
        model = mlp([64, 256, 256, 10], seed=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for idx in idxs:
            opt.zero_grad()
            loss_fn(model(X[idx]), Y[idx]).backward()
            opt.step()

    def ours():
        model = mlp([64, 256, 256, 10], seed=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rec = PathRecorder(model, opt, loss_fn, (X, Y), Xq, quadrature=4)
        for idx in idxs:
            with rec.step(idx):
                opt.zero_grad()
                loss_fn(model(X[idx]), Y[idx]).backward()
                opt.step()
        return rec.kernel_machine()

    def torch_recorder():
        import numpy as np

        model = mlp([64, 256, 256, 10], seed=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        s, w = np.polynomial.legendre.leggauss(4)
        Q = torch.zeros(M, N, 10)
        for idx in idxs:
            w0 = [p.detach().clone() for p in model.parameters()]
            at, (dt,) = linear_factors(model, X[idx], lambda f: [loss_fn(f, Y[idx])])
            opt.zero_grad()
            loss_fn(model(X[idx]), Y[idx]).backward()
            opt.step()
            w1 = [p.detach().clone() for p in model.parameters()]
            for sk, wk in zip((s + 1) / 2, w / 2):
                node = copy.deepcopy(model)
                with torch.no_grad():
                    for p, a, b in zip(node.parameters(), w0, w1):
                        p.copy_(a + float(sk) * (b - a))
                aq, dqs = linear_factors(node, Xq, lambda f: f.sum(0))
                for c, dq in enumerate(dqs):
                    Kc = sum((a @ b.T + 1) * (d @ e.T) for a, b, d, e in zip(aq, at, dq, dt))
                    Q[:, idx, c] += -0.1 * float(wk) * Kc
        return Q

    t_plain = best_time(plain, 1) / steps
    t_ours = best_time(ours, 1) / steps
    t_torch = best_time(torch_recorder, 1) / steps
    return [
        Row(
            "digits-mlp",
            "recorded SGD step, n=4 (s/step)",
            t_ours,
            {"torch factored recorder": t_torch, "plain step (overhead)": t_plain},
            "ratio < 1 on the plain step is the recording overhead factor's inverse",
        )
    ]


def _tiny_transformer(quick: bool) -> List[Row]:
    from .._drivers.tangent import tangent_kernel

    n = 128 if quick else 512
    model, x = tiny_transformer(n)
    tangent_kernel(model, x), torch_func_ntk(model, x)  # warm both
    ours, peer = paired_best(lambda: tangent_kernel(model, x), lambda: torch_func_ntk(model, x), 2)
    return [
        Row(
            "tiny-transformer",
            f"NTK N={n}, seq 16",
            ours,
            {"torch.func": peer},
            "attention captured in multi_head_attention_forward, LayerNorm elementwise: "
            "no dense parameter",
        )
    ]


def _large_n(quick: bool) -> List[Row]:
    import resource
    import tempfile

    from .._drivers.path_kernel import path_kernel

    n, m, T = (20000, 500, 3) if quick else (200000, 2000, 10)
    model, ckpts, X, Xq = checkpoint_path(n, m, T)
    with tempfile.TemporaryDirectory() as d:
        out = f"{d}/k.npy"
        t = best_time(
            lambda: path_kernel(
                model, ckpts, X, Xq, out=out, memory_budget="2GB", resume=False, progress=False
            ),
            1,
        )
    flops = mlp_factored_flops([64, 256, 1], m, n, False) * T
    roof = flops / max(gemm_rate(2048), native_gemm_rate(2048))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return [
        Row(
            "large-n",
            f"{n} train x {m} query, {T} checkpoints, 2 GB budget",
            t,
            {"GEMM roofline": roof},
            f"peak RSS of this process so far {rss:.2f} GiB",
        )
    ]


def _architectures(quick: bool) -> List[Row]:
    from .arch_bench import architecture_rows

    return architecture_rows(quick, Row)


def _real_width(quick: bool) -> List[Row]:
    from .real_width import real_width_rows

    return real_width_rows(quick, Row)


BENCHES: Dict[str, Callable[[bool], List[Row]]] = {
    "wide-mlp": _wide_mlp,
    "digits-cnn": _digits_cnn,
    "checkpoint-path": _checkpoint_path,
    "digits-mlp": _digits_mlp_recorder,
    "tiny-transformer": _tiny_transformer,
    "large-n": _large_n,
    "architectures": _architectures,
    "real-width": _real_width,
}


def run_bench(quick: bool = False, only=None) -> str:
    from .._backend import info as backend_info

    names = only or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; choose from {list(BENCHES)}")
    info = backend_info()
    lines = [
        f"pathkernel {info['version']} on {platform.machine()}, {info['threads']} threads, "
        f"{info['blas']}; torch {torch.__version__} ({torch.get_num_threads()} threads)",
        "ratio = peer seconds / pathkernel seconds (higher is better for pathkernel)",
        "",
    ]
    head = (
        f"{'workload':<17} {'what':<58} {'pathkernel':>10}  {'peer':<24} {'peer s':>9} {'ratio':>8}"
    )
    lines += [head, "-" * len(head)]
    for name in names:
        for r in BENCHES[name](quick):
            first = True
            for peer, t in r.peers.items():
                ratio = "n/a" if t is None else f"{t / r.ours:8.2f}x"
                ts = "n/a" if t is None else f"{t:9.3f}"
                lines.append(
                    f"{r.workload if first else '':<17} {r.what if first else '':<58} "
                    f"{(f'{r.ours:10.3f}' if first else ''):>10}  {peer:<24} {ts:>9} {ratio:>8}"
                )
                first = False
            if r.note:
                lines.append(f"{'':<17} ({r.note})")
    return "\n".join(lines)
