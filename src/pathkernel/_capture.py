"""Capturing per-example features with torch hooks.

Forward hooks on the plan's modules record, for every call, the input factor ``A`` and the
output ``y``; the output factor ``D`` is the gradient of the kernel's function with respect to
``y``. Because examples are independent (no batch coupling, checked in ``_model``), the
gradient of the *sum* over the batch with respect to example i's ``y`` is example i's own, so
one backward pass per output channel yields every example's factors at once. Parameters
without a rule get per-example Jacobians from torch.func.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.func import functional_call, jacrev, vmap

from ._features import DENSE, Block, Factor, choose_form
from ._model import ModelPlan

CHUNK = 2048  # examples per forward/backward pass unless the caller bounds memory tighter

# model -> (its parameter signature, the parameters the probe moved to dense)
_PROBED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass
class Use:
    group: int
    module: torch.nn.Module
    a: Optional[torch.Tensor]
    y: torch.Tensor
    version: int = 0                     # y._version when recorded (in-place ops bump it)
    grad: Optional[torch.Tensor] = None  # filled by a tensor hook in recording mode


class Capture:
    """Context manager: hooks on every module of the plan (and the root in recording mode)."""

    def __init__(self, plan: ModelPlan, record_grads: bool = False, copy_outputs: bool = True):
        self.plan = plan
        self.record_grads = record_grads
        self.copy_outputs = copy_outputs
        self.uses: List[Use] = []
        self.root_outputs: List[torch.Tensor] = []
        self.root_inputs: List[tuple] = []
        self.root_grads: List[Optional[torch.Tensor]] = []
        self._handles = []

    def __enter__(self):
        for k, g in enumerate(self.plan.groups):
            for m in g.modules:
                self._handles.append(m.register_forward_hook(self._hook(k)))
        if self.record_grads:
            root = self.plan.model
            self._handles.append(root.register_forward_hook(self._root_hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _hook(self, k: int):
        g = self.plan.groups[k]

        def hook(module, args, output):
            if not torch.is_grad_enabled():
                return None
            a = g.rule.a_factor(module, args).detach() if g.weight is not None else None
            use = Use(k, module, a, output, output._version)
            self.uses.append(use)
            if self.record_grads and output.requires_grad:
                output.register_hook(lambda grad, u=use: setattr(u, "grad", grad.detach()))
            # With copies, an in-place op after the module cannot change the tensor whose
            # gradient we read; without, the caller checks the versions and retries.
            return output.clone() if self.copy_outputs else None

        return hook

    def _root_hook(self, module, args, output):
        if not torch.is_grad_enabled():
            return None
        self.root_inputs.append(args)
        self.root_outputs.append(output)
        i = len(self.root_grads)
        self.root_grads.append(None)
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda grad: self.root_grads.__setitem__(i, grad.detach()))
        return None


def model_state(plan: ModelPlan, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Parameters and buffers for ``functional_call``, float ones cast to ``dtype``; trainable
    parameters are fresh leaves that require grad (so every covered output has a graph)."""
    state = {}
    for n, p in plan.model.named_parameters():
        t = p.detach().to(dtype) if p.is_floating_point() else p.detach()
        state[n] = t.requires_grad_(p.requires_grad)
    for n, b in plan.model.named_buffers():
        state[n] = b.to(dtype) if b.is_floating_point() else b
    return state


def cast_inputs(x: Sequence[torch.Tensor], dtype: torch.dtype) -> tuple:
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in x)


def _cat(ts: List[torch.Tensor]) -> torch.Tensor:
    """Concatenate a group's calls along positions (no copy for a single call)."""
    return ts[0] if len(ts) == 1 else torch.cat(ts, 1)


def _group_factors(plan: ModelPlan, uses: List[Use], Ds: List[torch.Tensor], stacked: bool,
                   n: int) -> Dict[int, Factor]:
    """Concatenate each group's calls along positions and pick its cheaper form."""
    factors: Dict[int, Factor] = {}
    for k, g in enumerate(plan.groups):
        idx = [i for i, u in enumerate(uses) if u.group == k]
        if not idx:
            continue
        D = _cat([Ds[i] for i in idx])
        A = _cat([uses[i].a for i in idx]) if g.weight is not None else None
        f = choose_form(g, Factor(A, D, 1.0 if g.bias is not None else 0.0))
        if stacked:  # trace: the channels become one longer feature
            f.D = f.D.reshape(n, f.D.shape[1], 1, -1)
        factors[k] = f
    return factors


