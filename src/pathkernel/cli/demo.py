"""``pathkernel demo``: the kernel machine of a digits classifier, explained.

Trains ``digits-mlp`` (64-256-256-10, tanh) on scikit-learn's digits with minibatch SGD,
records every step with exact Gauss-Legendre quadrature on a held-out query set, and reports
how exactly the kernel machine reproduces the network, how a path-kernel SVM compares with
the network and an RBF SVM, and which training images carry some test predictions.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn

from .._drivers.recorder import PathRecorder
from .._drivers.sklearn import sklearn_kernels
from .._progress import progress_bar


def digits_mlp(seed: int, dtype: torch.dtype) -> nn.Sequential:
    """``digits-mlp``: 64-256-256-10, tanh."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
    ).to(dtype)


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise SystemExit(
            f"pathkernel demo needs {module}: pip install 'pathkernel[demo]'"
        ) from None


def run_demo(
    out: str = "pathkernel-demo",
    steps: int = 300,
    seed: int = 0,
    quadrature=4,
    batch: int = 64,
    lr: float = 0.2,
    checkpoint_every: int = 10,
    progress: bool = True,
) -> dict:
    _need("sklearn")
    _need("matplotlib")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    t_start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    digits = load_digits()
    X = digits.data / 16.0
    Xtr, Xte, ytr, yte = train_test_split(
        X, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )
    Xtr, Xte = torch.tensor(Xtr), torch.tensor(Xte)
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)
    N = Xtr.shape[0]

    model = digits_mlp(seed, torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    rec = PathRecorder(model, opt, loss_fn, (Xtr, ytr), Xte, quadrature=quadrature)
    gen = torch.Generator().manual_seed(seed)
    ckpts = []
    bar = progress_bar(progress, total=steps, desc="recording", unit="step")
    perm = torch.randperm(N, generator=gen)
    pos = 0
    for t in range(steps):
        if pos + batch > N:
            perm, pos = torch.randperm(N, generator=gen), 0
        idx = perm[pos : pos + batch]
        pos += batch
        if t % checkpoint_every == 0:  # the TracInCP-style path for the SVM kernel
            ckpts.append(
                (
                    {k: v.detach().clone().float() for k, v in model.state_dict().items()},
                    lr * min(checkpoint_every, steps - t),
                )
            )
        with rec.step(idx):
            opt.zero_grad()
            loss_fn(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
        bar.update(1)
    bar.close()
    km = rec.kernel_machine()
    t_record = time.perf_counter() - t_start

    with torch.no_grad():
        net_out = model(Xte)
    net_acc = (net_out.argmax(1) == yte).double().mean().item()
    rep = km.report()
    km_pred = km.predict()
    agree = (km_pred.argmax(1) == net_out.argmax(1)).double().mean().item()

    # Path-kernel SVM (float32 Grams, float64 accumulation) against an RBF SVM.
    m32 = digits_mlp(seed, torch.float32)
    K_fit, K_test = sklearn_kernels(m32, ckpts, Xtr.float(), Xte.float())
    scale = np.mean(np.diag(K_fit))
    pk_svm = SVC(kernel="precomputed", C=10.0).fit(K_fit / scale, ytr.numpy())
    pk_acc = float((pk_svm.predict(K_test / scale) == yte.numpy()).mean())
    rbf_acc = float(
        (
            SVC(gamma="scale").fit(Xtr.numpy(), ytr.numpy()).predict(Xte.numpy()) == yte.numpy()
        ).mean()
    )

    # Lighthouses: the training images that carry a few test predictions.
    shown = [int(i) for i in torch.randperm(len(yte), generator=gen)[:4]]
    c = km_pred.argmax(1)
    Q = km.contributions.gather(2, c.view(-1, 1, 1).expand(-1, N, 1))[..., 0]
    lighthouses = []
    for m in shown:
        order = Q[m].argsort(descending=True)
        lighthouses.append((m, order[:4].tolist(), order.flip(0)[:4].tolist()))

    files = _plots(
        out,
        K_fit,
        ytr.numpy(),
        net_out.numpy(),
        km_pred.numpy(),
        Xtr.numpy(),
        Xte.numpy(),
        ytr.numpy(),
        yte.numpy(),
        c.numpy(),
        Q.numpy(),
        lighthouses,
    )
    summary = dict(
        train=N,
        test=len(yte),
        steps=steps,
        quadrature=quadrature,
        network_accuracy=net_acc,
        km_max_abs_error=rep["max_abs_error"],
        km_relative_error=rep["relative_error"],
        km_agreement=agree,
        path_kernel_svm_accuracy=pk_acc,
        rbf_svm_accuracy=rbf_acc,
        checkpoints=len(ckpts),
        seconds=time.perf_counter() - t_start,
        record_seconds=t_record,
        files=files,
        lighthouses=lighthouses,
        labels=(ytr.numpy(), yte.numpy(), c.numpy()),
        contributions=Q,
    )
    return summary


def format_report(s: dict) -> str:
    ytr, yte, c = s["labels"]
    q = s["quadrature"]
    rule = f"Gauss-Legendre n={q}" if isinstance(q, int) else f"{q} rule (approximate)"
    lines = [
        f"pathkernel demo: digits-mlp (64-256-256-10 tanh), {s['train']} train / {s['test']} "
        f"held-out digits, {s['steps']} SGD steps, {rule}",
        "",
        f"  network test accuracy             {s['network_accuracy']:.3f}",
        f"  kernel machine vs network         max |error| {s['km_max_abs_error']:.2e} "
        f"({s['km_relative_error']:.1e} of the output change); same class on "
        f"{100 * s['km_agreement']:.1f}% of test digits",
        f"  path-kernel SVM test accuracy     {s['path_kernel_svm_accuracy']:.3f} "
        f"({s['checkpoints']} checkpoints, precomputed kernel)",
        f"  RBF SVM test accuracy             {s['rbf_svm_accuracy']:.3f}",
        "",
        "  training digits that carry a prediction (label: contribution to the predicted class):",
    ]
    Q = s["contributions"]
    for m, pos, neg in s["lighthouses"]:
        fmt = lambda ids: ", ".join(f"#{i} ({ytr[i]}: {Q[m, i]:+.3f})" for i in ids)
        lines.append(f"    test #{m} (true {yte[m]}, predicted {c[m]})")
        lines.append(f"      for:     {fmt(pos)}")
        lines.append(f"      against: {fmt(neg)}")
    lines += ["", f"  wrote {', '.join(s['files'])}", f"  took {s['seconds']:.1f} s"]
    return "\n".join(lines)


def _plots(out, K, ytr, net, kmp, Xtr, Xte, ytr_, yte, c, Q, lighthouses):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    order = np.argsort(ytr, kind="stable")
    d = np.sqrt(np.clip(np.diag(K), 1e-30, None))
    Kn = (K / d[:, None] / d[None, :])[np.ix_(order, order)]
    fig, ax = plt.subplots(figsize=(6, 5.4))
    im = ax.imshow(Kn, cmap="viridis", interpolation="nearest")
    edges = np.flatnonzero(np.diff(ytr[order])) + 0.5
    for e in edges:
        ax.axhline(e, color="w", lw=0.4)
        ax.axvline(e, color="w", lw=0.4)
    ax.set_title("Path kernel (train x train, cosine-normalized, sorted by digit)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, fraction=0.046)
    files.append(_save(fig, out, "path_kernel_heatmap.png"))

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(net.ravel(), kmp.ravel(), s=3, alpha=0.5)
    lo, hi = float(min(net.min(), kmp.min())), float(max(net.max(), kmp.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="identity")
    ax.set_xlabel("network output f(x; w_T)")
    ax.set_ylabel("kernel machine: b(x) + sum_i Q_i(x)")
    ax.set_title("Network vs kernel machine (all test digits, all 10 outputs)")
    ax.legend()
    files.append(_save(fig, out, "network_vs_kernel_machine.png"))

    k = len(lighthouses[0][1])
    fig, axes = plt.subplots(
        len(lighthouses), 1 + 2 * k, figsize=(1.3 * (1 + 2 * k), 1.6 * len(lighthouses))
    )
    for r, (m, pos, neg) in enumerate(lighthouses):
        row = axes[r]
        row[0].imshow(Xte[m].reshape(8, 8), cmap="gray_r")
        row[0].set_title(f"test: pred {c[m]}", fontsize=8)
        for j, i in enumerate(pos + neg):
            a = row[1 + j]
            a.imshow(Xtr[i].reshape(8, 8), cmap="Greens" if j < k else "Reds")
            a.set_title(f"{ytr_[i]}: {Q[m, i]:+.2f}", fontsize=7)
        for a in row:
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle(
        "Test digits and the training digits that push their prediction "
        "for (green) / against (red)",
        fontsize=9,
    )
    files.append(_save(fig, out, "lighthouses.png"))
    return files


def _save(fig, out, name):
    import matplotlib.pyplot as plt

    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
