"""Entry points run with autograd on, whatever context the caller is in.

Evaluation code is often wrapped in ``torch.no_grad()`` or ``torch.inference_mode()``; the
kernels need gradients, as torch.func's transforms do. Inference tensors handed in (inputs,
checkpoint weights created under ``inference_mode``) are copied into normal tensors, since
autograd cannot save them for backward.
"""

from __future__ import annotations

import functools

import torch


def with_autograd(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)

    return wrapper


def normal_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it when it is an inference tensor."""
    return t.clone() if t.is_inference() else t
