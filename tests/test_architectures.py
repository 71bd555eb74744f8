"""Real architectures: float64 tangent kernels equal the torch.func oracle in every output
mode, and the parameters go where they should (factored or elementwise, dense only where no
rule applies)."""

import pytest
import torch

import pathkernel as pk
from architectures import cases
from reference import assert_close, reference_ntk

CASES = cases()
OUTPUTS = ["trace", "full", 1, lambda o: o[:, 0] - 0.5 * o[:, 1]]
OUT_IDS = ["trace", "full", "one", "margin"]


def _inputs(make, n):
    x = make(n)
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("outputs", OUTPUTS, ids=OUT_IDS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch_func_float64(name, outputs):
    model, make, _ = CASES[name]
    torch.manual_seed(5)
    x1, x2 = _inputs(make, 7), _inputs(make, 4)
    assert_close(
        pk.tangent_kernel(model, x1, outputs=outputs),
        reference_ntk(model, x1, None, outputs),
        torch.float64,
    )
    assert_close(
        pk.tangent_kernel(model, x1, x2, outputs=outputs, batch_size=3),
        reference_ntk(model, x1, x2, outputs),
        torch.float64,
    )


@pytest.mark.parametrize("name", list(CASES))
def test_dense_only_where_no_rule_applies(name):
    model, make, allowed = CASES[name]
    d = pk.describe(model, _inputs(make, 5))
    dense = {r.name for r in d.rows if r.form == "dense"}
    assert dense == allowed, str(d)


@pytest.mark.parametrize("form", ["factored", "materialized"])
@pytest.mark.parametrize(
    "name",
    [
        "resnet",
        "vit",
        "gpt2",
        "separable-cnn",
        "conv3d",
        "lora",
        "lora-peft",
        "mha-cross",
        "lstm-deep",
    ],
)
def test_each_form_is_exact(name, form, monkeypatch):
    """Whichever form the cost model picks for a layer, the kernel is the same."""
    from pathkernel._capture import blocks

    costs = (0.0, 1.0) if form == "factored" else (1.0, 0.0)
    monkeypatch.setattr(blocks, "pair_cost", lambda *a, **k: costs)
    model, make, _ = CASES[name]
    torch.manual_seed(6)
    x1, x2 = _inputs(make, 5), _inputs(make, 3)
    for outputs in ("trace", "full"):
        assert_close(
            pk.tangent_kernel(model, x1, x2, outputs=outputs),
            reference_ntk(model, x1, x2, outputs),
            torch.float64,
        )
