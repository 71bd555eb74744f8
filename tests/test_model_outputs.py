"""Models as libraries build them. Outputs: a dict, a tuple, a Hugging Face-style
``ModelOutput`` (an ordered dict with attribute access); the built-in output modes read its
``logits`` (a tuple's first tensor), an ``outputs`` callable gets the object itself. Inputs: a
dict of batch-first tensors is passed as keyword arguments (``model(**x)``) by every entry
point, the recorder, the streamed sources and the CLI."""

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


class Masked(nn.Module):
    """Takes keyword inputs as a Hugging Face encoder does: token ids and a padding mask."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 3)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.emb(input_ids)) * attention_mask[..., None]
        return Output(logits=self.lin(h.sum(1) / attention_mask.sum(1, keepdim=True)))


class Positional(nn.Module):
    """The reference's view of ``Masked``: positional inputs, a tensor out."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, ids, mask):
        return self.m(input_ids=ids, attention_mask=mask).logits


def tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (n, 5), generator=g)
    mask = torch.ones(n, 5, dtype=torch.long)
    for i in range(n):
        mask[i, 5 - i % 3 :] = 0  # right padding of 0-2 tokens
    # keys in another order than the signature's: they are passed by name
    return {"attention_mask": mask, "input_ids": ids}, (ids, mask)


def test_keyword_inputs_on_every_entry_point():
    m = Masked().double()
    ref_m = Positional(m)
    (x1, p1), (x2, p2) = tokens(6, 0), tokens(4, 1)
    for mode in ("trace", "full", 2):
        ref = reference_ntk(ref_m, p1, p2, outputs=mode)
        assert_close(pk.tangent_kernel(m, x1, x2, outputs=mode), ref, torch.float64)
    ref = reference_ntk(ref_m, p1)
    assert_close(pk.tangent_kernel(m, x1), ref, torch.float64)
    ck = [({k: v.clone() for k, v in m.state_dict().items()}, 0.5)]
    assert_close(
        pk.path_kernel(m, ck, x1, dtype=torch.float64, progress=False), 0.5 * ref, torch.float64
    )
    # numpy arrays (memory-mapped .npy files) stream block by block, by name
    xn = {k: v.numpy() for k, v in x1.items()}
    K = pk.path_kernel(m, ck, xn, memory_budget="100KB", dtype=torch.float64, progress=False)
    assert_close(K, 0.5 * ref, torch.float64)
    Kq = pk.path_kernel(m, ck, x2, x1, dtype=torch.float64, progress=False)  # query x train
    assert_close(Kq, 0.5 * reference_ntk(ref_m, p1, p2), torch.float64)
    # targets: the per-example losses' kernel
    y1 = torch.arange(6) % 3
    ce = lambda o, y: nn.functional.cross_entropy(o, y, reduction="none")  # noqa: E731
    Kt = pk.tangent_kernel(m, x1, outputs=pk.losses.cross_entropy, targets=y1)
    from reference import jacobians

    def loss_rows(i):
        return lambda o: ce(o, y1[i : i + 1]).reshape(1, 1)

    J = torch.cat(
        [jacobians(ref_m, tuple(t[i : i + 1] for t in p1), loss_rows(i)) for i in range(6)]
    )
    assert_close(Kt, torch.einsum("icp,jcp->ij", J, J), torch.float64)
    d = pk.describe(m, x1)
    assert d.dense_share == 0.0, str(d)


def test_keyword_inputs_from_a_dataset_of_dicts():
    m = Masked().double()
    x1, p1 = tokens(7, 2)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 7

        def __getitem__(self, i):
            return {k: v[i] for k, v in x1.items()}

    ck = [({k: v.clone() for k, v in m.state_dict().items()}, 1.0)]
    K = pk.path_kernel(m, ck, Items(), memory_budget="100KB", dtype=torch.float64, progress=False)
    assert_close(K, reference_ntk(Positional(m), p1), torch.float64)


def test_keyword_inputs_refused_when_they_disagree():
    m = Masked().double()
    (x1, p1), (x2, _) = tokens(4, 0), tokens(3, 1)
    with pytest.raises(ValueError, match="x2: expected the same inputs as x1"):
        pk.tangent_kernel(m, x1, p1)
    with pytest.raises(ValueError, match="x2: expected the same inputs as x1"):
        pk.tangent_kernel(m, x1, {"input_ids": x2["input_ids"]})
    with pytest.raises(TypeError, match="x1: a dict of inputs needs keyword names"):
        pk.tangent_kernel(m, {0: p1[0], 1: p1[1]})
    ck = [({k: v.clone() for k, v in m.state_dict().items()}, 1.0)]
    with pytest.raises(ValueError, match="query: expected the same inputs as train"):
        pk.path_kernel(m, ck, x1, p1, dtype=torch.float64, progress=False)
    with pytest.raises(ValueError, match="x1: the model rejects"):
        pk.tangent_kernel(m, {"input_ids": p1[0], "mask": p1[1]})


def test_recorder_with_keyword_inputs():
    m = Masked().double()
    x, _ = tokens(12, 3)
    y = torch.arange(12) % 3
    loss = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.3)
    rec = pk.PathRecorder(m, opt, lambda o, t: loss(o.logits, t), (x, y), quadrature=8)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        idx = torch.randperm(12, generator=g)[:4]
        with rec.step(idx):
            opt.zero_grad()
            loss(m(**{k: v[idx] for k, v in x.items()}).logits, y[idx]).backward()
            opt.step()
    assert rec.kernel_machine().report()["relative_error"] <= 1e-10
