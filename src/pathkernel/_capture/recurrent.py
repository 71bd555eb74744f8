"""Recurrent layers through their cell operations, so that their weights are captured.

``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` call one fused op (``torch.lstm``, ``torch.gru``,
``torch.rnn_tanh`` / ``rnn_relu``) and the cell modules one fused cell op: no ``linear`` call
is seen, so their weights would go to the dense path. Yet each weight is a linear map applied
at every step: ``W_ih`` to the layer's input sequence (one ``linear`` over all steps at once)
and ``W_hh`` (``W_hr``) to the hidden state of each step. Run under the capture, the
recurrence below makes exactly those calls, and the plan concatenates a weight's uses along
positions (one matrix group per weight, its bias folded in), so every weight is factored or
materialized like any other linear layer. The arithmetic is PyTorch's, gate for gate.

Packed sequences and dropout between layers in training mode are left to the fused op (and so
to the dense path, or to the determinism check).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def _lstm_cell(gi, h, c, w_hh, b_hh, w_hr):
    """One LSTM step from the input part of its gates ``gi``; PyTorch's gate order i, f, g, o."""
    i, f, g, o = (gi + F.linear(h, w_hh, b_hh)).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return (h if w_hr is None else F.linear(h, w_hr)), c


def _gru_cell(gi, h, w_hh, b_hh):
    """One GRU step; gate order r, z, n, with ``r`` applied to the hidden part of ``n``."""
    ir, iz, i_n = gi.chunk(3, -1)
    hr, hz, h_n = F.linear(h, w_hh, b_hh).chunk(3, -1)
    r = torch.sigmoid(ir + hr)
    z = torch.sigmoid(iz + hz)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def _rnn_cell(gi, h, w_hh, b_hh, act):
    return act(gi + F.linear(h, w_hh, b_hh))


def _layer(kind: str, x, state, weights, reverse: bool):
    """One direction of one layer over a batch-first sequence ``x`` ``[N, T, I]``."""
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    gi = F.linear(x, w_ih, b_ih)  # every step's input part at once: one use, T positions
    steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    outs: List[Optional[torch.Tensor]] = [None] * x.shape[1]
    h, c = state
    for t in steps:
        if kind == "lstm":
            h, c = _lstm_cell(gi[:, t], h, c, w_hh, b_hh, w_hr)
        elif kind == "gru":
            h = _gru_cell(gi[:, t], h, w_hh, b_hh)
        else:
            h = _rnn_cell(gi[:, t], h, w_hh, b_hh, torch.tanh if kind == "rnn_tanh" else F.relu)
        outs[t] = h
    return torch.stack(outs, 1), h, c


def _split_weights(params: Sequence, has_biases: bool, layers: int, dirs: int):
    """``_flat_weights`` per layer and direction: (w_ih, w_hh, b_ih, b_hh, w_hr)."""
    per = len(params) // (layers * dirs)
    out = []
    for k in range(layers * dirs):
        p = list(params[k * per : (k + 1) * per])
        w_ih, w_hh = p[0], p[1]
        b_ih, b_hh = (p[2], p[3]) if has_biases else (None, None)
        w_hr = p[4 if has_biases else 2] if per == 2 + 2 * has_biases + 1 else None
        out.append((w_ih, w_hh, b_ih, b_hh, w_hr))
    return out


def unrolled(kind: str, args: tuple, kwargs: dict) -> Optional[tuple]:
    """``torch.lstm`` / ``gru`` / ``rnn_tanh`` / ``rnn_relu`` (the padded-input overload) run
    step by step; None where the fused op must run instead (packed input, random dropout)."""
    names = ("input", "hx", "params", "has_biases", "num_layers", "dropout", "train",
             "bidirectional", "batch_first")  # fmt: skip
    if len(args) > 1 and isinstance(args[1], torch.Tensor) and kind == "lstm":
        return None  # lstm(data, batch_sizes, ...): a packed sequence
    if len(args) > 2 and isinstance(args[2], torch.Tensor):
        return None  # gru / rnn (data, batch_sizes, hx, ...): a packed sequence
    a = dict(zip(names, args), **kwargs)
    if "params" not in a or not isinstance(a["params"], (list, tuple)):
        return None
    layers, dirs = int(a["num_layers"]), 2 if a["bidirectional"] else 1
    if a["train"] and a["dropout"] > 0 and layers > 1:
        return None
    x = a["input"]
    if x.dim() != 3:
        return None
    x = x if a["batch_first"] else x.transpose(0, 1)
    weights = _split_weights(a["params"], bool(a["has_biases"]), layers, dirs)
    if kind == "lstm":
        h0, c0 = a["hx"]
    else:
        h0, c0 = a["hx"], None
    hs, cs = [], []
    for layer in range(layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            state = (h0[k], None if c0 is None else c0[k])
            out, h, c = _layer(kind, x, state, weights[k], reverse=d == 1)
            outs.append(out)
            hs.append(h)
            cs.append(c)
        x = outs[0] if dirs == 1 else torch.cat(outs, -1)
    y = x if a["batch_first"] else x.transpose(0, 1)
    if kind == "lstm":
        return y, torch.stack(hs), torch.stack(cs)
    return y, torch.stack(hs)


def cell(kind: str, args: tuple, kwargs: dict):
    """``torch.lstm_cell`` / ``gru_cell`` / ``rnn_tanh_cell`` / ``rnn_relu_cell`` as calls."""
    names = ("input", "hx", "w_ih", "w_hh", "b_ih", "b_hh")
    a = dict(zip(names, args), **kwargs)
    gi = F.linear(a["input"], a["w_ih"], a.get("b_ih"))
    w_hh, b_hh = a["w_hh"], a.get("b_hh")
    if kind == "lstm":
        h, c = a["hx"]
        return _lstm_cell(gi, h, c, w_hh, b_hh, None)
    if kind == "gru":
        return _gru_cell(gi, a["hx"], w_hh, b_hh)
    return _rnn_cell(gi, a["hx"], w_hh, b_hh, torch.tanh if kind == "rnn_tanh" else F.relu)


FUSED: Tuple[Tuple[object, str], ...] = (
    (torch.lstm, "lstm"),
    (torch.gru, "gru"),
    (torch.rnn_tanh, "rnn_tanh"),
    (torch.rnn_relu, "rnn_relu"),
)
CELLS: Tuple[Tuple[object, str], ...] = (
    (torch.lstm_cell, "lstm"),
    (torch.gru_cell, "gru"),
    (torch.rnn_tanh_cell, "rnn_tanh"),
    (torch.rnn_relu_cell, "rnn_relu"),
)
