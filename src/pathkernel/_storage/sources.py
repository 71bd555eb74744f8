"""Inputs streamed in blocks: tensors, tuples or dicts of tensors, numpy arrays, or a torch
Dataset."""

from __future__ import annotations

import hashlib
from typing import Callable, Mapping, Optional

import numpy as np
import torch

from .._checks import input_keys


class Source:
    """Examples ``lo:hi`` on demand. Numpy arrays (memory-mapped ``.npy`` files included) stay
    numpy until a block is read, so a data set larger than RAM is read block by block."""

    def __init__(
        self,
        data,
        name: str,
        collate: Optional[Callable] = None,
        like: Optional[torch.Tensor] = None,
    ):
        """``like``: a parameter of the model. Blocks go to its device (a data set on the host
        streams to a model on the GPU block by block); blocks read from numpy arrays also take
        its floating-point dtype. A dict (of tensors or arrays, or a Dataset whose items are
        dicts) names the model's keyword arguments: ``keys``, its blocks the values in that
        order."""
        self.name = name
        self.dataset = None
        self.like = like
        self.keys = input_keys(data, name)
        if self.keys:
            data = tuple(data.values())
        if isinstance(data, np.ndarray):
            data = (data,)
        arrays = (torch.Tensor, np.ndarray)
        if isinstance(data, torch.Tensor):
            self.tensors: Optional[tuple] = (data,)
        elif isinstance(data, (tuple, list)) and data and all(isinstance(d, arrays) for d in data):
            self.tensors = tuple(data)
        elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
            self.tensors = None
            self.dataset = data
            self.collate = collate or torch.utils.data.default_collate
        else:
            raise TypeError(
                f"{name}: expected a tensor, a tuple or dict of tensors, a numpy array or a "
                f"torch Dataset with __len__, got {type(data).__name__}"
            )
        self.n = len(self.dataset) if self.dataset is not None else self.tensors[0].shape[0]
        if self.n == 0:
            raise ValueError(f"{name}: empty (0 examples)")
        if self.dataset is not None:  # a Dataset of dicts: keyword inputs
            self.keys = input_keys(self.collate([self.dataset[0]]), name)

    def get(self, lo: int, hi: int):
        """Examples ``lo:hi`` as a tensor or tuple of tensors (batch first)."""
        if self.tensors is not None:
            part = tuple(
                self._from_numpy(t[lo:hi])
                if isinstance(t, np.ndarray)
                else self._to_device(t[lo:hi])
                for t in self.tensors
            )
            return part[0] if len(part) == 1 else part
        batch = self.collate([self.dataset[i] for i in range(lo, hi)])
        if isinstance(batch, Mapping):
            if tuple(batch) != self.keys:
                raise ValueError(
                    f"{self.name}: items {lo}:{hi} have keys {list(batch)}, item 0 has "
                    f"{list(self.keys or ())}"
                )
            batch = tuple(batch.values())
        if isinstance(batch, torch.Tensor):
            return self._to_device(batch)
        if isinstance(batch, (tuple, list)):
            return type(batch)(
                self._to_device(b) if isinstance(b, torch.Tensor) else b for b in batch
            )
        return batch

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.like is None or t.device == self.like.device:
            return t
        pin = t.device.type == "cpu" and self.like.device.type == "cuda"
        return (t.pin_memory() if pin else t).to(self.like.device, non_blocking=pin)

    def _from_numpy(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(a))
        if self.like is not None:
            t = t.to(self.like.device)
            if t.is_floating_point():
                t = t.to(self.like.dtype)
        return t

    def fingerprint(self) -> str:
        """Identifies the data for resume: a hash of the tensors, or of a Dataset's length and
        a few items (hashing a whole Dataset would read it all)."""
        h = hashlib.sha1(f"{self.name}:{self.n}{f':{self.keys}' if self.keys else ''}".encode())
        if self.tensors is not None:
            for t in self.tensors:
                h.update(str((tuple(t.shape), str(t.dtype).replace("torch.", ""))).encode())
                step = max(
                    1,
                    (64 << 20)
                    // max(
                        1,
                        t[:1].nbytes
                        if isinstance(t, np.ndarray)
                        else t[:1].numel() * t.element_size(),
                    ),
                )
                for lo in range(0, t.shape[0], step):  # block by block: a memmap stays on disk
                    part = t[lo : lo + step]
                    part = part if isinstance(part, np.ndarray) else part.detach().cpu().numpy()
                    h.update(np.ascontiguousarray(part).tobytes())
        else:
            for i in sorted({0, self.n // 2, self.n - 1}):
                item = self.get(i, i + 1)
                for t in item if isinstance(item, (tuple, list)) else (item,):
                    h.update(torch.as_tensor(t).detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


class WithTargets:
    """Examples and their targets (``targets=``): each block is the inputs' tensors followed by
    the targets' tensor, so the targets travel, are sliced and streamed like an input."""

    def __init__(self, inputs: Source, targets: Source):
        if targets.tensors is None or len(targets.tensors) != 1:
            raise TypeError(
                f"{targets.name}: expected one tensor or numpy array (batch first), "
                f"got {len(targets.tensors or ())} tensors"
            )
        if targets.n != inputs.n:
            raise ValueError(
                f"{targets.name}: {targets.n} targets for the {inputs.n} examples of "
                f"{inputs.name}; expected one per example"
            )
        self.inputs, self.targets = inputs, targets
        self.name, self.n, self.keys = inputs.name, inputs.n, inputs.keys

    def get(self, lo: int, hi: int) -> tuple:
        x = self.inputs.get(lo, hi)
        x = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        return x + (self.targets.get(lo, hi),)

    def fingerprint(self) -> str:
        both = self.inputs.fingerprint() + self.targets.fingerprint()
        return hashlib.sha1(both.encode()).hexdigest()


def source(data, name: str, collate=None, like=None, targets=None):
    """A ``Source`` of ``data``, paired with its ``targets`` where given."""
    src = Source(data, name, collate, like)
    if targets is None:
        return src
    return WithTargets(src, Source(targets, f"targets ({name})", None, like))
