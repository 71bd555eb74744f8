"""PathRecorder and the kernel machine against brute-force float64 references."""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import pathkernel as pk
from models import CNN, TinyTransformer, mlp
from reference import jacobians, math_attention

LOSS = nn.CrossEntropyLoss()


def data(n=24, m=7, d=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = torch.randint(0, classes, (n,), generator=g)
    Xq = torch.randn(m, d, generator=g, dtype=torch.float64)
    return X, Y, Xq


def batches(n, b, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g)[:b] for _ in range(steps)]


def train(model, opt, X, Y, idxs, rec=None, loss=LOSS):
    ws = []
    for idx in idxs:
        ws.append({n: p.detach().clone() for n, p in model.named_parameters()})
        ctx = rec.step(idx) if rec is not None else _null()
        with ctx:
            opt.zero_grad()
            loss(model(X[idx]), Y[idx]).backward()
            opt.step()
    ws.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return ws


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def per_example_loss_grads(model, w, X, Y, idx):
    """[B, P] gradients of the mean batch loss split by example (1/|B| each), torch.func."""

    def single(p, x, y):
        return LOSS(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    try:
        with math_attention():
            g = vmap(grad(single), in_dims=(None, 0, 0))(w, X[idx], Y[idx])
    except RuntimeError:  # no batching rule (RNNs in float64): one example at a time
        per = [grad(single)(w, X[i], Y[i]) for i in idx.tolist()]
        g = {k: torch.stack([p[k] for p in per]) for k in w}
    return torch.cat([v.reshape(len(idx), -1) for v in g.values()], 1) / len(idx)


def query_jac(model, w, Xq):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(w[n])
    return jacobians(m, Xq, lambda o: o.reshape(o.shape[0], -1))  # [M, C, P]


def brute_force_sgd(model, ws, X, Y, Xq, idxs, lr, n_nodes):
    """Q_i(x) = sum_t -lr * phibar_t(x) g_{i,t}, with phibar by Gauss-Legendre on torch.func
    Jacobians; only valid for plain SGD (shares are step-local)."""
    import numpy as np

    s, wq = np.polynomial.legendre.leggauss(n_nodes)
    s, wq = (s + 1) / 2, wq / 2
    C = model(Xq[:1]).reshape(1, -1).shape[1]
    Q = torch.zeros(Xq.shape[0], X.shape[0], C, dtype=torch.float64)
    for t, idx in enumerate(idxs):
        w0, w1 = ws[t], ws[t + 1]
        phibar = sum(
            float(b) * query_jac(model, {n: w0[n] + float(a) * (w1[n] - w0[n]) for n in w0}, Xq)
            for a, b in zip(s, wq)
        )
        G = per_example_loss_grads(model, w0, X, Y, idx)
        Q[:, idx] += -lr * torch.einsum("mcp,bp->mbc", phibar, G)
    return Q


def test_sgd_weight_decay_exact_and_matches_brute_force():
    X, Y, Xq = data()
    model = mlp(d_in=4, hidden=(6, 5), d_out=3, seed=3)
    ref_model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.4, weight_decay=0.05)
    rec = pk.PathRecorder(model, opt, LOSS, (X, Y), Xq, quadrature=6)
    idxs = batches(24, 6, 8)
    ws = train(model, opt, X, Y, idxs, rec)
    km = rec.kernel_machine()
    fT = model(Xq).detach()
    f0 = ref_model(Xq).detach()
    change = (fT - f0).abs().max()
    assert (km.predict() - fT).abs().max() <= 1e-10 * change
    Q = brute_force_sgd(ref_model, ws, X, Y, Xq, idxs, 0.4, 6)
    assert (km.contributions - Q).abs().max() <= 1e-9 * Q.abs().max()
    # examples never in a batch contribute nothing
    unseen = sorted(set(range(24)) - set(torch.cat(idxs).tolist()))
    if unseen:
        assert km.contributions[:, unseen].abs().max() == 0


