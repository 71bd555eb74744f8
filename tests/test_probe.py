"""The probe's check of the factors: one random combination of the examples' gradients must
catch factors that are wrong for one example, or that give one example's gradient to another
(which leaves their plain sum unchanged)."""

import dataclasses

import pytest
import torch

import pathkernel as pk
from models import CNN
from pathkernel._capture import probe as probe_mod
from pathkernel._capture.plan import ModelPlan
from reference import assert_close, reference_ntk


def _corrupt(how, by=1e-3):
    real = probe_mod.group_factors

    def group_factors(plan, uses, n, *a, **k):
        out = real(plan, uses, n, *a, **k)
        g = next((j for j, grp in enumerate(plan.groups) if grp.weight == "c1.weight"), None)
        if g not in out:
            return out
        f = out[g]  # the first layer's factor, batch first
        if how == "swap":  # example 0's part given to example 1 and back
            i = torch.tensor([1, 0] + list(range(2, n)))
            f = dataclasses.replace(f, A=None if f.A is None else f.A[i], D=f.D[i])
        else:  # a wrong gradient for the last example only
            D = f.D.clone()
            D[-1] *= 1 + by
            f = dataclasses.replace(f, D=D)
        out[g] = f
        return out

    return group_factors


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("how", ["swap", "scale"])
def test_wrong_factors_are_caught_and_sent_dense(monkeypatch, how, dtype):
    # in float32 too, to its precision: the check's 1e-4 is on the combination of the
    # examples, where the last of the 5 checked here weighs 1/16: an error of 1e-2 in that
    # example's gradient alone moves it by 6e-4 (float32 rounding: 1e-7 to 1e-5)
    model = CNN().double()
    x = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    probe_mod._PROBED.clear()
    clean = ModelPlan(model)
    probe_mod.probe(clean, (x,), dtype=dtype)
    first = {"c1.weight", "c1.bias"}
    assert first <= set(clean.group_of)
    probe_mod._PROBED.clear()
    by = 1e-3 if dtype == torch.float64 else 1e-2
    monkeypatch.setattr(probe_mod, "group_factors", _corrupt(how, by))
    plan = ModelPlan(model)
    probe_mod.probe(plan, (x,), dtype=dtype)
    assert first <= set(plan.dense), (first, plan.dense)
    assert plan.why[next(iter(first))].startswith("its factors do not reproduce")
    assert len(plan.dense) == len(first)  # the other groups stand
    probe_mod._PROBED.clear()


def test_clean_probe_keeps_every_group():
    model = CNN().double()
    x = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    probe_mod._PROBED.clear()
    assert pk.describe(model, x).dense_share == 0.0
    assert_close(pk.tangent_kernel(model, x), reference_ntk(model, x), torch.float64)


class RoundsInside(torch.nn.Module):
    """A float64 model that computes a norm in float32, as Llama's RMSNorm does: its
    backward rounds the gradient there, and the check must round both sides alike."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(5, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        h32 = h.float()
        h = (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype)
        return self.b(torch.tanh(h))


def test_model_that_rounds_inside_stays_factored():
    model = RoundsInside().double()
    x = torch.randn(6, 5, dtype=torch.float64)
    probe_mod._PROBED.clear()
    assert pk.describe(model, x).dense_share == 0.0


def test_a_float32_probe_does_not_serve_a_float64_kernel(monkeypatch):
    """The verdict of a float32 probe (checked to 1e-4) is kept for float32 calls only: a
    float64 call probes again, to 1e-9; a float64 verdict serves both."""
    model = CNN().double()
    x = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    probe_mod._PROBED.clear()
    runs = []
    real = probe_mod._verify
    monkeypatch.setattr(
        probe_mod,
        "_verify",
        lambda plan, state, *a: runs.append(state["c1.weight"].dtype) or real(plan, state, *a),
    )
    for dtype in (torch.float32, torch.float32, torch.float64, torch.float32, torch.float64):
        probe_mod.probe(ModelPlan(model), (x,), dtype=dtype)
    assert runs == [torch.float32, torch.float64]
    probe_mod._PROBED.clear()
    k32 = pk.tangent_kernel(model, x, dtype=torch.float32)
    assert k32.dtype == torch.float32
    assert_close(k32.double(), reference_ntk(model, x), torch.float32)


def test_probe_runs_the_model_on_one_example_and_then_two():
    """The probe's whole cost on a model with no size 2: one forward pass on one example, one
    on two (the layouts, the determinism check and the check of the factors all read these),
    and the check's two backward passes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    model = model.double()
    x = torch.randn(6, 5, dtype=torch.float64)
    sizes = []
    model.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    probe_mod._PROBED.clear()
    plan = ModelPlan(model)
    probe_mod.probe(plan, (x,))
    assert sizes == [1, 2]
    assert not plan.dense
    assert_close(pk.tangent_kernel(model, x), reference_ntk(model, x), torch.float64)
