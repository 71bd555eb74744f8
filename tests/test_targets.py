"""Kernels of per-example losses (``targets=``) against a float64 per-example autograd
reference: ∇ℓ(f(x_i), y_i) by one backward pass per example, dotted."""

import numpy as np
import pytest
import torch
from torch import nn

import pathkernel as pk
from models import CNN, TinyTransformer, mlp
from pathkernel import losses
from reference import assert_close


def loss_grads(model, x, y, loss):
    """``[n, P]`` per-example gradients of ``loss(model(x_i), y_i)``, float64, plain autograd."""
    ps = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        v = loss(model(x[i : i + 1]), y[i : i + 1]).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(v, ps)]))
    return torch.stack(rows)


def regression_mlp():
    return mlp(d_in=6, hidden=(9, 7), d_out=3)


def cases():
    g = torch.Generator().manual_seed(3)
    cnn = CNN().double()
    tr = TinyTransformer().double()
    ln = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 4)).double()
    return {
        "mlp": (regression_mlp(), lambda n: torch.randn(n, 6, generator=g, dtype=torch.float64)),
        "cnn": (cnn, lambda n: torch.randn(n, 1, 7, 7, generator=g, dtype=torch.float64)),
        "transformer": (tr, lambda n: torch.randint(1, 11, (n, 5), generator=g)),
        "layernorm": (ln, lambda n: torch.randn(n, 6, generator=g, dtype=torch.float64)),
    }


def labels_for(model, x, loss, g):
    with torch.no_grad():
        out = model(x)
    if loss is losses.mse:
        return torch.randn(out.shape, generator=g, dtype=torch.float64)
    return torch.randint(0, out.shape[1], (x.shape[0],), generator=g)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer", "layernorm"])
@pytest.mark.parametrize("loss", [losses.cross_entropy, losses.mse, losses.margin])
def test_tangent_kernel_of_losses_equals_per_example_autograd(name, loss):
    model, make = cases()[name]
    g = torch.Generator().manual_seed(5)
    x1, x2 = make(9), make(5)
    y1, y2 = labels_for(model, x1, loss, g), labels_for(model, x2, loss, g)
    G1, G2 = loss_grads(model, x1, y1, loss), loss_grads(model, x2, y2, loss)
    assert_close(pk.tangent_kernel(model, x1, outputs=loss, targets=y1), G1 @ G1.T, torch.float64)
    K = pk.tangent_kernel(model, x1, x2, outputs=loss, targets=(y1, y2))
    assert_close(K, G1 @ G2.T, torch.float64)
    dense = pk.tangent_kernel(model, x1, x2, outputs=loss, targets=(y1, y2), implementation="dense")
    assert_close(dense, G1 @ G2.T, torch.float64)


def test_a_custom_loss_callable_and_soft_and_sequence_targets():
    """Any (output, target) callable; soft labels; a sequence loss with ignored positions."""
    torch.manual_seed(0)
    model = regression_mlp()
    x = torch.randn(6, 6, dtype=torch.float64)
    soft = torch.softmax(torch.randn(6, 3, dtype=torch.float64), 1)
    G = loss_grads(model, x, soft, losses.cross_entropy)
    K = pk.tangent_kernel(model, x, outputs=losses.cross_entropy, targets=soft)
    assert_close(K, G @ G.T, torch.float64)
    w = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)

    def weighted(out, y):  # a closure over w: a user's own loss
        return nn.functional.cross_entropy(out, y, weight=w, reduction="none")

    y = torch.tensor([0, 1, 2, 2, 1, 0])
    G = loss_grads(model, x, y, weighted)
    assert_close(pk.tangent_kernel(model, x, outputs=weighted, targets=y), G @ G.T, torch.float64)

    class Seq(nn.Module):  # next-token logits at every position: [n, T, V]
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(11, 8), nn.Linear(8, 11)

        def forward(self, t):
            return self.head(torch.tanh(self.emb(t)))

    torch.manual_seed(1)
    seq = Seq().double()
    t = torch.randint(0, 11, (5, 4))
    y = torch.randint(0, 11, (5, 4))
    y[0, 2:] = -100  # padding: ignored, as by F.cross_entropy
    G = loss_grads(seq, t, y, losses.cross_entropy)
    K = pk.tangent_kernel(seq, t, outputs=losses.cross_entropy, targets=y)
    assert_close(K, G @ G.T, torch.float64)


