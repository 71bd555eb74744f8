"""Real architectures in miniature (random initialisation, no downloads).

Each one exercises parameter uses that a module-level rule would miss: attention's packed
in-projection and its out-projection (functional calls inside ``multi_head_attention_forward``,
sequence-first), GPT-2's ``Conv1D`` (``addmm`` on a flattened batch), position ids broadcast
over the batch, a tied output head, norms' affine parameters, grouped, depthwise and 3-d
convolutions, LoRA matrices applied with ``matmul``, a layer applied to a constant buffer,
recurrent layers (fused LSTM / GRU / RNN ops, deep, bidirectional, sequence-first, projected,
and the cell modules in a loop), and torchvision's MobileNetV3-small layers (in-place
activations and residual sums).
"""

import torch
from torch import nn

from pathkernel.bench.architectures import (
    Encoder,
    GPT2Style,
    LoRAClassifier,
    Recurrent,
    ResNet,
    SeparableCNN,
    ViT,
    mobilenet_v3_small,
    randomize_norm_stats,
)


class SelfAttention(nn.Module):
    """nn.MultiheadAttention, sequence first inside (batch_first=False), key padding mask."""

    def __init__(self, d=8, heads=2, bias_kv=False, batch_first=False):
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(d, heads, add_bias_kv=bias_kv, batch_first=batch_first)
        self.out = nn.Linear(d, 2)

    def forward(self, x):
        h = x if self.batch_first else x.transpose(0, 1)
        mask = x[..., 0] > 1.5  # some keys hidden, per example
        mask[:, 0] = False
        a = self.attn(h, h, h, key_padding_mask=mask, need_weights=False)[0]
        a = a if self.batch_first else a.transpose(0, 1)
        return self.out(torch.tanh(a).mean(1))


class CrossAttention(nn.Module):
    """Queries from one sequence, keys and values from another (k is v, packed weight split)
    and, with kdim != embed_dim, separate projection weights."""

    def __init__(self, d=8, heads=2, kdim=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, kdim=kdim, vdim=kdim, batch_first=True)
        self.mem = nn.Linear(5, kdim or d)
        self.out = nn.Linear(d, 2)

    def forward(self, x, m):
        kv = torch.tanh(self.mem(m))
        a = self.attn(x, kv, kv, need_weights=True)[0]
        return self.out(a.mean(1))


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv3d(2, 3, (2, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1), dilation=(1, 1, 2))
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.c(x)).mean((2, 3, 4)))


class LoRA(nn.Module):
    """A frozen base layer with trainable low-rank adapters, applied with matmul, plus an
    adapter in the x @ A @ B orientation."""

    def __init__(self, d=6, r=2):
        super().__init__()
        self.base = nn.Linear(d, d)
        self.base.requires_grad_(False)
        self.A = nn.Parameter(0.3 * torch.randn(r, d))
        self.B = nn.Parameter(0.3 * torch.randn(d, r))
        self.A2 = nn.Parameter(0.3 * torch.randn(d, r))
        self.B2 = nn.Parameter(0.3 * torch.randn(r, 3))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = torch.tanh(self.base(x) + (x @ self.A.t() @ self.B.T) * 0.5)
        return self.head(h) + torch.tanh(x @ self.A2) @ self.B2


