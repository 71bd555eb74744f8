"""Entry points work inside torch.no_grad() and torch.inference_mode(), as torch.func does,
and on inference tensors."""

import pytest
import torch

import pathkernel as pk
from models import mlp

CONTEXTS = [torch.no_grad, torch.inference_mode]


@pytest.mark.parametrize("context", CONTEXTS, ids=["no_grad", "inference_mode"])
def test_entry_points_inside_contexts(context):
    model = mlp(seed=1)
    x = torch.randn(6, 6, dtype=torch.float64)
    ck = [(model.state_dict(), 0.5)]
    K = pk.tangent_kernel(model, x)
    P = pk.path_kernel(model, ck, x, dtype=torch.float64, progress=False)
    with context():
        assert torch.equal(pk.tangent_kernel(model, x), K)
        assert torch.equal(pk.path_kernel(model, ck, x, dtype=torch.float64, progress=False), P)
        assert len(pk.plan(model, ck, x).tiles) >= 1
        assert pk.describe(model, x).dense_share == 0.0
        xi = x.clone()  # an inference tensor under inference_mode
        ckpt = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.equal(pk.tangent_kernel(model, xi), K)
    assert torch.equal(
        pk.path_kernel(model, [(ckpt, 0.5)], xi, dtype=torch.float64, progress=False), P
    )


def test_recorder_built_under_no_grad():
    model = mlp(seed=2)
    X = torch.randn(8, 6, dtype=torch.float64)
    Y = torch.randint(0, 3, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.CrossEntropyLoss()
    with torch.no_grad():
        rec = pk.PathRecorder(model, opt, loss, (X, Y))
    with rec.step(torch.arange(4)):
        opt.zero_grad()
        loss(model(X[:4]), Y[:4]).backward()
        opt.step()
    with torch.inference_mode():
        km = rec.kernel_machine()
    assert km.report()["relative_error"] <= 1e-10
