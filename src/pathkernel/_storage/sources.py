"""Inputs streamed in blocks: tensors, tuples of tensors, numpy arrays, or a torch Dataset."""
from __future__ import annotations

import hashlib
from typing import Callable, Optional, Tuple

import numpy as np
import torch


class Source:
    def __init__(self, data, name: str, collate: Optional[Callable] = None):
        self.name = name
        self.dataset = None
        if isinstance(data, np.ndarray):
            data = torch.from_numpy(data)
        if isinstance(data, (tuple, list)) and data and all(isinstance(d, np.ndarray) for d in data):
            data = tuple(torch.from_numpy(d) for d in data)
        if isinstance(data, torch.Tensor):
            self.tensors: Optional[Tuple[torch.Tensor, ...]] = (data,)
        elif isinstance(data, (tuple, list)) and data and all(isinstance(d, torch.Tensor) for d in data):
            self.tensors = tuple(data)
        elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
            self.tensors = None
            self.dataset = data
            self.collate = collate or torch.utils.data.default_collate
        else:
            raise TypeError(f"{name}: expected a tensor, a tuple of tensors, a numpy array or a "
                            f"torch Dataset with __len__, got {type(data).__name__}")
        self.n = len(self.dataset) if self.dataset is not None else self.tensors[0].shape[0]
        if self.n == 0:
            raise ValueError(f"{name}: empty (0 examples)")

    def get(self, lo: int, hi: int):
        """Examples ``lo:hi`` as a tensor or tuple of tensors (batch first)."""
        if self.tensors is not None:
            part = tuple(t[lo:hi] for t in self.tensors)
            return part[0] if len(part) == 1 else part
        batch = self.collate([self.dataset[i] for i in range(lo, hi)])
        return batch

    def fingerprint(self) -> str:
        """Identifies the data for resume: a hash of the tensors, or of a Dataset's length and
        a few items (hashing a whole Dataset would read it all)."""
        h = hashlib.sha1(f"{self.name}:{self.n}".encode())
        if self.tensors is not None:
            for t in self.tensors:
                h.update(str((tuple(t.shape), t.dtype)).encode())
                h.update(t.contiguous().numpy().tobytes())
        else:
            for i in sorted({0, self.n // 2, self.n - 1}):
                item = self.collate([self.dataset[i]])
                for t in (item if isinstance(item, (tuple, list)) else (item,)):
                    h.update(torch.as_tensor(t).contiguous().numpy().tobytes())
        return h.hexdigest()
