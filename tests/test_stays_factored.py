"""What used to push parameters onto the dense path keeps them factored, and the kernel exact:
in-place operations downstream of a captured op (ReLU(inplace=True), Hardswish(inplace),
``out += identity``), and a gradient that is zero but for rounding (a key bias under softmax)."""

import pytest
import torch
from torch import nn

import pathkernel as pk
from reference import assert_close, reference_ntk


class Residual(nn.Module):
    """A torchvision-style basic block: conv, eval BatchNorm, ``out += x``, in-place ReLU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += x
        out = self.relu(out)
        return self.fc(out.flatten(1))


def _residual():
    m = Residual().double().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.weight.uniform_(0.5, 2)
    return m, torch.randn(6, 3, 4, 4, dtype=torch.float64)


def _mlp():
    m = nn.Sequential(
        nn.Linear(4, 8),
        nn.ReLU(inplace=True),
        nn.Linear(8, 3),
        nn.Hardswish(inplace=True),
        nn.Linear(3, 2),
    ).double()
    return m, torch.randn(6, 4, dtype=torch.float64)


@pytest.mark.parametrize("make", [_mlp, _residual], ids=["mlp", "residual"])
def test_inplace_ops_stay_factored_and_exact(make):
    torch.manual_seed(0)
    model, x = make()
    d = pk.describe(model, x)
    assert d.dense_share == 0.0, str(d)
    assert_close(
        pk.tangent_kernel(model, x, outputs="full"),
        reference_ntk(model, x, outputs="full"),
        torch.float64,
    )
    ck = [({k: v.clone() for k, v in model.state_dict().items()}, 0.3)]
    K = pk.path_kernel(model, ck, x, dtype=torch.float64, progress=False)
    assert_close(K, 0.3 * reference_ntk(model, x), torch.float64)


class KeyBias(nn.Module):
    """Attention with a key bias: softmax is invariant to it, so its gradient is zero."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (
            nn.Linear(8, 8),
            nn.Linear(8, 8),
            nn.Linear(8, 8),
            nn.Linear(8, 2),
        )

    def forward(self, x):
        w = (self.q(x) @ self.k(x).transpose(1, 2)).softmax(-1)
        return self.o((w @ self.v(x)).mean(1))


def test_zero_gradient_parameter_stays_factored():
    torch.manual_seed(0)
    model, x = KeyBias().double(), torch.randn(5, 6, 8, dtype=torch.float64)
    assert pk.describe(model, x).dense_share == 0.0
    assert_close(
        pk.tangent_kernel(model, x, outputs="full"),
        reference_ntk(model, x, outputs="full"),
        torch.float64,
    )
