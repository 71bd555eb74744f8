"""Capture at the level of the operation: every use of a trainable parameter in a forward pass.

A ``TorchFunctionMode`` sees each torch function call of the forward pass. Calls that apply a
trainable parameter through an operation with a factored per-example gradient are recorded
as ``Use``s (the activation operand, the output whose gradient gives ``D``, the op's
settings), whether the call comes from the parameter's own module or not: ``linear``,
``addmm`` / ``matmul`` / ``mm`` with a parameter (or its transpose) as the right operand,
``conv1d/2d/3d`` (any groups), ``embedding``, the affine parameters of ``layer_norm`` /
``group_norm`` / ``batch_norm`` (eval) / ``instance_norm`` / ``rms_norm``, and a parameter
added to, multiplied with or expanded over activations. Transposes, reshapes and row
slices (``split`` / ``chunk`` / ``[a:b]``) of a parameter are followed. Python-level torch
functions that hide such calls behind their own ``__torch_function__`` check
(``multi_head_attention_forward``) are entered, so their in- and out-projections are seen;
fused recurrent ops are run through their cell operations (``recurrent.py``).

Every other call passes through untouched; a parameter whose gradient the recorded uses do not
explain goes to the dense path (the probe checks this per example).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import batchable, recurrent

MATRIX_OPS = ("linear", "matmul", "addmm", "conv", "embedding")
NORM_OPS = ("layer_norm", "group_norm", "batch_norm", "instance_norm", "rms_norm")
ELEMENTWISE_OPS = ("add", "mul", "expand")


@dataclass(frozen=True)
class Ref:
    """A tensor that is (a view of) trainable parameter ``name``."""

    name: str
    transposed: bool = False  # param.t() of a 2-d parameter
    rows: Optional[Tuple[int, int]] = None  # param[r0:r1] along dim 0
    shape: Optional[Tuple[int, ...]] = None  # param.reshape(shape) (elementwise uses)

    @property
    def plain(self) -> bool:
        return not self.transposed and self.rows is None and self.shape is None


@dataclass
class Use:
    """One application of a parameterized operation during a forward pass."""

    op: str  # "linear", "conv", "embedding", a norm, "add", "mul", ...
    weight: Optional[Ref]  # the matrix (or elementwise) parameter
    bias: Optional[Ref]  # a bias added by the same op (its gradient is sum of D)
    x: Optional[torch.Tensor]  # the activation operand (tokens for embedding)
    y: torch.Tensor  # the op output: D is the gradient with respect to it
    ctx: dict = field(default_factory=dict)  # the op's settings (conv stride, norm stats, ...)
    version: int = 0  # y._version when recorded (in-place ops bump it)
    grad: Optional[torch.Tensor] = None  # recording mode: the user's backward's gradient at y

    @property
    def batched(self) -> torch.Tensor:
        """The tensor whose batch layout is discovered (conv: its input's dim 0)."""
        return self.y if self.op in ELEMENTWISE_OPS else self.x

    def names(self) -> List[str]:
        return [r.name for r in (self.weight, self.bias) if r is not None]

    def signature(self) -> tuple:
        return (self.op,) + tuple(self.names())


def _key(func) -> object:
    """Handler key of a torch function (property getters are keyed by the property)."""
    owner = getattr(func, "__self__", None)
    if isinstance(owner, types.GetSetDescriptorType):
        return ("get", owner.__name__)
    return func


# torch.nn.functional functions that check for __torch_function__ themselves and hide
# parameterized calls inside: a copy whose guard is off runs their body under the mode.
_ENTER = {F.multi_head_attention_forward}
_ENTERED: Dict[object, Callable] = {}


def _in_projection_packed(q, k, v, w, b=None):
    """Attention's packed in-projection, its output split by ``split`` where torch indexes a
    stacked copy: the backward of each index zero-fills the whole ``[3, L, N, E]`` gradient,
    and the three are added up and copied back (ViT-32: 51 ms of zero-fills in a profiled
    call); the backward of ``split`` writes the ``[L, N, 3E]`` gradient once. The same
    values."""
    E = q.size(-1)
    if k is v:
        if q is k:
            return tuple(t.contiguous() for t in F.linear(q, w, b).split(E, -1))
        w_q, w_kv = w.split([E, 2 * E])
        b_q, b_kv = (None, None) if b is None else b.split([E, 2 * E])
        kv = F.linear(k, w_kv, b_kv).split(E, -1)
        return (F.linear(q, w_q, b_q),) + tuple(t.contiguous() for t in kv)
    return F._in_projection_packed(q, k, v, w, b)


def _entered(func):
    f = _ENTERED.get(func)
    if f is None:
        glob = dict(func.__globals__)
        glob["has_torch_function"] = lambda *_: False
        glob["_in_projection_packed"] = _in_projection_packed
        f = types.FunctionType(
            func.__code__, glob, func.__name__, func.__defaults__, func.__closure__
        )
        f.__kwdefaults__ = func.__kwdefaults__
        _ENTERED[func] = f
    return f


class OpCapture(TorchFunctionMode):
    """Records every ``Use`` of the tensors in ``params`` (id -> name) while active.

    ``n`` is the batch size of the forward pass; ``expand`` maps the index of a use whose
    activation does not depend on the example (broadcast position ids, a constant buffer) to
    the size-1 dim along which its output is expanded to the batch, so that its gradient is
    per example. ``touched`` (discovery) collects, per parameter, the functions that received
    it without a rule. ``record_grads`` keeps the gradient the caller's own backward pass
    sends to each output. ``batched``: the backward pass will be batched over output channels,
    so the ops whose own backward vmap loops over run with formulas it batches
    (``batchable.py``).
    """

    def __init__(
        self,
        params: Dict[int, str],
        n: int,
        expand: Optional[Dict[int, int]] = None,
        record_grads: bool = False,
        copy_outputs: bool = False,
        touched: Optional[Dict[str, set]] = None,
        batched: bool = False,
    ):
        super().__init__()
        self.batched = batched
        self.refs: Dict[int, Ref] = {i: Ref(name) for i, name in params.items()}
        self.n = n
        self.expand = expand or {}
        self.record_grads = record_grads
        self.copy_outputs = copy_outputs
        self.touched = touched
        self.uses: List[Use] = []
        self.active = True
        self._alive: list = []  # derived tensors stay alive so their ids stay unique

    # ---- helpers ---------------------------------------------------------------------------
    def ref(self, t) -> Optional[Ref]:
        return self.refs.get(id(t)) if isinstance(t, torch.Tensor) else None

    def _derive(self, out, ref: Ref):
        if isinstance(out, torch.Tensor):
            self.refs[id(out)] = ref
            self._alive.append(out)
        return out

    def _record(self, op, weight, bias, x, y, **ctx):
        k = len(self.uses)
        dim = self.expand.get(k)
        if dim is not None:  # a batch-independent activation: make its output per example
            shape = list(y.shape)
            shape[dim] = self.n
            y = y.expand(shape)
            if x is not None and op not in ELEMENTWISE_OPS:
                xs = list(x.shape)
                xs[dim] = self.n
                x = x.expand(xs)
        use = Use(op, weight, bias, None if x is None else x.detach(), y, ctx, y._version)
        self.uses.append(use)
        if self.record_grads and y.requires_grad:
            y.register_hook(lambda g, u=use: setattr(u, "grad", g.detach()))
        # the model gets a copy: an in-place op downstream (ReLU(inplace=True), `out += x`)
        # then changes the copy, and the gradient at the recorded output stays the op's own
        return y.clone() if self.copy_outputs and dim is None else y

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.active:
            return func(*args, **kwargs)
        if func in _ENTER:
            with self:
                return _entered(func)(*args, **kwargs)
        handler = _HANDLERS.get(_key(func))
        if handler is not None:
            out = handler(self, func, args, kwargs)
            if out is not NotImplemented:
                return out
        if self.touched is not None and not _inert(func):
            for a in list(args) + list(kwargs.values()):
                for t in a if isinstance(a, (list, tuple)) else (a,):
                    r = self.ref(t)
                    if r is not None:
                        self.touched.setdefault(r.name, set()).add(_func_name(func))
        return func(*args, **kwargs)


# Calls that read a parameter's metadata, not its values.
_INERT_PROPERTIES = {
    "shape",
    "dtype",
    "device",
    "ndim",
    "requires_grad",
    "is_cuda",
    "is_sparse",
    "is_quantized",
    "is_meta",
    "layout",
    "is_leaf",
    "grad_fn",
    "names",
    "is_nested",
    "_version",
    "itemsize",
    "nbytes",
    "is_mps",
    "is_xpu",
}
_INERT = {
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.numel,
    torch.Tensor.stride,
    torch.Tensor.is_floating_point,
    torch.Tensor.is_complex,
    torch.Tensor.element_size,
    torch.Tensor.__len__,
    torch.Tensor.is_contiguous,
    torch.Tensor.__hash__,
    torch.Tensor.data_ptr,
    torch.Tensor.storage_offset,
    torch.Tensor.get_device,
    torch.Tensor.__format__,
    torch.Tensor.__repr__,
    torch.numel,
}


def _inert(func) -> bool:
    owner = getattr(func, "__self__", None)
    if isinstance(owner, types.GetSetDescriptorType):
        return owner.__name__ in _INERT_PROPERTIES
    return func in _INERT


def _func_name(func) -> str:
    owner = getattr(func, "__self__", None)
    if isinstance(owner, types.GetSetDescriptorType):
        return f"Tensor.{owner.__name__}"
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    return name.replace("_VariableFunctionsClass.", "torch.").replace("TensorBase.", "Tensor.")


# ---- views of parameters ---------------------------------------------------------------------


def _transpose(mode, func, args, kwargs):
    r = mode.ref(args[0])
    if r is None or not r.plain or args[0].dim() != 2:
        return NotImplemented
    dims = tuple(args[1:]) + tuple(kwargs.values())
    if func not in (torch.Tensor.t, torch.t) and _key(func) not in (("get", "T"), ("get", "mT")):
        if len(dims) != 2 or {d % 2 for d in dims} != {0, 1}:
            return NotImplemented
    return mode._derive(func(*args, **kwargs), Ref(r.name, transposed=True))


def _permute(mode, func, args, kwargs):
    r = mode.ref(args[0])
    dims = args[1:] if len(args) > 2 else (args[1] if len(args) > 1 else kwargs.get("dims"))
    if r is None or not r.plain or args[0].dim() != 2 or tuple(d % 2 for d in dims) != (1, 0):
        return NotImplemented
    return mode._derive(func(*args, **kwargs), Ref(r.name, transposed=True))


def _row_slices(mode, func, args, kwargs):
    """split / chunk along dim 0 of a parameter: row blocks (multi-head attention)."""
    r = mode.ref(args[0])
    dim = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    if r is None or not r.plain or dim not in (0, -args[0].dim()):
        return NotImplemented
    parts = func(*args, **kwargs)
    r0 = 0
    for p in parts:
        mode._derive(p, Ref(r.name, rows=(r0, r0 + p.shape[0])))
        r0 += p.shape[0]
    return parts


def _getitem(mode, func, args, kwargs):
    r = mode.ref(args[0])
    idx = args[1]
    if r is None or not r.plain or not isinstance(idx, slice) or idx.step not in (None, 1):
        return NotImplemented
    r0, r1, _ = idx.indices(args[0].shape[0])
    return mode._derive(func(*args, **kwargs), Ref(r.name, rows=(r0, max(r0, r1))))


def _reshape(mode, func, args, kwargs):
    """view / reshape / unsqueeze / squeeze / flatten: same elements, another shape."""
    r = mode.ref(args[0])
    if r is None or not r.plain:
        return NotImplemented
    out = func(*args, **kwargs)
    return mode._derive(out, Ref(r.name, shape=tuple(out.shape)))


# ---- matrix operations ---------------------------------------------------------------------


def _matrix_ref(r: Optional[Ref], transposed: bool) -> Optional[Ref]:
    """The ref of a weight used as ``y = x W^T`` (``transposed=False``) or ``y = x W``."""
    if r is None or r.shape is not None:
        return None
    if r.transposed:
        if r.rows is not None:
            return None
        return Ref(r.name, transposed=not transposed)
    if transposed and r.rows is not None:  # a row slice of W in x @ W: rows are the A side
        return None
    return Ref(r.name, transposed=transposed, rows=r.rows)


def _bias_ref(mode, b) -> Optional[Ref]:
    r = mode.ref(b)
    return r if r is not None and r.shape is None and not r.transposed else None


def _linear(mode, func, args, kwargs):
    a = dict(zip(("input", "weight", "bias"), args), **kwargs)
    w, b = mode.ref(a.get("weight")), a.get("bias")
    wr = _matrix_ref(w, False) if w is not None else None
    br = _bias_ref(mode, b) if b is not None else None
    if (w is not None and wr is None) or (wr is None and br is None) or a["weight"].dim() != 2:
        return NotImplemented
    y = func(*args, **kwargs)
    return mode._record("linear", wr, br, a["input"], y)


def _matmul(mode, func, args, kwargs):
    x, w = args[0], args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
    r = mode.ref(w)
    if r is None or mode.ref(x) is not None or w.dim() != 2 or x.dim() < 1:
        return NotImplemented
    wr = _matrix_ref(r, True)
    if wr is None:
        return NotImplemented
    y = func(*args, **kwargs)
    return mode._record("matmul", wr, None, x, y)


def _addmm(mode, func, args, kwargs):
    a = dict(zip(("input", "mat1", "mat2"), args), **kwargs)
    if a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
        return NotImplemented
    r = mode.ref(a["mat2"])
    wr = _matrix_ref(r, True) if r is not None else None
    br = _bias_ref(mode, a["input"])
    if (
        (r is not None and wr is None)
        or mode.ref(a["mat1"]) is not None
        or (wr is None and br is None)
    ):
        return NotImplemented
    if br is not None and a["input"].dim() != 1:
        br = None
        if wr is None:
            return NotImplemented
    y = func(*args, **kwargs)
    if br is None and mode.ref(a["input"]) is not None:
        return NotImplemented
    return mode._record("addmm", wr, br, a["mat1"], y)


def _conv(dims: int):
    def handler(mode, func, args, kwargs):
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        a = dict(zip(names, args), **kwargs)
        w, b = mode.ref(a["weight"]), a.get("bias")
        wr = w if w is not None and w.plain else None
        br = _bias_ref(mode, b) if b is not None else None
        if (w is not None and wr is None) or (wr is None and br is None):
            return NotImplemented
        if a["input"].dim() != dims + 2:  # unbatched convolution: no batch dim to split
            return NotImplemented
        y = func(*args, **kwargs)
        k = tuple(a["weight"].shape[2:])
        ctx = dict(
            dims=dims,
            kernel=k,
            stride=_tuple(a.get("stride", 1), dims),
            padding=a.get("padding", 0),
            dilation=_tuple(a.get("dilation", 1), dims),
            groups=int(a.get("groups", 1)),
        )
        return mode._record("conv", wr, br, a["input"], y, **ctx)

    return handler


def _tuple(v, dims):
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * dims


def _embedding(mode, func, args, kwargs):
    names = (
        "input",
        "weight",
        "padding_idx",
        "max_norm",
        "norm_type",
        "scale_grad_by_freq",
        "sparse",
    )
    a = dict(zip(names, args), **kwargs)
    r = mode.ref(a["weight"])
    if r is None or not r.plain:
        return NotImplemented
    if a.get("max_norm") is not None:
        raise ValueError(
            f"model: embedding '{r.name}' with max_norm={a['max_norm']} rewrites its weight "
            "during the forward pass, so its tangent kernel is not defined; use max_norm=None"
        )
    if a.get("scale_grad_by_freq"):
        raise ValueError(
            f"model: embedding '{r.name}' with scale_grad_by_freq=True couples the "
            "examples of a batch; use scale_grad_by_freq=False"
        )
    y = func(*args, **kwargs)
    pad = a.get("padding_idx")
    if pad is not None and pad < 0:
        pad += a["weight"].shape[0]
    return mode._record(
        "embedding", Ref(r.name, transposed=True), None, a["input"], y, padding_idx=pad
    )


# ---- norms: the affine parameters are elementwise ----------------------------------------------


def _norm(op: str, names: tuple, channel_dim: Optional[int]):
    def handler(mode, func, args, kwargs):
        a = dict(zip(names, args), **kwargs)
        rw, rb = mode.ref(a.get("weight")), mode.ref(a.get("bias"))
        w = rw if rw is not None and rw.plain else None
        b = rb if rb is not None and rb.plain else None
        # the affine tensors are parameters of the capture (their gradients come from the
        # factors), frozen or absent: the input's gradient alone is needed
        fixed = all(
            t is None or not t.requires_grad or (r is not None and r.plain)
            for t, r in ((a.get("weight"), rw), (a.get("bias"), rb))
        )
        if w is None and b is None:
            if rw is None and rb is None and mode.batched and fixed:
                y = batchable.norm(op, a)
                return NotImplemented if y is None else y
            return NotImplemented
        if op == "batch_norm" and a.get("training"):
            raise ValueError(
                f"model: batch_norm of '{(w or b).name}' runs in training mode, which couples "
                "the examples of a batch; call model.eval() first"
            )
        y = batchable.norm(op, a) if mode.batched and fixed else None
        if y is None:
            y = func(*args, **kwargs)
        return mode._record(op, w, b, a["input"], y, args=a, channel_dim=channel_dim)

    return handler


# ---- a parameter combined elementwise with activations ----------------------------------------


def _binary(op: str):
    def handler(mode, func, args, kwargs):
        if len(args) < 2 or kwargs.get("alpha", 1) != 1:
            return NotImplemented
        r0, r1 = mode.ref(args[0]), mode.ref(args[1])
        if (
            (r0 is None) == (r1 is None)
            or not isinstance(args[0], torch.Tensor)
            or not isinstance(args[1], torch.Tensor)
        ):
            return NotImplemented
        r, other = (r0, args[1]) if r0 is not None else (r1, args[0])
        if r.transposed or r.rows is not None:
            return NotImplemented
        y = func(*args, **kwargs)
        return mode._record(op, r, None, None, y, other=other.detach() if op == "mul" else None)

    return handler


def _expand(mode, func, args, kwargs):
    r = mode.ref(args[0])
    if r is None or r.transposed or r.rows is not None:
        return NotImplemented
    y = func(*args, **kwargs)
    return mode._record("expand", r, None, None, y)


# ---- recurrent layers: their fused ops run through their cell operations -------------------


def _recurrent(kind: str, fused: bool):
    def handler(mode, func, args, kwargs):
        if fused:
            ws = args[2] if len(args) > 2 and isinstance(args[2], (list, tuple)) else ()
        else:
            ws = list(args[2:]) + [kwargs.get(k) for k in ("w_ih", "w_hh", "b_ih", "b_hh")]
        if not any(mode.ref(w) is not None for w in ws):
            return NotImplemented
        with mode:  # the cell's linear calls are seen (and recorded) like any other
            out = (recurrent.unrolled if fused else recurrent.cell)(kind, args, kwargs)
        return NotImplemented if out is None else out

    return handler


_HANDLERS: Dict[object, Callable] = {
    torch._C._nn.linear: _linear,
    torch.matmul: _matmul,
    torch.Tensor.matmul: _matmul,
    torch.Tensor.__matmul__: _matmul,
    torch.mm: _matmul,
    torch.Tensor.mm: _matmul,
    torch.addmm: _addmm,
    torch.Tensor.addmm: _addmm,
    torch.conv1d: _conv(1),
    torch.conv2d: _conv(2),
    torch.conv3d: _conv(3),
    F.embedding: _embedding,
    F.layer_norm: _norm("layer_norm", ("input", "normalized_shape", "weight", "bias", "eps"), None),
    F.group_norm: _norm("group_norm", ("input", "num_groups", "weight", "bias", "eps"), 1),
    F.batch_norm: _norm(
        "batch_norm",
        ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
        1,
    ),
    F.instance_norm: _norm(
        "instance_norm",
        (
            "input",
            "running_mean",
            "running_var",
            "weight",
            "bias",
            "use_input_stats",
            "momentum",
            "eps",
        ),
        1,
    ),
    torch.add: _binary("add"),
    torch.Tensor.add: _binary("add"),
    torch.Tensor.__add__: _binary("add"),
    torch.Tensor.__radd__: _binary("add"),
    torch.mul: _binary("mul"),
    torch.Tensor.mul: _binary("mul"),
    torch.Tensor.__mul__: _binary("mul"),
    torch.Tensor.__rmul__: _binary("mul"),
    torch.Tensor.expand: _expand,
    torch.Tensor.t: _transpose,
    torch.t: _transpose,
    torch.Tensor.transpose: _transpose,
    torch.transpose: _transpose,
    ("get", "T"): _transpose,
    ("get", "mT"): _transpose,
    torch.Tensor.permute: _permute,
    torch.Tensor.split: _row_slices,
    torch.split: _row_slices,
    torch.Tensor.chunk: _row_slices,
    torch.chunk: _row_slices,
    torch.Tensor.__getitem__: _getitem,
    torch.Tensor.view: _reshape,
    torch.Tensor.reshape: _reshape,
    torch.reshape: _reshape,
    torch.Tensor.unsqueeze: _reshape,
    torch.unsqueeze: _reshape,
    torch.Tensor.squeeze: _reshape,
    torch.squeeze: _reshape,
    torch.Tensor.flatten: _reshape,
    torch.flatten: _reshape,
}
for _f, _kind in recurrent.FUSED:
    _HANDLERS[_f] = _recurrent(_kind, True)
for _f, _kind in recurrent.CELLS:
    _HANDLERS[_f] = _recurrent(_kind, False)
_HANDLERS.update(batchable.HANDLERS)
if hasattr(F, "rms_norm"):  # torch >= 2.4
    _HANDLERS[F.rms_norm] = _norm("rms_norm", ("input", "normalized_shape", "weight", "eps"), None)
