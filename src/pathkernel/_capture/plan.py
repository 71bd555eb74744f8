"""The model plan: which trainable parameters go through which factored rule, which go dense.

Every trainable parameter lands in exactly one place: a factored group (one or more modules
that share the same weight / bias, their calls concatenated as positions so cross terms
between uses are kept) or the dense list. A parameter that a rule cannot account for on its
own (tied across roles, used outside its module) goes dense; the probe (``probe.py``) checks
this numerically and moves any parameter whose factored gradient disagrees with autograd.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .rules import Rule, rule_for

IMPLEMENTATIONS = ("auto", "factored", "dense")
DENSE = -1  # group key of the parameters that no rule covers


@dataclass
class Group:
    rule: Rule
    kind: str
    modules: List[nn.Module] = field(default_factory=list)
    weight: Optional[str] = None  # parameter names, None when frozen or moved to dense
    bias: Optional[str] = None
    vocab: int = 0                # num_embeddings for embedding groups


def check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(
                f"model: BatchNorm module '{name}' is in training mode, which couples the examples "
                "of a batch (each example's output depends on the others); call model.eval() first")
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(
                f"model: Dropout module '{name}' is in training mode, which makes the kernel random; "
                "call model.eval() first")


class ModelPlan:
    def __init__(self, model: nn.Module, implementation: str = "auto"):
        check_model(model)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation: expected one of {IMPLEMENTATIONS}, got {implementation!r}")
        self.model = model
        self.implementation = implementation
        self.params: Dict[str, nn.Parameter] = {
            n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("model: has no trainable parameter (requires_grad=True); "
                             "the tangent kernel would be zero")
        name_of = {id(p): n for n, p in self.params.items()}
        self.groups: List[Group] = []
        if implementation != "dense":
            by_key: Dict[tuple, Group] = {}
            for _, m in model.named_modules():
                rule = rule_for(m)
                if rule is None:
                    continue
                w = getattr(m, rule.weight_attr, None)
                b = getattr(m, rule.bias_attr, None) if rule.bias_attr else None
                wn = name_of.get(id(w)) if isinstance(w, torch.Tensor) else None
                bn = name_of.get(id(b)) if isinstance(b, torch.Tensor) else None
                if wn is None and bn is None:
                    continue
                key = (rule.kind, wn, bn)
                g = by_key.get(key)
                if g is None:
                    g = by_key[key] = Group(rule, rule.kind, [], wn, bn,
                                            getattr(m, "num_embeddings", 0))
                g.modules.append(m)
            self.groups = list(by_key.values())
            # A parameter in two different groups (shared in different roles) goes dense.
            seen: Dict[str, int] = {}
            for g in self.groups:
                for n in (g.weight, g.bias):
                    if n is not None:
                        seen[n] = seen.get(n, 0) + 1
            self.move_to_dense([n for n, c in seen.items() if c > 1])
        self._refresh_dense()

    def _refresh_dense(self) -> None:
        covered = {n for g in self.groups for n in (g.weight, g.bias) if n is not None}
        self.dense = [n for n in self.params if n not in covered]
        if self.implementation == "factored" and self.dense:
            raise ValueError(
                "implementation: 'factored' covers nn.Linear, nn.Conv1d/2d and nn.Embedding "
                f"parameters used only by their module; these need the dense path: {self.dense}. "
                "Use implementation='auto'")

    def move_to_dense(self, names) -> None:
        names = set(names)
        if not names:
            return
        for g in self.groups:
            if g.weight in names:
                g.weight = None
            if g.bias in names:
                g.bias = None
        self.groups = [g for g in self.groups if g.weight is not None or g.bias is not None]
        self._refresh_dense()

    # ---- layout of parameter-space vectors, group by group ------------------------------------
    def group(self, k: int) -> Group:
        return self.groups[k]

    def group_keys(self) -> List[int]:
        return list(range(len(self.groups))) + ([DENSE] if self.dense else [])

    def group_names(self, k: int) -> List[str]:
        if k == DENSE:
            return list(self.dense)
        g = self.groups[k]
        return [n for n in (g.weight, g.bias) if n is not None]

    def group_size(self, k: int) -> int:
        return sum(self.params[n].numel() for n in self.group_names(k))

    def flatten_group(self, k: int, vec: Dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for n in self.group_names(k):
            v = vec.get(n)
            p = self.params[n]
            parts.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if v is None
                         else v.reshape(-1))
        return torch.cat(parts)

    def unflatten_group(self, k: int, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        out, i = {}, 0
        for n in self.group_names(k):
            p = self.params[n]
            out[n] = flat[..., i:i + p.numel()].reshape(*flat.shape[:-1], *p.shape)
            i += p.numel()
        return out

    def unflatten(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        out, i = {}, 0
        for k in self.group_keys():
            size = self.group_size(k)
            out.update(self.unflatten_group(k, flat[..., i:i + size]))
            i += size
        return out


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