def _checkpoints(model, T=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = {k: v.clone() for k, v in model.state_dict().items()}
    ck = []
    for t in range(T):
        w = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in w.items()}
        ck.append((w, 0.05 * (t + 1)))
    return ck


def path_reference(model, ck, x_rows, y_rows, x_cols, y_cols, loss):
    K = 0
    for w, lr in ck:
        model.load_state_dict(w)
        K = (
            K
            + lr
            * loss_grads(model, x_rows, y_rows, loss)
            @ loss_grads(model, x_cols, y_cols, loss).T
        )
    return K


@pytest.mark.parametrize("symmetric", [True, False])
def test_tiled_path_kernel_of_losses_equals_the_reference(symmetric, tmp_path):
    """TracInCP's score matrix: tiles under a small budget, a resumable file, memory-mapped
    targets; in memory and on disk the same."""
    model = CNN().double()
    ck = _checkpoints(model)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(37, 1, 7, 7, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (37,), generator=g)
    Xq = None if symmetric else torch.randn(11, 1, 7, 7, generator=g, dtype=torch.float64)
    Yq = None if symmetric else torch.randint(0, 3, (11,), generator=g)
    np.save(tmp_path / "y.npy", Y.numpy())
    Ymap = np.load(tmp_path / "y.npy", mmap_mode="r")
    targets = Ymap if symmetric else (Ymap, Yq)
    kw = dict(outputs=losses.cross_entropy, targets=targets, dtype=torch.float64, progress=False)
    p = pk.plan(
        model, ck, X, Xq, memory_budget="300KB", **{k: kw[k] for k in kw if k != "progress"}
    )
    assert len(p.tiles) > 1 or p.passes  # the examples (and targets) come block by block
    K = pk.path_kernel(model, ck, X, Xq, memory_budget="300KB", **kw)
    out = pk.path_kernel(model, ck, X, Xq, memory_budget="300KB", out=tmp_path / "k.npy", **kw)
    ref = path_reference(
        model, ck, X if symmetric else Xq, Y if symmetric else Yq, X, Y, losses.cross_entropy
    )
    assert_close(K, ref, torch.float64)
    # the file's plan may group the checkpoints differently (the RAM run also holds the
    # kernel in its budget), so the two agree to float64 rounding, not bit for bit
    assert_close(np.load(out), ref, torch.float64)


def test_other_targets_refuse_to_resume(tmp_path):
    model = regression_mlp()
    ck = _checkpoints(model, T=2)
    X = torch.randn(20, 6, dtype=torch.float64)
    Y = torch.randint(0, 3, (20,))
    kw = dict(outputs=losses.cross_entropy, dtype=torch.float64, progress=False)
    out = pk.path_kernel(model, ck, X, targets=Y, out=tmp_path / "k.npy", **kw)
    with pytest.raises(ValueError, match="train"):
        pk.path_kernel(model, ck, X, targets=(Y + 1) % 3, out=out, **kw)


def test_sklearn_kernels_with_targets():
    model = regression_mlp()
    ck = _checkpoints(model, T=2)
    g = torch.Generator().manual_seed(4)
    X, Xq = torch.randn(15, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g)
    Xq = Xq.double()
    Y, Yq = torch.randn(15, 3, generator=g).double(), torch.randn(4, 3, generator=g).double()
    K_fit, K_pred = pk.sklearn_kernels(
        model, ck, X, Xq, outputs=losses.mse, targets=(Y, Yq), dtype=torch.float64
    )
    assert_close(K_fit, path_reference(model, ck, X, Y, X, Y, losses.mse), torch.float64)
    assert_close(K_pred, path_reference(model, ck, Xq, Yq, X, Y, losses.mse), torch.float64)


