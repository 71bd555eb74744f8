"""Bad input to the public API: a clear exception naming the argument, before heavy work."""

import pytest
import torch
from torch import nn

import pathkernel as pk
from models import mlp


@pytest.fixture
def model():
    return mlp(seed=0)


def test_not_a_module():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got function"):
        pk.tangent_kernel(lambda x: x, torch.randn(3, 6, dtype=torch.float64))


def test_wrong_feature_shape(model):
    with pytest.raises(
        ValueError, match=r"x1: the model rejects inputs of per-example shape \(5,\)"
    ):
        pk.tangent_kernel(model, torch.randn(3, 5, dtype=torch.float64))


def test_x2_feature_shape_mismatch(model):
    with pytest.raises(
        ValueError, match=r"x2: the model rejects inputs of per-example shape \(7,\)"
    ):
        pk.tangent_kernel(
            model, torch.randn(3, 6, dtype=torch.float64), torch.randn(2, 7, dtype=torch.float64)
        )


def test_shape_check_runs_once_per_shape_and_is_redone_when_it_changes(model):
    """The one-example run that names a wrong shape is not repeated for inputs of a shape
    the model already took (same parameters); a new shape or parameter is checked."""
    x = torch.randn(4, 6, dtype=torch.float64)
    runs = []
    model.register_forward_pre_hook(
        lambda m, a: runs.append(a[0].shape[0]) if not torch.is_grad_enabled() else None
    )
    pk.tangent_kernel(model, x)
    first = runs.count(1)
    pk.tangent_kernel(model, x)
    assert first >= 1 and runs.count(1) == first  # not again
    pk.tangent_kernel(model, torch.randn(9, 6, dtype=torch.float64))  # the same shape
    assert runs.count(1) == first
    lin = next(m for m in model.modules() if isinstance(m, nn.Linear))
    lin.weight = nn.Parameter(lin.weight.detach().clone())  # a new parameter: checked again
    pk.tangent_kernel(model, x)
    assert runs.count(1) > first
    with pytest.raises(ValueError, match=r"x1: the model rejects inputs of per-example shape"):
        pk.tangent_kernel(model, torch.randn(4, 5, dtype=torch.float64))


def test_integer_inputs_to_a_float_model_are_a_dtype_problem(model):
    with pytest.raises(TypeError, match=r"x1: the model rejects torch.int64 inputs .*x.float\(\)"):
        pk.tangent_kernel(model, torch.randint(0, 3, (3, 6)))


def test_inputs_of_different_sizes_where_the_model_accepts_both():
    from reference import assert_close, reference_ntk

    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 3, 3, padding=1)
            self.fc = nn.Linear(3 * 4, 2)

        def forward(self, x):
            return self.fc(nn.functional.adaptive_avg_pool2d(torch.tanh(self.c(x)), 2).flatten(1))

    torch.manual_seed(0)
    m = Pooled().double()
    x1 = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    x2 = torch.randn(3, 1, 9, 7, dtype=torch.float64)
    for outputs in ("trace", "full"):
        assert_close(
            pk.tangent_kernel(m, x1, x2, outputs=outputs),
            reference_ntk(m, x1, x2, outputs),
            torch.float64,
        )
    K = pk.path_kernel(m, [(m, 1.0)], x1, x2, dtype=torch.float64, progress=False)
    assert_close(K, reference_ntk(m, x2, x1), torch.float64)


def test_dtype_mismatch(model):
    with pytest.raises(
        TypeError, match="x1: has dtype torch.float32 but the model's parameters are torch.float64"
    ):
        pk.tangent_kernel(model, torch.randn(3, 6))


def test_bad_dtype_argument(model):
    with pytest.raises(TypeError, match="dtype: expected torch.float32 or torch.float64"):
        pk.tangent_kernel(model, torch.randn(3, 6, dtype=torch.float64), dtype=torch.float16)


def test_nan_input(model):
    x = torch.randn(4, 6, dtype=torch.float64)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"x1: contains NaN or Inf \(examples \[2\]"):
        pk.tangent_kernel(model, x)


def test_nan_gradients():
    class Sqrt(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2).double()

        def forward(self, x):
            return torch.sqrt(self.l(x) - 100.0)  # NaN everywhere

    with pytest.raises(ValueError, match="x1: the model's gradients contain NaN or Inf"):
        pk.tangent_kernel(Sqrt(), torch.randn(3, 3, dtype=torch.float64), implementation="factored")


def test_unknown_outputs(model):
    with pytest.raises(ValueError, match="outputs: expected 'trace', 'full', an int"):
        pk.tangent_kernel(model, torch.randn(3, 6, dtype=torch.float64), outputs="diag")


def test_output_index_out_of_range(model):
    with pytest.raises(
        ValueError, match="outputs: output index 3 is out of range for a model with 3 outputs"
    ):
        pk.tangent_kernel(model, torch.randn(3, 6, dtype=torch.float64), outputs=3)


def test_callable_outputs_wrong_shape(model):
    with pytest.raises(
        ValueError, match=r"outputs: the callable must return one scalar per example"
    ):
        pk.tangent_kernel(model, torch.randn(3, 6, dtype=torch.float64), outputs=lambda o: o)


