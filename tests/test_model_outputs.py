"""Models that return what libraries return: a dict, a tuple, a Hugging Face-style
``ModelOutput`` (an ordered dict with attribute access). The built-in output modes read its
``logits`` (a tuple's first tensor); an ``outputs`` callable gets the object itself."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

import pathkernel as pk
from reference import assert_close, reference_ntk


class Output(OrderedDict):
    """What ``transformers.utils.ModelOutput`` is to a user: keys and attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Net(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.body = nn.Linear(5, 8)
        self.head = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 2)  # reaches only the second output

    def forward(self, x):
        h = torch.tanh(self.body(x))
        logits, extra = self.head(h), self.aux(h)
        if self.kind == "dict":
            return {"logits": logits, "extra": extra}
        if self.kind == "output":
            return Output(logits=logits, extra=extra)
        return logits, extra


class Plain(nn.Module):
    """The same network returning one tensor, chosen by ``pick``."""

    def __init__(self, net, pick):
        super().__init__()
        self.net, self.pick = net, pick

    def forward(self, x):
        out = self.net(x)
        return self.pick(out)


@pytest.mark.parametrize("kind", ["dict", "output", "tuple"])
def test_library_outputs(kind):
    torch.manual_seed(0)
    net = Net(kind).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    first = (lambda o: o[0]) if kind == "tuple" else (lambda o: o["logits"])
    second = (lambda o: o[1]) if kind == "tuple" else (lambda o: o["extra"])
    for mode in ("trace", "full", 1):  # the built-in modes read the logits
        ref = reference_ntk(Plain(net, first), x, outputs=mode)
        assert_close(pk.tangent_kernel(net, x, outputs=mode), ref, torch.float64)
    # a callable gets the object itself (here: a parameter only the second output reaches)
    pick = lambda o: second(o)[:, 0] - first(o)[:, 2]  # noqa: E731
    ref = reference_ntk(Plain(net, pick), x, outputs=lambda o: o)
    K = pk.tangent_kernel(net, x, outputs=pick)
    assert_close(K, ref, torch.float64)
    ck = [({k: v.clone() for k, v in net.state_dict().items()}, 0.5)]
    Kp = pk.path_kernel(net, ck, x, outputs=pick, dtype=torch.float64, progress=False)
    assert_close(Kp, 0.5 * ref, torch.float64)
    d = pk.describe(net, x, outputs=pick)
    assert {r.name for r in d.rows} >= {"aux.weight", "head.weight"}


def test_output_without_a_tensor_to_take():
    class Scores(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return {"scores": self.lin(x)}

    m, x = Scores().double(), torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="no 'logits'"):
        pk.tangent_kernel(m, x)
    K = pk.tangent_kernel(m, x, outputs=lambda o: o["scores"][:, 0])
    assert_close(K, reference_ntk(m.lin, x, outputs=0), torch.float64)