def test_momentum_and_nesterov_exact():
    for kw in [
        dict(momentum=0.9),
        dict(momentum=0.8, dampening=0.3),
        dict(momentum=0.9, nesterov=True),
    ]:
        X, Y, Xq = data(seed=4)
        model = mlp(d_in=4, hidden=(6,), d_out=3, seed=5)
        opt = torch.optim.SGD(model.parameters(), lr=0.2, weight_decay=0.01, **kw)
        rec = pk.PathRecorder(model, opt, LOSS, (X, Y), Xq, quadrature=6)
        train(model, opt, X, Y, batches(24, 6, 10), rec)
        km = rec.kernel_machine()
        assert km.report()["relative_error"] <= 1e-9, kw


def test_momentum_contributions_match_brute_force():
    """Heavy ball: example i's share of step t is -lr * sum_{s<=t} mu^(t-s) g_{i,s}."""
    X, Y, Xq = data(seed=6)
    model = mlp(d_in=4, hidden=(5,), d_out=3, seed=7)
    ref = copy.deepcopy(model)
    mu, lr = 0.7, 0.3
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=mu)
    rec = pk.PathRecorder(model, opt, LOSS, (X, Y), Xq, quadrature=5)
    idxs = batches(24, 8, 6)
    ws = train(model, opt, X, Y, idxs, rec)
    import numpy as np

    s, wq = np.polynomial.legendre.leggauss(5)
    s, wq = (s + 1) / 2, wq / 2
    P = sum(p.numel() for p in ref.parameters())
    U = torch.zeros(24, P, dtype=torch.float64)
    Q = torch.zeros(7, 24, 3, dtype=torch.float64)
    for t, idx in enumerate(idxs):
        U *= mu
        U[idx] += per_example_loss_grads(ref, ws[t], X, Y, idx)
        phibar = sum(
            float(b)
            * query_jac(
                ref, {n: ws[t][n] + float(a) * (ws[t + 1][n] - ws[t][n]) for n in ws[t]}, Xq
            )
            for a, b in zip(s, wq)
        )
        Q += -lr * torch.einsum("mcp,np->mnc", phibar, U)
    km = rec.kernel_machine()
    assert (km.contributions - Q).abs().max() <= 1e-9 * Q.abs().max()


@pytest.mark.parametrize(
    "cls,kw",
    [
        (torch.optim.Adam, dict(weight_decay=0.01)),
        (torch.optim.AdamW, dict(weight_decay=0.1)),
        (torch.optim.AdamW, dict(weight_decay=0.1, amsgrad=True)),
    ],
)
def test_adam_exact(cls, kw):
    X, Y, Xq = data(seed=8)
    model = mlp(d_in=4, hidden=(6,), d_out=3, seed=9)
    opt = cls(model.parameters(), lr=0.05, **kw)
    rec = pk.PathRecorder(model, opt, LOSS, (X, Y), Xq, quadrature=6)
    train(model, opt, X, Y, batches(24, 6, 10), rec)
    assert rec.kernel_machine().report()["relative_error"] <= 1e-8


def test_state_before_recording_goes_to_bias():
    X, Y, Xq = data(seed=10)
    model = mlp(d_in=4, hidden=(6,), d_out=3, seed=11)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    train(model, opt, X, Y, batches(24, 6, 3))  # unrecorded warm-up
    rec = pk.PathRecorder(model, opt, LOSS, (X, Y), Xq, quadrature=6)
    train(model, opt, X, Y, batches(24, 6, 5, seed=2), rec)
    assert rec.kernel_machine().report()["relative_error"] <= 1e-9


