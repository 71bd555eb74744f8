"""tangent_kernel against float64 per-example Jacobians contracted densely."""

import pytest
import torch
from torch import nn

import pathkernel as pk
from models import CNN, FrozenBN, SharedLinear, Tied, TinyTransformer, mlp
from reference import assert_close, reference_ntk

OUTPUTS = ["trace", "full", 1, lambda o: o[:, 0] - o[:, 1]]
OUT_IDS = ["trace", "full", "one", "margin"]


def _check(K, R, dtype):
    assert K.dtype == dtype
    assert_close(K, R, dtype)


def _cases():
    torch.manual_seed(1)
    bn = FrozenBN().double()
    with torch.no_grad():
        bn.bn.running_mean.uniform_(-1, 1)
        bn.bn.running_var.uniform_(0.5, 2)
        bn.bn.weight.uniform_(0.5, 1.5)
    bn.eval()
    return {
        "mlp": (mlp(), lambda n: torch.randn(n, 6, dtype=torch.float64)),
        "relu-mlp": (mlp(act=nn.ReLU, seed=3), lambda n: torch.randn(n, 6, dtype=torch.float64)),
        "cnn": (CNN().double(), lambda n: torch.randn(n, 1, 6, 6, dtype=torch.float64)),
        "transformer": (TinyTransformer().double().eval(), lambda n: torch.randint(0, 11, (n, 5))),
        "tied": (Tied().double(), lambda n: torch.randint(0, 7, (n, 4))),
        "shared-linear": (
            SharedLinear().double(),
            lambda n: torch.randn(n, 4, dtype=torch.float64),
        ),
        "frozen-bn": (bn, lambda n: torch.randn(n, 5, dtype=torch.float64)),
    }


CASES = _cases()


@pytest.mark.parametrize("outputs", OUTPUTS, ids=OUT_IDS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_dense_reference_float64(name, outputs):
    model, make = CASES[name]
    torch.manual_seed(2)
    x1, x2 = make(9), make(6)
    _check(
        pk.tangent_kernel(model, x1, outputs=outputs),
        reference_ntk(model, x1, None, outputs),
        torch.float64,
    )
    _check(
        pk.tangent_kernel(model, x1, x2, outputs=outputs, batch_size=4),
        reference_ntk(model, x1, x2, outputs),
        torch.float64,
    )


@pytest.mark.parametrize("name", list(CASES))
def test_float32_matches_reference(name):
    model, make = CASES[name]
    torch.manual_seed(3)
    x1, x2 = make(7), make(5)
    m32 = _float_copy(model)
    x1f = x1.float() if x1.is_floating_point() else x1
    x2f = x2.float() if x2.is_floating_point() else x2
    _check(
        pk.tangent_kernel(m32, x1f, x2f, outputs="full"),
        reference_ntk(model, x1, x2, "full"),
        torch.float32,
    )


def _float_copy(model):
    import copy

    return copy.deepcopy(model).float()


@pytest.mark.parametrize("impl", ["dense", "factored"])
def test_implementations_agree_on_mlp(impl):
    model = mlp(seed=5)
    x = torch.randn(8, 6, dtype=torch.float64)
    _check(pk.tangent_kernel(model, x, implementation=impl), reference_ntk(model, x), torch.float64)


class ExpScale(nn.Module):
    """A parameter used through exp: no factored rule covers it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.log_scale = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return self.lin(x) * torch.exp(self.log_scale)


def test_factored_refuses_uncovered_parameters():
    model = ExpScale().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(
        ValueError,
        match=r"implementation: 'factored' needs a factored rule .*"
        r"\['log_scale'\] \(used by torch.exp",
    ):
        pk.tangent_kernel(model, x, implementation="factored")
    _check(pk.tangent_kernel(model, x), reference_ntk(model, x), torch.float64)


def test_dtype_argument_sets_precision():
    model = mlp(seed=6)
    x = torch.randn(5, 6, dtype=torch.float64)
    K32 = pk.tangent_kernel(model, x, dtype=torch.float32)
    assert K32.dtype == torch.float32
    _check(K32, reference_ntk(model, x), torch.float32)


def test_symmetric_result_is_symmetric_and_matches_cross():
    model = mlp(seed=7)
    x = torch.randn(33, 6, dtype=torch.float64)
    Ks = pk.tangent_kernel(model, x, outputs="full")
    Kc = pk.tangent_kernel(model, x, x.clone(), outputs="full")
    assert torch.allclose(Ks, Kc, rtol=1e-12, atol=1e-12)
    assert torch.equal(Ks, Ks.permute(1, 0, 3, 2))


class TwoInputs(nn.Module):
    """Two input tensors, a scalar output of shape [n], a module that is called twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x, z):
        h = torch.tanh(self.a(x) + self.b(z))
        return (self.out(h) + self.out(torch.sin(h)))[:, 0]