def _vmap_friendly_attention():
    """The math kernel of scaled_dot_product_attention: the fused CPU kernels have no vmap
    batching rule and fall back to a per-example loop (1.6x slower on tiny-transformer)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def dense_jacobian(plan: ModelPlan, state: Dict[str, torch.Tensor], x: tuple,
                   rows: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``[n, C, P_dense]`` per-example Jacobians of ``rows(model(x))`` w.r.t. the dense params."""
    names = plan.dense
    fixed = {k: v.detach() for k, v in state.items() if k not in names}
    dense = {k: state[k].detach() for k in names}

    def single(dp, *xs):
        out = functional_call(plan.model, {**fixed, **dp}, tuple(t.unsqueeze(0) for t in xs))
        return rows(out)[0]

    with _vmap_friendly_attention():
        jac = vmap(jacrev(single), in_dims=(None,) + (0,) * len(x))(dense, *x)
    n = x[0].shape[0]
    C = jac[names[0]].shape[1]
    return torch.cat([jac[k].reshape(n, C, -1) for k in names], 2)


def _output_grads(f: torch.Tensor, ys: List[torch.Tensor]) -> List[torch.Tensor]:
    """Gradients of each output channel's batch sum w.r.t. every ``y``: ``[C, *y.shape]``
    (``y.shape`` when C = 1), one vmapped backward pass for all channels."""
    if not ys:
        return []
    n, C = f.shape
    if C == 1:
        gs = torch.autograd.grad(f.sum(), ys, allow_unused=True)
        return [torch.zeros_like(y) if g is None else g for y, g in zip(ys, gs)]
    eye = torch.eye(C, dtype=f.dtype, device=f.device).unsqueeze(1).expand(C, n, C)
    try:
        gs = torch.autograd.grad(f, ys, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
    except RuntimeError:  # an op without a batching rule: one pass per channel
        per = [torch.autograd.grad(f[:, c].sum(), ys, retain_graph=c < C - 1, allow_unused=True)
               for c in range(C)]
        gs = [None if per[0][i] is None else torch.stack([p[i] for p in per])
              for i in range(len(ys))]
    return [torch.zeros((C,) + tuple(y.shape), dtype=y.dtype, device=y.device) if g is None else g
            for y, g in zip(ys, gs)]


def extract(plan: ModelPlan, spec, state: Dict[str, torch.Tensor], x: tuple) -> Block:
    """Features of one block of examples: one backward pass per output channel."""
    with Capture(plan, copy_outputs=False) as cap, torch.enable_grad():
        out = functional_call(plan.model, state, x)
    if any(u.y._version != u.version for u in cap.uses):  # modified in place downstream
        with Capture(plan) as cap, torch.enable_grad():
            out = functional_call(plan.model, state, x)
    f = spec.rows(out)
    n, C = f.shape
    uses = cap.uses
    ys = [u.y for u in uses]
    Ds = [plan.groups[u.group].rule.d_factor(u.module, g).unsqueeze(2) if C == 1 else
          torch.stack([plan.groups[u.group].rule.d_factor(u.module, g[c]) for c in range(C)], 2)
          for u, g in zip(uses, _output_grads(f, ys))]
    block = Block(n, 1 if spec.stacked else C, _group_factors(plan, uses, Ds, spec.stacked, n))
    if plan.dense:
        G = dense_jacobian(plan, state, x, spec.rows)
        if spec.stacked:
            G = G.reshape(n, 1, -1)
        block.factors[DENSE] = Factor(None, G.unsqueeze(1), 0.0, True)
    return block


def block_from_recorded(plan: ModelPlan, cap: Capture, state: Dict[str, torch.Tensor], x: tuple,
                        cotangent: torch.Tensor) -> Block:
    """Features of the gradient of the user's own loss, from a recorded backward pass:
    one channel, ``J_i^T u_i`` with ``u_i`` the loss gradient at example i's output."""
    n = cotangent.shape[0]
    Ds = []
    for u in cap.uses:
        gy = torch.zeros_like(u.y) if u.grad is None else u.grad
        Ds.append(plan.groups[u.group].rule.d_factor(u.module, gy).unsqueeze(2))
    block = Block(n, 1, _group_factors(plan, cap.uses, Ds, False, n))
    if plan.dense:
        J = dense_jacobian(plan, state, x, lambda o: o.reshape(o.shape[0], -1))
        G = torch.einsum("nc,ncp->np", cotangent.reshape(n, -1).to(J.dtype), J)
        block.factors[DENSE] = Factor(None, G[:, None, None, :], 0.0, True)
    return block


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