def test_cnn_and_transformer_exact():
    torch.manual_seed(0)
    cnn = CNN().double()
    X = torch.randn(16, 1, 6, 6, dtype=torch.float64)
    Y = torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(cnn.parameters(), lr=0.3)
    rec = pk.PathRecorder(cnn, opt, LOSS, (X, Y), X[:5], quadrature=6)
    train(cnn, opt, X, Y, batches(16, 4, 5), rec)
    assert rec.kernel_machine().report()["relative_error"] <= 1e-10
    tr = TinyTransformer().double().eval()
    T = torch.randint(0, 11, (12, 5))
    Yt = torch.randint(0, 2, (12,))
    opt = torch.optim.AdamW(tr.parameters(), lr=0.01)
    rec = pk.PathRecorder(tr, opt, LOSS, (T, Yt), quadrature=6)
    train(tr, opt, T, Yt, batches(12, 4, 4), rec)
    assert rec.kernel_machine().report()["relative_error"] <= 1e-8


def test_real_architectures_exact_per_example():
    """The user's own loop on models whose parameters are applied by functional calls
    (Conv1D addmm on a flattened batch, broadcast position ids, a tied head, attention,
    BatchNorm, a deep bidirectional LSTM run through its cells): every example's contribution
    equals the brute-force one."""
    from architectures import cases

    ARCH = cases()

    for name, steps, smooth in (
        ("gpt2", 3, True),
        ("vit", 2, True),
        ("resnet", 2, False),
        ("lstm-deep", 2, True),
    ):
        model, make, _ = ARCH[name]
        model = copy.deepcopy(model)
        torch.manual_seed(3)
        X, Xq = make(10), make(3)
        Y = torch.randint(0, model(X[:1]).shape[-1], (10,))
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        rec = pk.PathRecorder(model, opt, LOSS, (X, Y), Xq, quadrature=12)
        idxs = batches(10, 4, steps)
        start = copy.deepcopy(model)
        ws = train(model, opt, X, Y, idxs, rec)
        km = rec.kernel_machine()
        Q = brute_force_sgd(start, ws, X, Y, Xq, idxs, 0.2, 12)
        assert (km.contributions - Q).abs().max() <= 1e-10 * Q.abs().max(), name
        if smooth:  # ReLU kinks make the quadrature converge only algebraically
            assert km.report()["relative_error"] <= 1e-9, name


