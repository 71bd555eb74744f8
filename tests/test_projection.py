"""Projected features (``project=k``): the sketch each group gets, against the same
functionals applied to float64 per-example Jacobians; unbiasedness; the error against the
dense-Gaussian value; determinism across calls, resumes and ranks."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import pathkernel as pk
from architectures import SelfAttention
from models import CNN, Tied, TinyTransformer, mlp
from pathkernel._capture.plan import DENSE
from pathkernel._drivers.tangent import prepare
from reference import assert_close, jacobians, rows_for


class Recurrent(nn.Module):
    """A grouped convolution, an LSTM (one weight applied at every step) and a learned
    log-scale that no rule covers (the dense path) ahead of a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1, groups=2)
        self.lstm = nn.LSTM(8, 6, batch_first=True)
        self.log_scale = nn.Parameter(0.1 * torch.randn(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # x [n, 4, T]
        h = torch.tanh(self.conv(x)).transpose(1, 2)
        out, _ = self.lstm(h)
        return self.head(out[:, -1] * self.log_scale.exp())


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1))


def _signed(proj, key, side, d, dtype):
    return proj.signs(key, side, d, dtype, "cpu")


def reference_features(plan, J):
    """``[n, C, k']``: each group's documented functionals applied to the exact per-example
    gradients ``J [n, C, P]`` (model parameter order); exact groups in the plan's layout."""
    n, C = J.shape[:2]
    grads, i = {}, 0
    for name, p in plan.model.named_parameters():
        if p.requires_grad:
            grads[name] = J[..., i : i + p.numel()].reshape(n, C, *p.shape)
            i += p.numel()
    proj = plan.projection

    def kr(key, G, u_side, v_side):  # u over G's rows, v over its columns
        U = _signed(proj, key, u_side, G.shape[2], G.dtype)
        V = _signed(proj, key, v_side, G.shape[3], G.dtype)
        return torch.einsum("ncij,mi,mj->ncm", G, U, V) / math.sqrt(U.shape[0])

    def canonical(g):  # a parameter as [shape[0], rest]
        return g.reshape(n, C, g.shape[2] if g.dim() > 2 else 1, -1)

    feats = []
    for key in plan.group_keys():
        if key not in proj.dims:
            feats.append(plan.flatten_group(key, grads, lead=(n, C)))
            continue
        if key == DENSE:
            feats.append(
                sum(kr(key, canonical(grads[nm]), nm + ":rows", nm + ":cols") for nm in plan.dense)
            )
            continue
        g = plan.group(key)
        w = grads[g.weight]
        if g.kind == "sum":
            feats.append(kr(key, canonical(w), "rows", "cols"))
        elif g.conv_groups > 1:
            G = canonical(w)
            if g.bias is not None:
                G = torch.cat([G, grads[g.bias].unsqueeze(-1)], -1)
            feats.append(kr(key, G, "rows", "cols"))
        else:
            M = canonical(w)
            M = M.transpose(2, 3) if g.transposed else M  # [rows (D side), cols (A side)]
            Z = M.transpose(2, 3)
            if g.bias is not None:
                Z = torch.cat([Z, grads[g.bias].unsqueeze(2)], 2)
            feats.append(kr(key, Z, "A", "D"))
    return torch.cat(feats, -1)


def _tokens(n, vocab, seq, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g)


CASES = {
    "mlp": lambda: (mlp(d_in=6, hidden=(9, 7), d_out=3), torch.randn(7, 6, dtype=torch.float64)),
    "cnn": lambda: (CNN().double(), torch.randn(6, 1, 8, 8, dtype=torch.float64)),
    "transformer": lambda: (TinyTransformer().double(), _tokens(6, 11, 5, 1)),
    "tied": lambda: (Tied().double(), _tokens(6, 7, 4, 2)),
    "attention": lambda: (SelfAttention().double(), torch.randn(5, 4, 8, dtype=torch.float64)),
    "recurrent": lambda: (Recurrent().double(), torch.randn(5, 4, 6, dtype=torch.float64)),
    # k large enough that the 8x8 convolution materializes its gradient before projecting
    "cnn-positions": lambda: (SmallCNN().double(), torch.randn(4, 1, 8, 8, dtype=torch.float64)),
}
K_OF = {"cnn-positions": 3000}


@pytest.mark.parametrize("outputs", ["trace", 1])
@pytest.mark.parametrize("case", sorted(CASES))
def test_projected_kernel_equals_sketch_of_exact_gradients(case, outputs):
    """Read off the factors (token gathers, tied weights, transposed uses, grouped
    convolutions, the dense path) = the documented functionals of the autograd gradient."""
    torch.manual_seed(0)
    model, x = CASES[case]()
    n_groups = len(
        prepare(model, x, None, outputs, "auto", torch.float64, None, None)[0].group_keys()
    )
    k = K_OF.get(case, max(n_groups + 2, 12))
    plan = prepare(model, x, None, outputs, "auto", torch.float64, None, None, k, 3)[0]
    assert plan.projection.dims, "the case should project at least one group"
    F = reference_features(plan, jacobians(model, x, rows_for(outputs)))
    ref = torch.einsum("icm,jcm->ij", F, F)
    K = pk.tangent_kernel(model, x, outputs=outputs, project=k, seed=3, dtype=torch.float64)
    assert_close(K, ref, torch.float64)
    x2 = x[:3]
    K12 = pk.tangent_kernel(model, x2, x, outputs=outputs, project=k, seed=3)
    assert_close(K12, ref[:3], torch.float64)  # x2's side: the same sketch (fitted on x)


