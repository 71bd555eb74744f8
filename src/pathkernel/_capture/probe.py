"""The float64 probe: every factored parameter must reproduce autograd's gradient."""
from __future__ import annotations

import weakref
from typing import Dict

import torch
from torch.func import functional_call

from .hooks import Capture
from .plan import ModelPlan, cast_inputs, model_state

# model -> (its parameter signature, the parameters the probe moved to dense)
_PROBED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def probe(plan: ModelPlan, x: tuple, seed: int = 0) -> None:
    """Move to the dense path every factored parameter whose gradient the factors do not
    reproduce (tied in another role, used outside its module, a subclass that changes the
    forward). Checked in float64 on a few examples with a random output cotangent."""
    if not plan.groups:
        return
    sig = tuple((n, id(p), tuple(p.shape), p.requires_grad)
                for n, p in plan.model.named_parameters()) + (len(list(plan.model.modules())),)
    hit = _PROBED.get(plan.model)
    if hit is not None and hit[0] == sig:  # same model, same parameters: same verdict
        plan.move_to_dense(hit[1])
        return
    state = model_state(plan, torch.float64)
    x = cast_inputs(x, torch.float64)
    with Capture(plan) as cap, torch.enable_grad():
        out = functional_call(plan.model, state, x)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model: expected the model to return a tensor, got {type(out).__name__}")
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    names = [n for g in plan.groups for n in (g.weight, g.bias) if n is not None]
    ys = [u.y for u in cap.uses]
    grads = torch.autograd.grad((out * r).sum(), ys + [state[n] for n in names], allow_unused=True)
    gy, gp = grads[:len(ys)], dict(zip(names, grads[len(ys):]))
    recon: Dict[str, torch.Tensor] = {}
    for u, g_out in zip(cap.uses, gy):
        g = plan.groups[u.group]
        if g_out is None:
            continue
        D = g.rule.d_factor(u.module, g_out)
        if g.weight is not None:
            w = g.rule.weight_grads(u.module, u.a, D.unsqueeze(2)).sum((0, 1))
            recon[g.weight] = recon.get(g.weight, 0) + w
        if g.bias is not None:
            recon[g.bias] = recon.get(g.bias, 0) + D.sum((0, 1))
    bad = []
    for n in names:
        auto = gp[n] if gp[n] is not None else torch.zeros_like(state[n])
        mine = recon.get(n, torch.zeros_like(auto))
        if (mine - auto).norm() > 1e-9 * max(auto.norm().item(), 1e-30) + 1e-300:
            bad.append(n)
    plan.move_to_dense(bad)
    _PROBED[plan.model] = (sig, bad)
