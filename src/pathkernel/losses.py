"""Per-example losses for ``targets=``: ``outputs=`` callables ``(output, target) -> [n]``.

With them, a kernel is that of per-example *loss* gradients, ``∇ℓ(f(x), y)·∇ℓ(f(x'), y')``:
summed over checkpoints, TracInCP's score; TRAK's features use ``margin``. Each returns one
value per example and is written batch-generic, so it also runs on one example under vmap.
Any callable of the same form works (a label-smoothed loss, a masked sequence loss, ...).
Each reads the model's output as the built-in output modes do: a tensor, a ``ModelOutput``'s
(or dict's) ``logits``, a tuple's first tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._capture.outputs import output_tensor


def _per_example(v: torch.Tensor, n: int) -> torch.Tensor:
    return v.reshape(n, -1).sum(1)


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits ``output`` against class indices ``target``, per example.

    ``output [n, C]`` with ``target [n]``, or a sequence ``output [n, T, C]`` with
    ``target [n, T]`` (summed over positions; positions whose target is -100 count zero, as
    in ``torch.nn.functional.cross_entropy``). Class probabilities ``target [n, C]`` (soft
    labels) are accepted too.
    """
    output = output_tensor(output)
    n, C = output.shape[0], output.shape[-1]
    if target.is_floating_point() and target.shape == output.shape:  # soft labels
        v = -(target * F.log_softmax(output, -1)).sum(-1)
    else:
        v = F.cross_entropy(output.reshape(-1, C), target.reshape(-1).long(), reduction="none")
    return _per_example(v, n)


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Half the squared error, summed over the outputs of each example:
    ``½‖f(x) − y‖²`` (its output gradient is ``f(x) − y``; ``nn.MSELoss`` averages instead,
    which scales the kernel by a constant)."""
    output = output_tensor(output)
    n = output.shape[0]
    return _per_example(0.5 * (output - target.reshape(output.shape).to(output.dtype)) ** 2, n)


def margin(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """TRAK's classification margin ``log(p / (1 − p))``, ``p`` the softmax probability of the
    true class: ``f_y − logsumexp_{c≠y} f_c``, computed stably. ``output [n, C]``,
    ``target [n]`` class indices."""
    output = output_tensor(output)
    y = target.reshape(-1, 1).long()
    true = output.gather(1, y)[:, 0]
    others = output.scatter(1, y, float("-inf"))
    return true - torch.logsumexp(others, 1)