def test_path_kernel_and_coefficients():
    X, Y, Xq = data(seed=12)
    for kind in ["batch", "full"]:
        model = mlp(d_in=4, hidden=(5,), d_out=3, seed=13)
        ref = copy.deepcopy(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        rec = pk.PathRecorder(model, opt, LOSS, (X, Y), Xq, quadrature=4, kernel=kind)
        idxs = batches(24, 6, 5)
        ws = train(model, opt, X, Y, idxs, rec)
        Kp = torch.zeros(7, 24, dtype=torch.float64)
        for t, idx in enumerate(idxs):
            Jq = query_jac(ref, ws[t], Xq)
            Jt = query_jac(ref, ws[t], X)
            K = torch.einsum("mcp,ncp->mn", Jq, Jt)
            cols = idx if kind == "batch" else torch.arange(24)
            Kp[:, cols] += 0.3 * K[:, cols]
        km = rec.kernel_machine()
        assert (km.path_kernel - Kp).abs().max() <= 1e-10 * Kp.abs().max()
        assert (km.kernel_predict() - km.predict()).abs().max() <= 1e-10 * km.predict().abs().max()


def test_left_endpoint_error_shrinks_with_learning_rate():
    X, Y, Xq = data(seed=14)
    errs = []
    for lr, steps in [(0.4, 5), (0.2, 10), (0.1, 20)]:
        model = mlp(d_in=4, hidden=(6,), d_out=3, seed=15)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        rec = pk.PathRecorder(model, opt, LOSS, (X, Y), Xq, quadrature="left")
        train(model, opt, X, Y, [torch.arange(24)] * steps, rec)
        errs.append(rec.kernel_machine().report()["max_abs_error"])
    assert errs[1] <= 0.55 * errs[0] and errs[2] <= 0.55 * errs[1], errs


def test_gauss_beats_trapezoid_beats_nothing():
    X, Y, Xq = data(seed=16)
    errs = {}
    for q in ["left", "trapezoid", 2, 4]:
        model = mlp(d_in=4, hidden=(6,), d_out=3, seed=17)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        rec = pk.PathRecorder(model, opt, LOSS, (X, Y), Xq, quadrature=q)
        train(model, opt, X, Y, [torch.arange(24)] * 5, rec)
        errs[q] = rec.kernel_machine().report()["relative_error"]
    assert errs[4] < errs[2] < errs["trapezoid"] < errs["left"], errs
    assert errs[4] < 1e-6


def test_top_contributors():
    X, Y, Xq = data(seed=18)
    model = mlp(d_in=4, hidden=(6,), d_out=3, seed=19)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    rec = pk.PathRecorder(model, opt, LOSS, (X, Y), Xq, quadrature=3)
    train(model, opt, X, Y, batches(24, 8, 4), rec)
    km = rec.kernel_machine()
    idx, val = km.top_contributors(3, output=1)
    Q1 = km.contributions[..., 1]
    for m in range(7):
        expect = Q1[m].abs().sort(descending=True).values[:3]
        assert torch.allclose(val[m].abs(), expect)
        assert torch.equal(Q1[m, idx[m]], val[m])
    with pytest.raises(ValueError, match="k: expected an int"):
        km.top_contributors(0)


# ---- refusals ---------------------------------------------------------------------------------


def _setup(seed=20, **kw):
    X, Y, Xq = data(seed=seed)
    model = mlp(d_in=4, hidden=(6,), d_out=3, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, **kw)
    return model, opt, X, Y, Xq


def test_clipped_step_is_refused_and_the_steps_before_it_stand():
    model, opt, X, Y, Xq = _setup()
    rec = pk.PathRecorder(model, opt, LOSS, (X, Y), Xq)
    idx = torch.arange(6)
    train(model, opt, X, Y, batches(24, 6, 2), rec)
    after_two = copy.deepcopy(model)
    with pytest.raises(pk.StepMismatchError, match=r"step 2: the optimizer's update differs .* by"):
        with rec.step(idx):
            opt.zero_grad()
            LOSS(model(X[idx]), Y[idx]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            opt.step()
    with pytest.warns(UserWarning, match="recording stopped at step 2: .*explains the 2 recorded"):
        km = rec.kernel_machine()
    assert km.steps == 2 and "step 2" in km.note and km.report()["note"] == km.note
    with torch.no_grad():
        assert torch.allclose(km.model_output, after_two(Xq), atol=1e-12)
    assert km.report()["relative_error"] < 1e-9
    with pytest.raises(RuntimeError, match="recording stopped at step 2"):
        with rec.step(idx):
            pass


def test_step_outside_the_block_is_refused_at_the_next_step():
    model, opt, X, Y, Xq = _setup()
    rec = pk.PathRecorder(model, opt, LOSS, (X, Y), Xq)
    idx = torch.arange(6)
    train(model, opt, X, Y, batches(24, 6, 2), rec)
    km2 = rec.kernel_machine()
    assert km2.note is None
    train(model, opt, X, Y, batches(24, 6, 1, seed=5))  # not recorded
    with pytest.warns(UserWarning, match="weights changed after the last recorded step"):
        km = rec.kernel_machine()
    assert torch.equal(km.model_output, km2.model_output)  # the recorded run's end, not now
    with pytest.raises(pk.StepMismatchError, match=r"step 2: the weights changed between"):
        with rec.step(idx):
            opt.zero_grad()
            LOSS(model(X[idx]), Y[idx]).backward()
            opt.step()
    with pytest.warns(UserWarning, match="recording stopped at step 2"):
        assert rec.kernel_machine().steps == 2


def _small_cnn_run(opt_cls, lr, clip=None, steps=3, loss=LOSS, **kw):
    """A float32 CNN trained by ``opt_cls`` under the recorder (the error it raises, if any)."""
    torch.manual_seed(0)
    model = CNN(c=(8, 16), classes=10)
    X = torch.randn(32, 1, 8, 8)
    Y = torch.randint(0, 10, (32,))
    opt = opt_cls(model.parameters(), lr=lr, **kw)
    rec = pk.PathRecorder(model, opt, loss, (X, Y), X[:4])
    for idx in batches(32, 8, steps):
        with rec.step(idx):
            opt.zero_grad()
            loss(model(X[idx]), Y[idx]).backward()
            if clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                assert norm > 1.5 * clip  # the clipping changes the update
            opt.step()
    return rec


@pytest.mark.parametrize(
    "opt_cls, lr, kw",
    [(torch.optim.AdamW, lr, {}) for lr in (1e-6, 1e-4, 1e-2)]
    + [(torch.optim.SGD, lr, {"momentum": 0.9}) for lr in (1e-5, 1e-3, 1.0)]
    + [(torch.optim.SGD, 1e-5, {})],
)
def test_float32_small_and_large_rates_are_recorded(opt_cls, lr, kw):
    rec = _small_cnn_run(opt_cls, lr, **kw)
    assert rec.steps == 3
    km = rec.kernel_machine()
    change = (km.model_output - km.initial_output).abs().max().item()
    # float32 features: the reconstruction holds to float32 rounding of the outputs
    assert km.report()["max_abs_error"] < 1e-3 * max(change, 1e-6) + 1e-5


@pytest.mark.parametrize(
    "opt_cls, lr", [(torch.optim.SGD, 1e-2), (torch.optim.SGD, 1e-4), (torch.optim.AdamW, 1e-3)]
)
def test_float32_clipping_is_still_refused(opt_cls, lr):
    with pytest.raises(pk.StepMismatchError, match="update differs"):
        _small_cnn_run(opt_cls, lr, clip=1.0, steps=4, loss=nn.CrossEntropyLoss(reduction="sum"))


def test_other_loss_is_refused():
    model, opt, X, Y, Xq = _setup()
    rec = pk.PathRecorder(model, opt, LOSS, (X, Y), Xq)
    idx = torch.arange(6)
    with pytest.raises(pk.StepMismatchError, match="not that of loss_fn"):
        with rec.step(idx):
            opt.zero_grad()
            (2 * LOSS(model(X[idx]), Y[idx])).backward()
            opt.step()


def test_wrong_inputs_are_refused():
    model, opt, X, Y, Xq = _setup()
    rec = pk.PathRecorder(model, opt, LOSS, (X, Y), Xq)
    with pytest.raises(pk.StepMismatchError, match=r"inputs other than train\[0\]\[idx\]"):
        with rec.step(torch.arange(6)):
            opt.zero_grad()
            LOSS(model(X[1:7]), Y[1:7]).backward()
            opt.step()


def test_bad_idx_and_arguments():
    model, opt, X, Y, Xq = _setup()
    rec = pk.PathRecorder(model, opt, LOSS, (X, Y), Xq)
    with pytest.raises(ValueError, match=r"idx: indices must lie in \[0, 24\)"):
        with rec.step([0, 24]):
            pass
    with pytest.raises(ValueError, match="idx: contains repeated indices"):
        with rec.step([1, 1]):
            pass
    with pytest.raises(
        ValueError, match=r"query: the model rejects inputs of per-example shape \(5,\)"
    ):
        pk.PathRecorder(model, opt, LOSS, (X, Y), torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="quadrature: expected a positive int"):
        pk.PathRecorder(model, opt, LOSS, (X, Y), quadrature=0)
    with pytest.raises(ValueError, match="kernel: expected None, 'batch' or 'full'"):
        pk.PathRecorder(model, opt, LOSS, (X, Y), kernel="all")
    with pytest.raises(ValueError, match="train: expected Y with 24 rows"):
        pk.PathRecorder(model, opt, LOSS, (X, Y[:5]))
    with pytest.raises(ValueError, match="optimizer: RMSprop is not supported"):
        pk.PathRecorder(model, torch.optim.RMSprop(model.parameters()), LOSS, (X, Y))


def test_non_finite_loss_is_refused():
    model, opt, X, Y, Xq = _setup()
    bad = lambda out, y: LOSS(out, y) * float("inf")
    rec = pk.PathRecorder(model, opt, bad, (X, Y), Xq)
    with pytest.raises(ValueError, match="step 0: the loss is not finite"):
        with rec.step(torch.arange(4)):
            opt.zero_grad()
            LOSS(model(X[:4]), Y[:4]).backward()
            opt.step()


def test_out_store_matches_in_memory(tmp_path):
    import numpy as np

    kms = []
    for out in [None, tmp_path / "rec"]:
        X, Y, Xq = data(seed=21)
        model = mlp(d_in=4, hidden=(6,), d_out=3, seed=21)
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        rec = pk.PathRecorder(model, opt, LOSS, (X, Y), Xq, quadrature=3, kernel="batch", out=out)
        train(model, opt, X, Y, batches(24, 6, 4), rec)
        kms.append(rec.kernel_machine())
    assert torch.equal(kms[0].contributions, kms[1].contributions)
    assert torch.equal(kms[0].path_kernel, kms[1].path_kernel)
    disk = np.load(tmp_path / "rec" / "contributions.npy", mmap_mode="r")
    assert np.array_equal(np.asarray(disk), kms[0].contributions.numpy())


def test_dense_shares_that_cannot_fit_are_refused(monkeypatch):
    import os

    model, opt, X, Y, Xq = _setup(momentum=0.9)
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda k: 1 if k == "SC_PHYS_PAGES" else real(k))
    with pytest.raises(
        ValueError, match=r"optimizer: SGD with momentum or moments needs per-example shares"
    ):
        pk.PathRecorder(model, opt, LOSS, (X, Y), Xq)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.3, weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
    ],
)
def test_parameter_without_gradient_is_skipped_like_torch(make_opt):
    """torch optimizers leave a parameter with no gradient untouched (no weight decay either)."""

    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp(d_in=4, hidden=(6,), d_out=3, seed=22)
            self.unused = nn.Parameter(torch.ones(5, dtype=torch.float64))

        def forward(self, x):
            return self.net(x)

    X, Y, Xq = data(seed=22)
    model = WithUnused()
    opt = make_opt(model.parameters())
    rec = pk.PathRecorder(model, opt, LOSS, (X, Y), Xq, quadrature=6)
    train(model, opt, X, Y, batches(24, 6, 4), rec)
    assert torch.equal(model.unused.detach(), torch.ones(5, dtype=torch.float64))
    assert rec.kernel_machine().report()["relative_error"] <= 1e-8


def test_scheduler_inside_the_block_and_step_count():
    X, Y, Xq = data(seed=23)
    model = mlp(d_in=4, hidden=(6,), d_out=3, seed=23)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    rec = pk.PathRecorder(model, opt, LOSS, (X, Y), Xq, quadrature=6)
    for idx in batches(24, 6, 5):
        with rec.step(idx):
            opt.zero_grad()
            LOSS(model(X[idx]), Y[idx]).backward()
            opt.step()
            sched.step()  # changes the lr before the recorder reads it
    assert rec.kernel_machine().report()["relative_error"] <= 1e-10
    with pytest.raises(
        pk.StepMismatchError, match=r"expected one optimizer.step\(\) inside the block, saw 0"
    ):
        with rec.step(torch.arange(3)):
            opt.zero_grad()
            LOSS(model(X[:3]), Y[:3]).backward()
