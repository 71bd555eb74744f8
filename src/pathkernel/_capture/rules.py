"""Factored rules: how a module's per-example gradient splits into input and output factors.

A rule covers a module whose trainable weight acts linearly on (a transform of) its input at
``S`` positions: the per-example weight gradient is ``sum_s delta_s a_s^T`` with ``a_s`` read
from the module's input (``A [n, S, da]``) and ``delta_s`` the gradient of its output
(``[n, S, dd]``); the bias gradient is ``sum_s delta_s``. Everything else goes dense.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class Rule:
    """Base: ``inputs`` -> A (or int tokens for embeddings), output grad -> D."""

    kind = "linear"
    weight_attr = "weight"
    bias_attr: Optional[str] = "bias"

    def a_factor(self, module: nn.Module, inputs: tuple) -> torch.Tensor:
        raise NotImplementedError

    def d_factor(self, module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply_weight(self, module: nn.Module, A: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``[n, S, dd]``: a weight-shaped tensor ``w`` applied to each position's input factor."""
        return A @ w.reshape(w.shape[0], -1).t()

    def weight_grads(self, module: nn.Module, A: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        """Per-example, per-channel weight gradients ``[n, C, *weight.shape]`` from the factors
        ``A [n, S, da]`` and ``D [n, S, C, dd]``."""
        w = getattr(module, self.weight_attr)
        return torch.einsum("nscd,nsa->ncda", D, A).reshape(D.shape[0], D.shape[2], *w.shape)


    def weight_grad_sum(self, module: nn.Module, A: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        """The weight gradient summed over examples, from ``A [n, S, da]``, ``D [n, S, dd]``."""
        w = getattr(module, self.weight_attr)
        return torch.einsum("nsd,nsa->da", D, A).reshape(w.shape)


class LinearRule(Rule):
    def a_factor(self, module, inputs):
        x = inputs[0]
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def d_factor(self, module, grad):
        return grad.reshape(grad.shape[0], -1, grad.shape[-1])


class ConvRule(Rule):
    """Conv1d / Conv2d with groups = 1 and zero padding, through unfolded patches."""

    def __init__(self, dims: int):
        self.dims = dims

    def a_factor(self, module, inputs):
        x = inputs[0]
        k, s, d = module.kernel_size, module.stride, module.dilation
        p = module.padding
        if self.dims == 1:  # a 1-d convolution is a 2-d one of height 1
            x = x.unsqueeze(2)
            k, s, d = (1, k[0]), (1, s[0]), (1, d[0])
            p = p if isinstance(p, str) else (0, p[0])
        if isinstance(p, str):
            if p == "same":  # torch pads total // 2 before and the rest after
                pads = []
                for kk, dd in reversed(list(zip(k, d))):
                    total = dd * (kk - 1)
                    pads += [total // 2, total - total // 2]
                x = F.pad(x, pads)
            p = 0
        cols = F.unfold(x, kernel_size=k, dilation=d, padding=p, stride=s)  # [n, Cin*k, L]
        return cols.transpose(1, 2)

    def d_factor(self, module, grad):
        return grad.reshape(grad.shape[0], grad.shape[1], -1).transpose(1, 2)


class EmbeddingRule(Rule):
    """An embedding is a linear map of one-hot tokens: ``a_s . a'_s'`` is token equality."""

    kind = "embedding"
    bias_attr = None

    def a_factor(self, module, inputs):
        t = inputs[0]
        t = t.reshape(t.shape[0], -1).long()
        if module.padding_idx is not None:  # the padding row gets no gradient
            t = torch.where(t == module.padding_idx, torch.full_like(t, -1), t)
        return t

    def d_factor(self, module, grad):
        return grad.reshape(grad.shape[0], -1, grad.shape[-1])

    def apply_weight(self, module, A, w):
        valid = (A >= 0).unsqueeze(-1)
        return torch.where(valid, w[A.clamp(min=0)], torch.zeros((), dtype=w.dtype, device=w.device))

    def weight_grads(self, module, A, D):
        onehot = self.one_hot(A, module.num_embeddings, D.dtype)
        return torch.einsum("nscd,nsv->ncvd", D, onehot)

    def weight_grad_sum(self, module, A, D):
        valid = A >= 0
        out = torch.zeros(module.num_embeddings, D.shape[-1], dtype=D.dtype, device=D.device)
        return out.index_add_(0, A[valid], D[valid])

    @staticmethod
    def one_hot(tokens: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
        """``[n, S, vocab]``; tokens of -1 (padding) give a zero row."""
        oh = F.one_hot(tokens.clamp(min=0), vocab).to(dtype)
        return oh * (tokens >= 0).unsqueeze(-1).to(dtype)


def rule_for(module: nn.Module) -> Optional[Rule]:
    """The factored rule for ``module``, or None (its parameters then go dense)."""
    if isinstance(module, nn.Linear):
        return LinearRule()
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and type(module).forward in (
            nn.Conv1d.forward, nn.Conv2d.forward):
        if module.groups == 1 and module.padding_mode == "zeros":
            return ConvRule(1 if isinstance(module, nn.Conv1d) else 2)
        return None
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            raise ValueError(
                f"model: nn.Embedding with max_norm={module.max_norm} rewrites its weight during "
                "the forward pass, so its tangent kernel is not defined; use max_norm=None")
        if module.scale_grad_by_freq:
            raise ValueError(
                "model: nn.Embedding with scale_grad_by_freq=True couples the examples of a batch; "
                "use scale_grad_by_freq=False")
        return EmbeddingRule()
    return None