def test_projection_is_unbiased():
    """The mean over seeds converges to the exact kernel at the Monte-Carlo rate."""
    model, x = mlp(d_in=6, hidden=(9,), d_out=2), torch.randn(8, 6, dtype=torch.float64)
    K = pk.tangent_kernel(model, x, outputs=0)
    runs = torch.stack(
        [pk.tangent_kernel(model, x, outputs=0, project=6, seed=s) for s in range(300)]
    )
    single = ((runs - K).norm(dim=(1, 2)) / K.norm()).mean()
    mean_err = (runs.mean(0) - K).norm() / K.norm()
    assert single > 0.05  # really projected
    assert mean_err < 3 * single / math.sqrt(300)


def test_exact_where_k_covers_every_group():
    model, x = mlp(), torch.randn(5, 6, dtype=torch.float64)
    P = sum(p.numel() for p in model.parameters())
    assert_close(pk.tangent_kernel(model, x, project=P), pk.tangent_kernel(model, x), torch.float64)


def small_transformer():
    torch.manual_seed(0)
    return TinyTransformer(vocab=50, d=32, heads=4, seq=12, classes=4).double()


@pytest.mark.parametrize("case", ["cnn", "transformer"])
def test_error_within_twice_the_dense_gaussian_value(case):
    """Relative Frobenius error at k = 256, 1024, 4096 within 2x of
    sqrt((tr(K)^2 / ||K||_F^2 + 1) / k), and falling with k."""
    torch.manual_seed(0)
    if case == "cnn":
        model, x = SmallCNN().double(), torch.randn(48, 1, 8, 8, dtype=torch.float64)
        outputs = 0
    else:
        model, x = small_transformer(), _tokens(48, 50, 12, 5)
        outputs = "trace"
    rows = pk.projection_error(model, x, ks=(256, 1024, 4096), outputs=outputs, seed=0)
    errs = [r["error"] for r in rows]
    for r in rows:
        assert r["error"] <= 2 * r["gaussian"], r
    assert errs[0] > errs[1] > errs[2], errs


def test_path_kernel_projection_deterministic_and_resumable(tmp_path):
    """The same seed gives the same sketch: the same bytes in a second run; query x train uses
    train x train's sketch; another seed gives another kernel, and cannot resume this one."""
    torch.manual_seed(0)
    model = mlp(d_in=6, hidden=(16,), d_out=3).float()
    ck = [({k: v + 0.01 * t for k, v in model.state_dict().items()}, 0.1) for t in range(2)]
    X, Xq = torch.randn(90, 6), torch.randn(20, 6)
    kw = dict(project=20, seed=7, progress=False, memory_budget=300000)
    K = pk.path_kernel(model, ck, X, **kw)
    out = tmp_path / "k.npy"
    assert pk.path_kernel(model, ck, X, out=str(out), **kw) == str(out)
    assert_close(np.load(out), K, torch.float32)  # another tiling: the same to rounding
    again = tmp_path / "again.npy"
    pk.path_kernel(model, ck, X, out=str(again), **kw)
    assert open(out, "rb").read() == open(again, "rb").read()
    assert pk.path_kernel(model, ck, X, out=str(out), **kw) == str(out)  # resumes: all done
    assert open(out, "rb").read() == open(again, "rb").read()
    Kq = pk.path_kernel(model, ck, X, Xq, **kw)
    both = pk.path_kernel(model, ck, X, torch.cat([X[:5], Xq]), **kw)
    assert_close(both[:5], K[:5], torch.float32)
    assert_close(both[5:], Kq, torch.float32)
    other = pk.path_kernel(model, ck, X, **{**kw, "seed": 8})
    assert not torch.equal(other, K)
    with pytest.raises(ValueError, match="projection"):  # a resume with another sketch
        pk.path_kernel(model, ck, X, out=str(out), **{**kw, "seed": 8})
    p = pk.plan(model, ck, X, memory_budget=300000, project=20, seed=7)
    assert "projected to k = 20" in str(p)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(project=0), "project"),
        (dict(project=2.5), "project"),
        (dict(project=True), "project"),
        (dict(project=8, seed="a"), "seed"),
        (dict(project=1), "project >= "),
    ],
)
def test_bad_projection_arguments(bad, match):
    model, x = mlp(), torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        pk.tangent_kernel(model, x, **bad)
