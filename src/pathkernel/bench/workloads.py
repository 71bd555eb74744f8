"""The reference workloads of docs/design.md (section 5) and the peers they are measured against.

Shared by ``pathkernel bench`` and the pytest-benchmark suite in ``bench/``.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from .._timing import best_time


def mlp(sizes, act=nn.Tanh, seed=0, dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


class DigitsCNN(nn.Module):
    """conv3x3(16)-conv3x3(32)-linear on 8x8 images (``digits-cnn``)."""

    def __init__(self, classes=10):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 64, classes)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))
        return self.fc(h.flatten(1))


def wide_mlp(n=2048, seed=0, dtype=torch.float32) -> Tuple[nn.Module, torch.Tensor]:
    model = mlp([128, 1024, 1024, 1], seed=seed, dtype=dtype)
    x = torch.randn(n, 128, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    return model, x


def perturbed_checkpoints(
    model: nn.Module, T: int, seed: int = 0, step: float = 0.01, lr: float = 0.1
):
    """T checkpoints of a random walk from the model's weights, each with weight ``lr``."""
    import copy

    g = torch.Generator().manual_seed(seed)
    walker = copy.deepcopy(model)
    ckpts = []
    for _ in range(T):
        with torch.no_grad():
            for p in walker.parameters():
                p.add_(step * torch.randn(p.shape, generator=g, dtype=p.dtype))
        ckpts.append(({k: v.clone() for k, v in walker.state_dict().items()}, lr))
    return ckpts


def checkpoint_path(n: int, m: int, T: int, seed: int = 0, step: float = 0.01, lr: float = 0.1):
    """The checkpoint-path workload: MLP 64-256-1, n train x m query inputs, T checkpoints of
    randomly perturbed weights (each with weight ``lr``). Returns (model, ckpts, X, Xq)."""
    model = mlp([64, 256, 1], seed=seed)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 64, generator=g)
    Xq = torch.randn(m, 64, generator=g)
    return model, perturbed_checkpoints(model, T, seed, step, lr), X, Xq


class TinyTransformer(nn.Module):
    """embedding + one attention block + LayerNorm over 16 tokens (``tiny-transformer``)."""

    def __init__(self, vocab=64, d=32, seq=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, d))
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)

    def forward(self, t):
        h = self.emb(t) + self.pos
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.norm(h + a).mean(1))


def tiny_transformer(n=1024, seed=0) -> Tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = TinyTransformer().eval()
    return model, torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(seed + 1))


# ---- peers -------------------------------------------------------------------------------------


def linear_factors(model: nn.Module, x: torch.Tensor, scalars):
    """Pure-torch peer helper: inputs of every nn.Linear (forward hooks) and the gradients of
    each scalar ``scalars(output)`` yields w.r.t. their outputs: ``(ins, [grads per scalar])``."""
    ins, outs = [], []

    def hook(module, args, out):
        ins.append(args[0].detach())
        outs.append(out)

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        f = model(x)
    finally:
        for h in hs:
            h.remove()
    ss = list(scalars(f))
    return ins, [
        torch.autograd.grad(s, outs, retain_graph=k < len(ss) - 1) for k, s in enumerate(ss)
    ]


def torch_factored_ntk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Hand-written pure-torch factored Gram for MLPs (trace over outputs): forward hooks on
    each Linear, one backward per output, then (A A^T + 1) * (D D^T) summed over layers."""
    ins, grads = linear_factors(model, x, lambda f: f.reshape(f.shape[0], -1).sum(0))
    K = torch.zeros(x.shape[0], x.shape[0], dtype=x.dtype)
    for ds in grads:
        for a, d in zip(ins, ds):
            K += (a @ a.T + 1) * (d @ d.T)
    return K


def torch_func_ntk(model: nn.Module, x1: torch.Tensor, x2=None, outputs: str = "trace"):
    """The PyTorch NTK tutorial recipe: vmap(jacrev) Jacobians, contracted as its own
    ``empirical_ntk_jacobian_contraction`` does: ``"Naf,Maf->NM"`` for the trace,
    ``"Naf,Mbf->NMab"`` for the full C x C blocks."""
    # the trainable parameters, as a fine-tuning user passes them (the rest stay the module's)
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def single(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    from .._capture.dense import math_attention

    with math_attention():  # the fused kernels have no batching rule (a slow fallback)
        j1 = vmap(jacrev(single), (None, 0))(params, x1)
        j2 = j1 if x2 is None else vmap(jacrev(single), (None, 0))(params, x2)
    n1 = x1.shape[0]
    n2 = n1 if x2 is None else x2.shape[0]
    how = "Naf,Maf->NM" if outputs == "trace" else "Naf,Mbf->NMab"
    return sum(
        torch.einsum(how, a.reshape(n1, -1, a[0, 0].numel()), b.reshape(n2, -1, b[0, 0].numel()))
        for a, b in zip(j1.values(), j2.values())
    )


def torch_func_grad_ntk(model: nn.Module, x, scalar: Callable, chunk: int = 32) -> torch.Tensor:
    """The recipe for one scalar output when the N x P Jacobian fits: ``vmap(grad)``
    per-example gradients in chunks of ``chunk``, flattened, one GEMM. ``x``: a tensor, or a
    dict of the model's keyword inputs."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    xs = x if isinstance(x, dict) else {None: x}
    keys = tuple(xs)

    def f(p, *ts):
        one = [t.unsqueeze(0) for t in ts]
        out = (
            functional_call(model, p, tuple(one))
            if keys == (None,)
            else functional_call(model, p, (), dict(zip(keys, one)))
        )
        return scalar(out)[0]

    from .._capture.dense import math_attention

    g = vmap(grad(f), in_dims=(None,) + (0,) * len(keys))
    n = next(iter(xs.values())).shape[0]
    rows = []
    for lo in range(0, n, chunk):
        with math_attention():  # the fused kernels have no batching rule for their backward
            gs = g(params, *(t[lo : lo + chunk] for t in xs.values()))
        rows.append(torch.cat([v.reshape(v.shape[0], -1) for v in gs.values()], 1))
    J = torch.cat(rows)
    return J @ J.T