class BufferLinear(nn.Module):
    """Layers applied to inputs that do not depend on the example: a constant buffer
    [1, k, d] and position ids broadcast over the batch."""

    def __init__(self, d=5):
        super().__init__()
        self.register_buffer("memory", torch.randn(1, 3, d))
        self.register_buffer("table", torch.randn(3, d))
        self.key = nn.Linear(d, d)
        self.table_proj = nn.Linear(d, d)  # [k, d] input: no size-1 dim to expand
        self.inp = nn.Linear(4, d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        k = torch.tanh(self.key(self.memory) + self.table_proj(self.table))  # [1, 3, d]
        h = torch.tanh(self.inp(x)).unsqueeze(1) * k  # [n, 3, d]
        return self.head(h.sum(1))


class RMSScale(nn.Module):
    """RMSNorm and an instance norm with affine parameters."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.rms = nn.RMSNorm(6) if hasattr(nn, "RMSNorm") else nn.LayerNorm(6)
        self.conv = nn.Conv1d(1, 3, 3)
        self.inorm = nn.InstanceNorm1d(3, affine=True)
        self.head = nn.Linear(6 + 3, 2)

    def forward(self, x):
        h = torch.tanh(self.rms(self.lin(x)))
        c = torch.tanh(self.inorm(self.conv(x.unsqueeze(1)))).mean(2)
        return self.head(torch.cat([h, c], 1))


class DeepRecurrent(nn.Module):
    """A recurrent layer with every option on, sequence-first, its outputs pooled."""

    def __init__(self, rnn, width):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(width, 2)

    def forward(self, x):  # x [n, T, d]
        out = self.rnn(x.transpose(0, 1))[0].transpose(0, 1)
        return self.head(torch.tanh(out).mean(1))


class Cells(nn.Module):
    """LSTMCell, GRUCell and RNNCell stepped over the sequence by the model itself."""

    def __init__(self, d=3, h=4):
        super().__init__()
        self.lstm, self.gru = nn.LSTMCell(d, h), nn.GRUCell(h, h)
        self.rnn = nn.RNNCell(h, h, nonlinearity="relu", bias=False)
        self.head = nn.Linear(h, 2)

    def forward(self, x):
        h = c = g = r = x.new_zeros(x.shape[0], self.head.in_features)
        for t in range(x.shape[1]):
            h, c = self.lstm(x[:, t], (h, c))
            g = self.gru(h, g)
            r = self.rnn(g, r)
        return self.head(r)


def _float(n, *shape):
    return lambda k: torch.randn(k, *shape, dtype=torch.float64)


def cases():
    """name -> (model in float64 eval mode, make(n) -> inputs, parameters allowed to be dense)."""
    torch.manual_seed(0)
    cs = {
        "resnet": (ResNet(3, 4, (1, 1)), _float(0, 3, 8, 8), set()),
        "vit": (ViT(8, 4, 8, 2, 1, 3), _float(0, 3, 8, 8), set()),
        "gpt2": (GPT2Style(), lambda k: torch.randint(0, 13, (k, 6)), set()),
        "mha-self": (SelfAttention(), _float(0, 4, 8), set()),
        "mha-self-batch-first": (SelfAttention(batch_first=True), _float(0, 4, 8), set()),
        "mha-bias-kv": (
            SelfAttention(bias_kv=True),
            _float(0, 4, 8),
            {"attn.bias_k", "attn.bias_v"},
        ),
        "mha-cross": (
            CrossAttention(),
            lambda k: (
                torch.randn(k, 3, 8, dtype=torch.float64),
                torch.randn(k, 4, 5, dtype=torch.float64),
            ),
            set(),
        ),
        "mha-cross-kdim": (
            CrossAttention(kdim=6),
            lambda k: (
                torch.randn(k, 3, 8, dtype=torch.float64),
                torch.randn(k, 4, 5, dtype=torch.float64),
            ),
            set(),
        ),
        "encoder": (Encoder(), _float(0, 4, 8), set()),
        "encoder-seq-first-norm-first": (
            Encoder(batch_first=False, norm_first=True),
            _float(0, 4, 8),
            set(),
        ),
        "separable-cnn": (SeparableCNN(2, 4, 3), _float(0, 2, 6, 6), set()),
        "conv3d": (Conv3dNet(), _float(0, 2, 3, 5, 6), set()),
        "lora": (LoRA(), _float(0, 6), set()),
        # PEFT-style adapters on q and v of a frozen transformer: only they and the head count
        "lora-peft": (
            LoRAClassifier(13, 8, 2, 2, 6, 2, 3),
            lambda k: torch.randint(0, 13, (k, 6)),
            set(),
        ),
        "buffer-linear": (BufferLinear(), _float(0, 4), {"table_proj.weight", "table_proj.bias"}),
        "lstm": (Recurrent(nn.LSTM), _float(0, 5, 3), set()),
        "gru": (Recurrent(nn.GRU), _float(0, 5, 3), set()),
        "lstm-deep": (
            DeepRecurrent(nn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2), 4),
            _float(0, 4, 3),
            set(),
        ),
        "gru-deep": (
            DeepRecurrent(nn.GRU(3, 4, num_layers=2, bidirectional=True), 8),
            _float(0, 4, 3),
            set(),
        ),
        "rnn-relu": (
            DeepRecurrent(nn.RNN(3, 4, num_layers=2, nonlinearity="relu", bias=False), 4),
            _float(0, 4, 3),
            set(),
        ),
        "cells": (Cells(), _float(0, 4, 3), set()),
        "norms": (RMSScale(), _float(0, 4), set()),
        # in-place Hardswish, ReLU and residual sums, squeeze-excitation, depthwise convs
        "mobilenet-v3-small": (mobilenet_v3_small(3), _float(0, 3, 32, 32), set()),
    }
    out = {}
    for name, (m, make, dense) in cs.items():
        m = randomize_norm_stats(m.double().eval())
        out[name] = (m, make, dense)
    return out
