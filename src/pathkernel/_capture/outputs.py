"""Output modes: which function of the model output the kernel differentiates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, List, Tuple, Union

import torch

OutputsArg = Union[str, int, Callable[..., torch.Tensor]]


def output_tensor(out) -> torch.Tensor:
    """The tensor the built-in output modes read from what the model returns: a tensor; the
    ``logits`` of a Hugging Face ``ModelOutput`` (or of a dict); a tuple's first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"model: returned a {type(out).__name__} with no tensor to take as its output (no "
        "'logits'); pass outputs= a callable that selects one, e.g. "
        "outputs=lambda o: o['scores'][:, 0]"
    )


def with_output_tensor(out, t: torch.Tensor):
    """``out`` with the tensor ``output_tensor`` reads replaced by ``t``."""
    if isinstance(out, torch.Tensor):
        return t
    if isinstance(out, Mapping) and "logits" in out:
        return type(out)(**{**out, "logits": t})  # dicts and ModelOutput dataclasses
    if isinstance(out, tuple):
        return (t,) + tuple(out[1:])
    raise TypeError(f"model: cannot pass a {type(out).__name__} output to loss_fn")


def output_tensors(out) -> List[torch.Tensor]:
    """Every tensor in what the model returns (tuples, lists, dicts, ``ModelOutput``s)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in output_tensors(o)]
    return []


class OutputSpec:
    """Maps a batch of model outputs to the ``[n, C]`` rows whose Jacobians enter the kernel.

    ``stacked`` (trace) sums the C channels inside the kernel: the C output cotangents are
    stacked along the feature dimension, so the kernel has one channel.

    With ``targets``, every block of examples carries its targets as the last tensor of its
    tuple (so slicing, streaming and vmapping treat them like inputs); ``split`` separates
    them again and the callable gets ``(output, target)``.
    """

    def __init__(self, outputs: OutputsArg, targets: bool = False):
        self.targets = targets
        if targets and (isinstance(outputs, (str, int)) or not callable(outputs)):
            raise ValueError(
                "outputs: with targets=, expected a callable (output, target) -> one scalar "
                "per example, e.g. pathkernel.losses.cross_entropy, mse or margin; "
                f"got {outputs!r}"
            )
        if isinstance(outputs, bool) or not (
            outputs in ("trace", "full")
            if isinstance(outputs, str)
            else isinstance(outputs, int) or callable(outputs)
        ):
            raise ValueError(
                "outputs: expected 'trace', 'full', an int (one output) or a callable mapping the "
                f"model output to one scalar per example, got {outputs!r}"
            )
        self.outputs = outputs
        self.stacked = outputs == "trace"
        self.full = outputs == "full"
        # every output channel: the backward pass is batched over them (unless there is one)
        self.many = self.stacked or self.full

    def split(self, x: tuple) -> Tuple[tuple, tuple]:
        """(model inputs, targets) of a block of examples."""
        return (x[:-1], x[-1:]) if self.targets else (x, ())

    def rows(self, out: torch.Tensor, targets: tuple = ()) -> torch.Tensor:
        """``[n, C]`` from the model output (batch first) and the block's targets."""
        if callable(self.outputs) and not isinstance(self.outputs, str):
            first = output_tensors(out)  # the callable gets what the model returned
            n = first[0].shape[0] if first and first[0].dim() > 0 else 0
            h = self.outputs(out, *targets)
            if not isinstance(h, torch.Tensor) or h.reshape(-1).shape[0] != n:
                got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                raise ValueError(
                    f"outputs: the callable must return one scalar per example "
                    f"(shape ({n},)), got {got}"
                )
            return h.reshape(n, 1)
        out = output_tensor(out)
        n = out.shape[0] if out.dim() > 0 else 0
        f = out.reshape(n, -1)
        if isinstance(self.outputs, int):
            C = f.shape[1]
            if not -C <= self.outputs < C:
                raise ValueError(
                    f"outputs: output index {self.outputs} is out of range for a model "
                    f"with {C} outputs"
                )
            return f[:, self.outputs : self.outputs + 1 if self.outputs != -1 else None]
        return f

    def finish(self, K: torch.Tensor) -> torch.Tensor:
        """``[n1, n2, C1, C2]`` from the accumulator -> the public shape."""
        return K if self.full else K[:, :, 0, 0]