def test_tuple_inputs_and_vector_output():
    torch.manual_seed(4)
    model = TwoInputs().double()
    x = (torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64))
    y = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
    _check(pk.tangent_kernel(model, x, y), reference_ntk(model, x, y), torch.float64)
    _check(pk.tangent_kernel(model, x), reference_ntk(model, x), torch.float64)


def test_inplace_activation_after_a_layer():
    """An in-place op on a covered layer's output must not corrupt the captured gradients."""
    torch.manual_seed(8)
    model = nn.Sequential(
        nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 2)
    ).double()
    x = torch.randn(9, 5, dtype=torch.float64)
    _check(
        pk.tangent_kernel(model, x, outputs="full"),
        reference_ntk(model, x, None, "full"),
        torch.float64,
    )


@pytest.mark.parametrize("outputs", ["full", "trace"])
def test_layers_materialized_one_at_a_time(outputs):
    """Layers better materialized are built one after the other into one reused buffer per
    side (``tangent_batches``), each accumulated before the next overwrites it: layers of
    different sizes, x1 against x2 and against itself, every output mode's channel layout."""
    from pathkernel._capture.extract import tangent_batches
    from pathkernel._drivers.tangent import prepare

    torch.manual_seed(0)
    model = CNN(c=(5, 6)).double()
    x1 = torch.randn(7, 1, 6, 6, dtype=torch.float64)
    x2 = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    plan, spec, dtype, a, b = prepare(model, x1, x2, outputs, "auto", None, None, None)
    batches = list(tangent_batches(plan, spec, dtype, a, b))
    # the factored groups, then each materialized one alone (trace: two, of different sizes)
    assert len(batches) >= (3 if outputs == "trace" else 2)
    assert_close(
        pk.tangent_kernel(model, x1, x2, outputs=outputs),
        reference_ntk(model, x1, x2, outputs=outputs),
        torch.float64,
    )
    assert_close(
        pk.tangent_kernel(model, x1, outputs=outputs),
        reference_ntk(model, x1, outputs=outputs),
        torch.float64,
    )


def test_features_come_out_contiguous():
    """Every materialized gradient is one contiguous tensor in the plan's layout, whichever
    way its channels were computed: the native core would copy a strided one at every use
    (each tile of a path kernel)."""
    from pathkernel._capture.extract import features
    from pathkernel._capture.plan import model_state
    from pathkernel._drivers.tangent import prepare

    torch.manual_seed(0)
    model = CNN(c=(5, 6)).double()
    x = torch.randn(7, 1, 6, 6, dtype=torch.float64)
    for outputs in ("trace", "full", 0):
        plan, spec, dtype, x1, _ = prepare(model, x, None, outputs, "auto", None, None, None)
        block = features(plan, spec, model_state(plan, dtype), x1, 64, "x")
        mat = [f for f in block.factors.values() if f.materialized]
        assert mat and all(f.D.is_contiguous() for f in mat), outputs


def test_trace_channels_chunked_under_the_feature_budget(monkeypatch):
    """A trace whose features would pass the budget is accumulated over chunks of output
    channels, exact; the per-example sizes that set the chunks are measured once per plan
    and input shape (a captured pass on one example), not on every call."""
    from pathkernel._capture import extract

    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    passes = []
    real = extract.run_captured
    monkeypatch.setattr(
        extract,
        "run_captured",
        lambda p, s, xs, *a: passes.append(len(xs[0])) or real(p, s, xs, *a),
    )
    chunks = extract.channel_chunks
    seen = []
    monkeypatch.setattr(
        "pathkernel._drivers.tangent.channel_chunks",
        lambda *a: seen.append(chunks(*a, budget=4096)) or seen[-1],
    )
    for _ in range(2):
        assert_close(pk.tangent_kernel(m, x), reference_ntk(m, x), torch.float64)
    assert len(seen[0]) > 1 and seen[0] == seen[1]
    assert passes.count(1) == 1  # the one-example sizing pass, on the first call only