def test_empty_batch(model):
    with pytest.raises(ValueError, match=r"x1: empty batch"):
        pk.tangent_kernel(model, torch.randn(0, 6, dtype=torch.float64))


def test_batchnorm_training_mode():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    with pytest.raises(
        ValueError, match=r"model: BatchNorm module '1' is in training mode.*model.eval\(\)"
    ):
        pk.tangent_kernel(m, torch.randn(5, 3, dtype=torch.float64))


def test_unknown_implementation(model):
    with pytest.raises(ValueError, match="implementation: expected one of"):
        pk.tangent_kernel(model, torch.randn(3, 6, dtype=torch.float64), implementation="fast")


def test_bad_batch_size(model):
    with pytest.raises(ValueError, match="batch_size: expected a positive int"):
        pk.tangent_kernel(model, torch.randn(3, 6, dtype=torch.float64), batch_size=0)


def test_not_a_tensor_input(model):
    with pytest.raises(TypeError, match="x1: expected a tensor, a tuple of tensors or a dict"):
        pk.tangent_kernel(model, [[1.0] * 6])


def test_no_trainable_parameters(model):
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="model: has no trainable parameter"):
        pk.tangent_kernel(model, torch.randn(3, 6, dtype=torch.float64))


def test_embedding_max_norm_refused():
    m = nn.Sequential(nn.Embedding(5, 3, max_norm=1.0), nn.Flatten(), nn.Linear(6, 1)).double()
    with pytest.raises(ValueError, match="model: nn.Embedding with max_norm=1.0"):
        pk.tangent_kernel(m, torch.randint(0, 5, (4, 2)))


def test_backend_info():
    info = pk.backend_info()
    assert info["version"] == pk.__version__
    assert "OpenBLAS" in info["blas"]
    assert info["threads"] >= 1
    assert info["cuda"] in (True, False)


class FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(3, 2)

    def forward(self, x):
        return self.l(torch.nn.functional.dropout(x, 0.5, self.training))


def test_random_forward_is_refused():
    m = FunctionalDropout().double()
    x = torch.randn(6, 3, dtype=torch.float64)
    for impl in ("auto", "dense"):
        with pytest.raises(ValueError, match="model: two forward passes on the same inputs differ"):
            pk.tangent_kernel(m, x, implementation=impl)
    with pytest.raises(ValueError, match="model: two forward passes"):
        pk.path_kernel(m, [(m.state_dict(), 1.0)], x, progress=False)
    m.eval()
    assert pk.tangent_kernel(m, x).shape == (6, 6)
    m.train()  # the check is made again when a training flag changes
    with pytest.raises(ValueError, match="model: two forward passes on the same inputs differ"):
        pk.tangent_kernel(m, x)


def test_dropout_first_seen_in_eval_then_train_is_refused():
    m = FunctionalDropout().double().eval()
    x = torch.randn(6, 3, dtype=torch.float64)
    K = pk.tangent_kernel(m, x)
    m.train()
    with pytest.raises(ValueError, match="model: two forward passes"):
        pk.tangent_kernel(m, x)
    m.eval()
    assert torch.equal(pk.tangent_kernel(m, x), K)


def test_a_model_that_couples_the_examples_of_a_batch_is_refused():
    class Centered(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(h - h.mean(0))

    m = Centered().double()
    x = torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="model: an example's output depends on the other"):
        pk.tangent_kernel(m, x)
    with pytest.raises(ValueError, match="model: an example's output depends on the other"):
        pk.path_kernel(m, [(m.state_dict(), 1.0)], x, progress=False)
    with pytest.raises(ValueError, match="model: an example's output depends on the other"):
        pk.describe(m, x)


class _Mixed(torch.nn.Module):
    """A float32 body and a float64 head (the forward casts between them)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(5, 8)
        self.head = torch.nn.Linear(8, 3).double()

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)).double())


def test_mixed_precision_model_in_its_widest_dtype():
    """Computed in float64 by default (exact against the float64 reference); a narrower
    dtype= is refused naming the wider parameters."""
    from reference import assert_close, reference_ntk

    torch.manual_seed(0)
    model, x = _Mixed(), torch.randn(6, 5)
    K = pk.tangent_kernel(model, x)
    assert K.dtype == torch.float64
    assert_close(K, reference_ntk(model, x.double()), torch.float64)
    with pytest.raises(ValueError, match=r"dtype: the model mixes .*head.weight"):
        pk.tangent_kernel(model, x, dtype=torch.float32)


def test_describe_warns_when_outputs_hardly_vary():
    """A model whose outputs barely depend on the input (random init in eval mode with default
    BatchNorm statistics, here scaled weights) gets a warning; an ordinary one none."""
    torch.manual_seed(0)
    flat = nn.Sequential(nn.Linear(4, 3)).double()
    with torch.no_grad():
        flat[0].weight.mul_(1e-12)
        flat[0].bias.fill_(1.0)
    x = torch.randn(6, 4, dtype=torch.float64)
    d = pk.describe(flat, x)
    assert len(d.warnings) == 1 and "nearly constant" in str(d)
    assert pk.describe(mlp(d_in=4), x).warnings == []
