"""``KernelMachine``: the trained model written as a sum over its training examples."""

from __future__ import annotations

from typing import Optional, Tuple

import torch


class KernelMachine:
    """``f(x; w_T) = bias(x) + sum_i contributions[x, i]``, exact up to the quadrature error.

    Attributes:
        contributions: ``[M, N, C]``, the signed share ``Q_i(x)`` of training example ``i`` in
            query ``x``'s output (the output change that example's gradients caused).
        bias: ``[M, C]``, ``b(x)``: the initial output plus the part of every update that no
            example carries (weight decay, optimizer state from before recording).
        path_kernel: ``[M, N]`` (or ``[M, N, C, C]`` for ``outputs="full"``) when the recorder
            was given ``kernel=``; else None.
        note: None, or why the machine explains fewer steps than the model took (recording
            stopped at a refused step, or the weights changed after the last recorded one).
    """

    def __init__(
        self, contributions, bias, path_kernel, *, f0, fT, steps, quadrature, step_errors, note=None
    ):
        self.contributions = contributions
        self.bias = bias
        self.path_kernel = path_kernel
        self.initial_output = f0
        self.model_output = fT
        self.steps = steps
        self.quadrature = quadrature
        self.step_errors = step_errors
        self.note = note  # why it explains fewer steps than were taken, if it does

    def predict(self) -> torch.Tensor:
        """``[M, C]``: bias + the sum of all contributions."""
        return self.bias + self.contributions.sum(1)

    @property
    def coefficients(self) -> torch.Tensor:
        """Domingos' ``a_i(x)``, ``[M, N, C]``: ``bias + sum_i a_i(x) K^p(x, x_i) = predict()``.

        With a scalar path kernel (trace, one output, or a callable) ``a_i(x) = Q_i(x) /
        K^p(x, x_i)`` channel by channel; with ``outputs="full"`` ``a_i(x)`` is the least-norm
        solution of ``K^p(x, x_i) a = Q_i(x)``. Where ``K^p(x, x_i) = 0`` (example ``i`` never
        in a batch with ``kernel="batch"``) ``Q_i(x)`` is 0 too and ``a_i(x) = 0``.
        """
        if self.path_kernel is None:
            raise ValueError(
                "coefficients: need the path kernel; create the PathRecorder with "
                "kernel='batch' or kernel='full'"
            )
        K, Q = self.path_kernel, self.contributions
        if K.dim() == 4:
            return (torch.linalg.pinv(K) @ Q.unsqueeze(-1)).squeeze(-1)
        safe = torch.where(K == 0, torch.ones_like(K), K)
        return torch.where((K == 0).unsqueeze(-1), torch.zeros_like(Q), Q / safe.unsqueeze(-1))

    def kernel_predict(self) -> torch.Tensor:
        """``bias + sum_i a_i(x) K^p(x, x_i)``: Domingos' form, equal to ``predict()``."""
        a, K = self.coefficients, self.path_kernel
        if K.dim() == 4:
            return self.bias + (K @ a.unsqueeze(-1)).squeeze(-1).sum(1)
        return self.bias + (a * K.unsqueeze(-1)).sum(1)

    def report(self) -> dict:
        """Reconstruction error against the real model on the query set."""
        pred = self.predict()
        err = (pred - self.model_output).abs().max().item()
        change = (self.model_output - self.initial_output).abs().max().item()
        return {
            "steps": self.steps,
            "quadrature": self.quadrature,
            "max_abs_error": err,
            "relative_error": err / max(change, 1e-300),
            "max_output_change": change,
            "max_step_mismatch": max(self.step_errors, default=0.0),
            "note": self.note,
        }

    def top_contributors(
        self, k: int = 5, output: Optional[int] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per query, the ``k`` training examples with the largest ``|contribution|`` (the
        "lighthouses") to output ``output`` (default: each query's predicted output).

        Returns ``(indices [M, k], values [M, k])``, signed values, largest magnitude first.
        """
        M, N, C = self.contributions.shape
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N:
            raise ValueError(f"k: expected an int in [1, {N}], got {k!r}")
        if output is None:
            c = self.predict().argmax(1)
        else:
            if not -C <= output < C:
                raise ValueError(f"output: expected an index in [0, {C}), got {output}")
            c = torch.full((M,), output % C, dtype=torch.long)
        Q = self.contributions.gather(2, c.view(M, 1, 1).expand(M, N, 1))[..., 0]
        idx = Q.abs().topk(k, dim=1).indices
        return idx, Q.gather(1, idx)