def flop_limit(model: nn.Module, x, outputs, rate: float) -> float:
    """Seconds of the work's FLOPs at ``rate`` (the sgemm rate measured in the same run): one
    batched forward + backward of the N examples (torch's ``FlopCounterMode``; ``C`` backward
    passes for the trace of ``C`` outputs) plus the symmetric Gram, N(N+1)/2 pairs x P x 2
    (x C for the trace). ``outputs``: ``"trace"`` or a callable giving one scalar per
    example; ``x``: a tensor, or a dict of keyword inputs."""
    from torch.utils.flop_counter import FlopCounterMode

    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n = next(iter(x.values())).shape[0] if isinstance(x, dict) else x.shape[0]
    with FlopCounterMode(display=False) as fc:
        out = model(**x) if isinstance(x, dict) else model(x)
        forward = fc.get_total_flops()
        s = out.reshape(n, -1).sum(1) if outputs == "trace" else outputs(out)
        s.sum().backward()
    model.zero_grad(set_to_none=True)
    C = out.reshape(n, -1).shape[1] if outputs == "trace" else 1
    backward = fc.get_total_flops() - forward
    return (forward + C * backward + n * (n + 1) / 2 * P * 2 * C) / rate


def mlp_factored_flops(sizes, n1: int, n2: int, symmetric: bool) -> float:
    """FLOPs of the factor Grams (2 per multiply-add; bias folded into the epilogue)."""
    inner = sum(a + b for a, b in zip(sizes[:-1], sizes[1:]))
    pairs = n1 * (n1 + 1) / 2 if symmetric else n1 * n2
    return 2.0 * pairs * inner


def gemm_rate(n: int = 2048, dtype=torch.float32, repeats: int = 3) -> float:
    """Measured GEMM FLOP/s (torch.mm, square n)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    return 2.0 * n**3 / best_time(lambda: torch.mm(a, b), repeats)


def native_gemm_rate(n: int = 2048, dtype=torch.float32, repeats: int = 3) -> float:
    """GEMM FLOP/s of the native core's own BLAS, through the accumulator with S=C=1 and no
    epilogue work beyond one add (a dense term): the roofline our kernels run on."""
    from .._backend import Term, accumulate

    d = torch.randn(n, 1, 1, n, dtype=dtype)
    out = torch.zeros(n, n, 1, 1, dtype=dtype)
    side = [Term(None, d, 0.0)]
    accumulate(out, side, side)
    return 2.0 * n**3 / best_time(lambda: accumulate(out, side, side), repeats)


def paired_best(
    fa: Callable[[], object], fb: Callable[[], object], repeats: int = 5
) -> Tuple[float, float]:
    """Best times of two workloads timed alternately (a, b, a, b, ...), so that both see the
    same machine conditions: on a noisy 2-core machine, back-to-back blocks bias a ratio."""
    ta = tb = float("inf")
    for _ in range(repeats):
        ta = min(ta, best_time(fa, 1))
        tb = min(tb, best_time(fb, 1))
    return ta, tb


WORKLOADS: Dict[str, str] = {
    "digits-mlp": "MLP 64-256-256-10 tanh, sklearn digits N=1797, full-batch GD 100 steps",
    "wide-mlp": "MLP 128-1024-1024-1 tanh, synthetic N=4096, 20 steps",
    "digits-cnn": "conv3x3(16)-conv3x3(32)-linear on 8x8 digits, 20 steps",
    "tiny-transformer": "embedding + attention block + LayerNorm, seq 16, N=1024, 10 steps",
    "large-n": "MLP 64-256-1, 200,000 train x 2,000 query, 10 steps, 2 GB budget",
}
