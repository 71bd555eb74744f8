"""Fingerprints of what a result depends on: weights, the model's code, callables.

A resumed ``out=`` file is only as trustworthy as the check that it holds the same problem.
Names are not enough (every lambda is ``<lambda>``, a model keeps its class name when its
activation changes), so code is hashed by its bytecode, constants and the names it uses, and
a callable also by the values it captures (closure cells, defaults, bound objects, the
module globals it reads). Hashes are stable across processes of one Python version.
"""

from __future__ import annotations

import functools
import hashlib
import types
from typing import Any

import numpy as np
import torch
from torch import nn

_DEPTH = 4  # how far captured objects and called helpers are followed


def _tensor(h, t) -> None:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        t = t.float() if t.dtype == torch.bfloat16 else t
        h.update(t.contiguous().numpy().tobytes())
    else:
        h.update(str((t.shape, t.dtype.str)).encode())
        h.update(np.ascontiguousarray(t).tobytes())


def _code(h, code: types.CodeType, seen: set, depth: int, globs=None) -> None:
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            _code(h, c, seen, depth, globs)
        else:
            _value(h, c, seen, depth - 1)
    if globs is not None and depth > 0:
        for name in code.co_names:  # module-level helpers and constants the code reads
            if name in globs and not isinstance(globs[name], types.ModuleType):
                h.update(name.encode())
                _value(h, globs[name], seen, depth - 1)


def _function(h, fn, seen: set, depth: int) -> None:
    if isinstance(fn, functools.partial):
        h.update(b"partial")
        _value(h, fn.func, seen, depth)
        _value(h, fn.args, seen, depth - 1)
        _value(h, fn.keywords, seen, depth - 1)
    elif isinstance(fn, types.MethodType):
        _function(h, fn.__func__, seen, depth)
        _value(h, fn.__self__, seen, depth - 1)
    elif isinstance(fn, types.FunctionType):
        h.update(f"{fn.__module__}.{fn.__qualname__}".encode())
        _code(h, fn.__code__, seen, depth, fn.__globals__)
        for cell in fn.__closure__ or ():
            try:
                _value(h, cell.cell_contents, seen, depth - 1)
            except ValueError:  # an empty cell
                h.update(b"<empty>")
        _value(h, fn.__defaults__, seen, depth - 1)
        _value(h, fn.__kwdefaults__, seen, depth - 1)
    else:  # a builtin, or an object with __call__
        h.update(repr(type(fn)).encode() + getattr(fn, "__qualname__", "").encode())
        call = vars(type(fn)).get("__call__") or getattr(type(fn), "__call__", None)  # noqa: B004
        if isinstance(call, types.FunctionType):
            _function(h, call, seen, depth)
            _value(h, getattr(fn, "__dict__", None), seen, depth - 1)


def _value(h, v: Any, seen: set, depth: int) -> None:
    if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
        h.update(repr(v).encode())
    elif isinstance(v, (torch.Tensor, np.ndarray)):
        _tensor(h, v)
    elif isinstance(v, (torch.dtype, torch.device, slice, range, type(Ellipsis))):
        h.update(repr(v).encode())
    elif depth < 0 or id(v) in seen:
        h.update(repr(type(v)).encode())
    else:
        seen.add(id(v))
        if isinstance(v, (tuple, list, set, frozenset)):
            h.update(type(v).__name__.encode())
            items = sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v
            for x in items:
                _value(h, x, seen, depth - 1)
        elif isinstance(v, dict):
            for k in sorted(v, key=repr):
                h.update(repr(k).encode())
                _value(h, v[k], seen, depth - 1)
        elif isinstance(v, nn.Module):
            h.update(model_code(v).encode())
            for n, t in v.state_dict().items():
                h.update(n.encode())
                _tensor(h, t)
        elif isinstance(v, type):
            h.update(f"{v.__module__}.{v.__qualname__}".encode())
        elif callable(v):
            _function(h, v, seen, depth)
        else:  # an object: its type and attributes (never its address)
            h.update(repr(type(v)).encode())
            _value(h, getattr(v, "__dict__", None), seen, depth - 1)


def callable_fingerprint(fn) -> str:
    """The code of ``fn`` and of the helpers it calls, and every value it captures."""
    h = hashlib.sha1()
    _function(h, fn, set(), _DEPTH)
    return h.hexdigest()


def model_code(model: nn.Module) -> str:
    """The model's structure and code, not its weights: each module's class, settings
    (``extra_repr``), parameters' and buffers' names, shapes, dtypes and trainability, and
    the code of every forward written in Python (and of the helpers it calls)."""
    h = hashlib.sha1()
    seen: set = set()
    classes = set()
    for name, m in model.named_modules():
        cls = type(m)
        h.update(f"{name}:{cls.__module__}.{cls.__qualname__}({m.extra_repr()})".encode())
        for pn, p in m.named_parameters(recurse=False):
            h.update(str((pn, tuple(p.shape), str(p.dtype), p.requires_grad)).encode())
        for bn, b in m.named_buffers(recurse=False):
            h.update(str((bn, tuple(b.shape), str(b.dtype))).encode())
        hooks = [m._forward_pre_hooks, m._forward_hooks]
        for d in hooks:
            for fn in d.values():
                _function(h, fn, seen, 1)
        if cls not in classes:
            classes.add(cls)
            fwd = getattr(cls, "forward", None)
            if isinstance(fwd, types.FunctionType):
                _code(h, fwd.__code__, seen, 1, fwd.__globals__)
    return h.hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    """Names, shapes and values of the model's state."""
    h = hashlib.sha1()
    for n, p in model.state_dict().items():
        h.update(n.encode())
        _tensor(h, p)
    return h.hexdigest()


def state_fingerprint(state, lr) -> str:
    """A checkpoint's functional state and its weight."""
    h = hashlib.sha1(repr(float(lr)).encode())
    for n in sorted(state):
        h.update(n.encode())
        h.update(state[n].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()
