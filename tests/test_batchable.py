"""The capture's own backward formulas for the ops whose backward vmap loops over channels
(gelu, tanh, softmax, eval batch norm): used only where the backward is batched over
output channels, the forward values the op's own, the input's gradients torch's, and a
parameter passed to such an op without a rule still recorded as touched (it goes dense)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pathkernel as pk
from pathkernel._capture.batchable import _BatchNormEval, _Gelu, _Softmax, _Tanh
from pathkernel._capture.ops import OpCapture
from reference import assert_close, reference_ntk

OPS = [
    ("gelu", lambda h: F.gelu(h), _Gelu),
    ("gelu-tanh", lambda h: F.gelu(h, approximate="tanh"), _Gelu),
    ("nn.GELU", lambda h: nn.GELU("tanh")(h), _Gelu),
    ("tanh", lambda h: torch.tanh(h), _Tanh),
    ("Tensor.tanh", lambda h: h.tanh(), _Tanh),
    ("F.tanh", lambda h: F.tanh(h), _Tanh),
    ("softmax-last", lambda h: h.softmax(-1), _Softmax),
    ("softmax-dim1", lambda h: F.softmax(h, dim=1), _Softmax),
    ("torch.softmax", lambda h: torch.softmax(h, 0), _Softmax),
    (
        "batch_norm-eval",
        lambda h: F.batch_norm(h, MEAN, VAR, WC, BC, False, 0.1, 1e-3),
        _BatchNormEval,
    ),
    ("batch_norm-eval-plain", lambda h: F.batch_norm(h, MEAN, VAR), _BatchNormEval),
]
# affine parameters of the capture (their gradients come from the factors), running stats
WC = nn.Parameter(torch.rand(5, dtype=torch.float64) + 0.5)
BC = nn.Parameter(torch.randn(5, dtype=torch.float64))
MEAN, VAR = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5


@pytest.mark.parametrize("name,op,fn", OPS, ids=[o[0] for o in OPS])
def test_batched_backward_matches_torch(name, op, fn):
    torch.manual_seed(0)
    x = (3 * torch.randn(4, 5, 6, dtype=torch.float64)).requires_grad_()
    cot = torch.randn(7, 4, 5, 6, dtype=torch.float64)  # 7 cotangents, one batched pass
    with OpCapture({id(WC): "w", id(BC): "b"}, 4, batched=True):
        y = op(x)
    assert type(y.grad_fn).__name__ == fn.__name__ + "Backward"
    ours = torch.autograd.grad(y, x, cot, is_grads_batched=True)[0]
    y0 = op(x)
    assert torch.equal(y, y0)  # the forward is the op's own
    want = torch.stack([torch.autograd.grad(y0, x, c, retain_graph=True)[0] for c in cot])
    assert torch.allclose(ours, want, rtol=1e-12, atol=1e-14)


def test_unbatched_captures_and_parameters_keep_torch_ops():
    x = torch.randn(3, 4, requires_grad=True)
    with OpCapture({}, 3):  # a single output channel: torch's own fused backward
        assert type(F.gelu(x).grad_fn).__name__ == "GeluBackward0"
    p = nn.Parameter(torch.randn(4))
    touched = {}
    with OpCapture({id(p): "p"}, 3, touched=touched, batched=True):
        assert type(torch.tanh(p).grad_fn).__name__ == "TanhBackward0"
    assert touched == {"p": {"torch.tanh"}}


class _Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.c = nn.Linear(8, 3)

    def forward(self, x):
        h = F.gelu(self.a(x), approximate="tanh")
        w = (h @ h.transpose(1, 2)).softmax(-1)
        h = torch.tanh(self.b(w @ h)) * torch.tanh(self.scale)  # tanh of a parameter: dense
        return self.c(F.gelu(h).mean(1))


@pytest.mark.parametrize("outputs", ["trace", "full", 1])
def test_kernels_through_the_batched_formulas_are_exact(outputs):
    torch.manual_seed(1)
    m = _Mixer().double()
    x1, x2 = torch.randn(5, 4, 6, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)
    d = pk.describe(m, x1)
    assert {r.name for r in d.rows if r.form == "dense"} == {"scale"}
    assert_close(
        pk.tangent_kernel(m, x1, x2, outputs=outputs),
        reference_ntk(m, x1, x2, outputs),
        torch.float64,
    )
