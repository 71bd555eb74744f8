"""The model plan: which trainable parameters go through which factored rule, which go dense.

Every trainable parameter lands in exactly one place. The probe (``probe.py``) records the
uses of every parameter in a forward pass (``ops.py``) and groups them:

- a **matrix** group: a weight used only by matrix ops in one orientation (and the bias its
  ops add, when that bias is used nowhere else); its uses are concatenated along positions,
  so cross terms between uses are kept, and the group is factored or materialized by cost;
- a **sum** group: a parameter used elementwise (norms' affine parameters, added position
  embeddings), or in several roles (a tied embedding and output head): each use gives
  per-example gradients directly, which are summed;
- the **dense** list: every parameter whose gradient the recorded uses do not reproduce per
  example (the probe's check), or that no rule covers; per-example Jacobians by torch.func.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call

from .._autograd import normal_tensor
from .layout import Layout

IMPLEMENTATIONS = ("auto", "factored", "dense")
DENSE = -1  # group key of the parameters that no rule covers


@dataclass
class Group:
    kind: str  # "matrix" | "sum"
    weight: Optional[str]  # matrix: the weight; sum: the parameter
    bias: Optional[str] = None  # matrix: the bias its ops add (folded in as beta)
    shape: Tuple[int, ...] = ()  # the weight's shape
    transposed: bool = False  # matrix: its gradient is (sum_s D_s A_s^T)^T
    vocab: int = 0  # matrix: one-hot width when A holds tokens
    conv_groups: int = 1  # matrix: a grouped convolution's groups (block diagonal)
    ops: Tuple[str, ...] = ()  # the ops that use it (for describe)
    uses: int = 0  # how many uses in one forward pass

    @property
    def names(self) -> List[str]:
        return [n for n in (self.weight, self.bias) if n is not None]


@dataclass
class Trace:
    """The recorded uses of one input shape: per use, its signature and batch layout (None:
    no layout explains it, its parameters go dense)."""

    signatures: List[tuple]
    layouts: List[Optional[Layout]]
    # per plan (its dense and grouped parameters): the elements each example and channel
    # keeps, and the output channels (``extract.channel_chunks``), measured once
    sizes: Dict[tuple, Tuple[int, int]] = field(default_factory=dict)

    @property
    def expand(self) -> Dict[int, int]:
        return {i: lay.dim for i, lay in enumerate(self.layouts) if lay is not None and lay.expand}


def check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError(
                f"model: BatchNorm module '{name}' is in training mode, which couples the examples "
                "of a batch (each example's output depends on the others); call model.eval() first"
            )
        if isinstance(m, nn.Embedding) and m.max_norm is not None:  # checked before any forward
            raise ValueError(
                f"model: nn.Embedding with max_norm={m.max_norm} ('{name}') rewrites its weight "
                "during the forward pass, so its tangent kernel is not defined; use max_norm=None"
            )
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(
                f"model: Dropout module '{name}' is in training mode, which makes the kernel "
                "random; "
                "call model.eval() first"
            )


def param_signature(model: nn.Module) -> tuple:
    """What a cached verdict on ``model`` depends on: its parameters (which objects, shapes,
    dtypes, trainable or not) and its module count."""
    return tuple(
        (n, id(p), tuple(p.shape), p.dtype, p.requires_grad) for n, p in model.named_parameters()
    ) + (len(list(model.modules())),)


def input_signature(x: Sequence[torch.Tensor]) -> tuple:
    return tuple((tuple(t.shape[1:]), t.is_floating_point()) for t in x)


def call_model(model: nn.Module, x: tuple, keys: Optional[tuple] = None, state=None):
    """``model(*x)``, or ``model(**dict(zip(keys, x)))`` for inputs given as a dict; with
    ``state``, through ``functional_call`` on those parameters and buffers."""
    args, kwargs = ((), dict(zip(keys, x))) if keys else (tuple(x), {})
    if state is None:
        return model(*args, **kwargs)
    return functional_call(model, state, args, kwargs)


class ModelPlan:
    def __init__(
        self, model: nn.Module, implementation: str = "auto", keys: Optional[tuple] = None
    ):
        """``keys``: the keyword names of inputs given as a dict (``_checks.input_keys``)."""
        check_model(model)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation: expected one of {IMPLEMENTATIONS}, got {implementation!r}"
            )
        self.model = model
        self.keys = keys
        self.implementation = implementation
        self.params: Dict[str, nn.Parameter] = {
            n: p for n, p in model.named_parameters() if p.requires_grad
        }
        if not self.params:
            raise ValueError(
                "model: has no trainable parameter (requires_grad=True); "
                "the tangent kernel would be zero"
            )
        self.groups: List[Group] = []
        self.group_of: Dict[str, int] = {}
        self.dense: List[str] = list(self.params)
        self.why: Dict[str, str] = {n: "not probed" for n in self.params}
        self.traces: Dict[tuple, Trace] = {}
        self.projection = None  # a projection.Projection: features in k random dims

    def set_groups(self, groups: List[Group], why: Dict[str, str]) -> None:
        """Adopt the probe's verdict: these groups, every other parameter dense."""
        self.groups = groups
        self.group_of = {n: k for k, g in enumerate(groups) for n in g.names}
        self.dense = [n for n in self.params if n not in self.group_of]
        self.why = dict(why)
        if self.implementation == "factored" and self.dense:
            raise ValueError(
                "implementation: 'factored' needs a factored rule for every parameter; these "
                f"need the dense path: {self.dense} ({self.why[self.dense[0]]}). "
                "Use implementation='auto'"
            )

    def move_to_dense(self, names, why: str) -> None:
        names = set(names)
        if not names:
            return
        kept = []
        for g in self.groups:
            if g.weight in names or (g.kind == "sum" and g.weight in names):
                if g.bias is not None and g.bias not in names:
                    names.add(g.bias)  # a folded bias goes with its weight
                continue
            if g.bias in names:
                g.bias = None
            kept.append(g)
        self.set_groups(kept, {**self.why, **{n: why for n in names}})

    def forward(self, state: Dict[str, torch.Tensor], x: tuple):
        """The model's output on inputs ``x`` under ``state``."""
        return call_model(self.model, x, self.keys, state)

    def trace_for(self, x) -> Optional[Trace]:
        return self.traces.get(input_signature(x))

    # ---- layout of parameter-space vectors, group by group ------------------------------------
    def group(self, k: int) -> Group:
        return self.groups[k]

    def group_keys(self) -> List[int]:
        return list(range(len(self.groups))) + ([DENSE] if self.dense else [])

    def group_names(self, k: int) -> List[str]:
        return list(self.dense) if k == DENSE else self.groups[k].names

    def group_size(self, k: int) -> int:
        return sum(self.params[n].numel() for n in self.group_names(k))

    # A matrix group's vector (a materialized per-example gradient) is Z = [M^T; b] flattened,
    # M = the weight as [rows, cols] (rules.as_matrix), b its folded bias: the layout the
    # per-example gradients come out of their GEMM in, with no copy. Other groups: the
    # parameters' own layouts, concatenated.
    def _z_layout(self, k: int) -> bool:
        return k != DENSE and self.groups[k].kind == "matrix" and self.groups[k].conv_groups == 1

    def flatten_group(
        self, k: int, vec: Dict[str, torch.Tensor], lead: Tuple[int, ...] = ()
    ) -> torch.Tensor:
        """``[*lead, P_group]`` from parameter-shaped tensors ``[*lead, *shape]`` (missing: 0)."""

        def get(n):
            p = self.params[n]
            v = vec.get(n)
            return (
                torch.zeros(*lead, *p.shape, dtype=p.dtype, device=p.device)
                if v is None
                else v.reshape(*lead, *p.shape)
            )

        if not self._z_layout(k):
            return torch.cat([get(n).reshape(*lead, -1) for n in self.group_names(k)], -1)
        g = self.groups[k]
        w = get(g.weight).reshape(*lead, g.shape[0], -1)  # [*lead, shape0, rest]
        mt = w if g.transposed else w.transpose(-1, -2)  # M^T: [*lead, cols, rows]
        parts = [mt] + ([get(g.bias).reshape(*lead, 1, -1)] if g.bias is not None else [])
        return torch.cat(parts, -2).reshape(*lead, -1)

    def unflatten_group(self, k: int, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        lead = flat.shape[:-1]
        if not self._z_layout(k):
            out, i = {}, 0
            for n in self.group_names(k):
                p = self.params[n]
                out[n] = flat[..., i : i + p.numel()].reshape(*lead, *p.shape)
                i += p.numel()
            return out
        g = self.groups[k]
        rest = self.params[g.weight].numel() // g.shape[0]
        rows, cols = (rest, g.shape[0]) if g.transposed else (g.shape[0], rest)
        z = flat.reshape(*lead, -1, rows)
        mt = z[..., :cols, :]
        w = mt if g.transposed else mt.transpose(-1, -2)
        out = {g.weight: w.reshape(*lead, *g.shape)}
        if g.bias is not None:
            out[g.bias] = z[..., cols, :]
        return out

    def flatten(self, vec: Dict[str, torch.Tensor], lead: Tuple[int, ...] = ()) -> torch.Tensor:
        """``[*lead, P]`` in the plan's order and layout (groups, then the dense list)."""
        return torch.cat([self.flatten_group(k, vec, lead) for k in self.group_keys()], -1)

    def unflatten(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        out, i = {}, 0
        for k in self.group_keys():
            size = self.group_size(k)
            out.update(self.unflatten_group(k, flat[..., i : i + size]))
            i += size
        return out


def model_state(plan: ModelPlan, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Parameters and buffers for ``functional_call``, float ones cast to ``dtype``; trainable
    parameters are fresh leaves that require grad (so every covered output has a graph)."""
    state = {}
    for n, p in plan.model.named_parameters():
        t = normal_tensor(p.detach())
        t = t.to(dtype) if t.is_floating_point() else t
        state[n] = t.requires_grad_(p.requires_grad)
    for n, b in plan.model.named_buffers():
        b = normal_tensor(b)
        state[n] = b.to(dtype) if b.is_floating_point() else b
    return state


def cast_inputs(x: Sequence[torch.Tensor], dtype: torch.dtype) -> tuple:
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in x)