def test_bad_targets_name_the_argument():
    model = regression_mlp()
    x = torch.randn(5, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    ce = losses.cross_entropy
    with pytest.raises(ValueError, match="outputs: with targets=, expected a callable"):
        pk.tangent_kernel(model, x, targets=y)
    with pytest.raises(ValueError, match=r"targets \(x1\): expected one target per example"):
        pk.tangent_kernel(model, x, outputs=ce, targets=y[:4])
    with pytest.raises(ValueError, match="targets: with x2=, expected a pair"):
        pk.tangent_kernel(model, x, x, outputs=ce, targets=y)
    with pytest.raises(ValueError, match="targets: without x2=, expected one tensor"):
        pk.tangent_kernel(model, x, outputs=ce, targets=(y, y))
    with pytest.raises(TypeError, match=r"targets \(x1\): expected a tensor or numpy array"):
        pk.tangent_kernel(model, x, outputs=ce, targets={"y": y})
    with pytest.raises(ValueError, match="targets: without x2=, expected one tensor or array"):
        pk.tangent_kernel(model, x, outputs=ce, targets=[0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match=r"targets \(x1\): contains NaN"):
        pk.tangent_kernel(model, x, outputs=losses.mse, targets=torch.full((5, 3), float("nan")))
    ck = _checkpoints(model, T=1)
    with pytest.raises(ValueError, match=r"targets \(train\): 4 targets for the 5 examples"):
        pk.path_kernel(model, ck, x, outputs=ce, targets=y[:4], progress=False)
    with pytest.raises(ValueError, match="targets: with query=, expected a pair"):
        pk.path_kernel(model, ck, x, x, outputs=ce, targets=y, progress=False)


def test_command_line_targets(tmp_path):
    import subprocess
    import sys

    (tmp_path / "factory.py").write_text(
        "import torch\nfrom torch import nn\n\n\ndef mlp():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))\n"
    )
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    torch.save(m.state_dict(), tmp_path / "ckpt.pt")
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,))
    np.save(tmp_path / "x.npy", X.numpy())
    np.save(tmp_path / "y.npy", Y.numpy())
    base = [sys.executable, "-m", "pathkernel", "path-kernel", "--model", "factory:mlp"]
    base += ["--checkpoints", "ckpt.pt", "--train", "x.npy", "--no-progress", "--dtype", "float64"]
    r = subprocess.run(
        base + ["--targets", "y.npy", "--outputs", "cross_entropy", "--out", "k.npy"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    G = loss_grads(m, X, Y, losses.cross_entropy)
    assert_close(np.load(tmp_path / "k.npy"), G @ G.T, torch.float64)
    bad = subprocess.run(
        base + ["--targets", "y.npy", "--out", "k2.npy"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "--outputs: with --targets, expected one of" in bad.stderr


def _cnn_data(g, n):
    return torch.randn(n, 1, 7, 7, generator=g, dtype=torch.float64)


def _mlp_data(g, n):
    return torch.randn(n, 6, generator=g, dtype=torch.float64)


# Captum's per-batch hooks do not take Conv2d(padding="valid"): its sample-wise mode on the MLP
@pytest.mark.parametrize(
    "make, data, sample_wise",
    [(lambda: CNN().double(), _cnn_data, False), (regression_mlp, _mlp_data, True)],
)
def test_tracincp_scores_equal_captums(make, data, sample_wise, tmp_path):
    """Captum's TracInCP (cross-entropy, checkpoints weighted by their learning rates) is the
    query x train checkpoint path kernel of per-example loss gradients."""
    captum = pytest.importorskip("captum.influence")
    from torch.utils.data import DataLoader, TensorDataset

    model = make()
    ck = _checkpoints(model)
    g = torch.Generator().manual_seed(6)
    X, Y = data(g, 30), torch.randint(0, 3, (30,), generator=g)
    Xq, Yq = data(g, 7), torch.randint(0, 3, (7,), generator=g)
    paths, lr = [], {}
    for t, (w, weight) in enumerate(ck):
        paths.append(str(tmp_path / f"ckpt{t}.pt"))
        torch.save(w, paths[-1])
        lr[paths[-1]] = weight

    def load(m, path):
        m.load_state_dict(torch.load(path, weights_only=True))
        return lr[path]

    tracin = captum.TracInCP(
        make(),
        DataLoader(TensorDataset(X, Y), batch_size=8),
        paths,
        load,
        loss_fn=nn.CrossEntropyLoss(reduction="sum" if sample_wise else "none"),
        batch_size=8,
        sample_wise_grads_per_batch=sample_wise,
    )
    theirs = tracin.influence((Xq, Yq))
    ours = pk.path_kernel(
        model,
        ck,
        X,
        Xq,
        outputs=losses.cross_entropy,
        targets=(Y, Yq),
        dtype=torch.float64,
        progress=False,
    )
    assert_close(ours, theirs, torch.float64)
