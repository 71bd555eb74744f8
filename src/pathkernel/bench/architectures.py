"""Real architectures for the benchmark (and, in miniature, the tests): a torchvision-style
ResNet, a ViT, a GPT-2-style decoder (Hugging Face ``Conv1D`` blocks, position ids broadcast
over the batch, tied head), ``nn.TransformerEncoderLayer``, a depthwise-separable CNN, a
recurrent classifier and a frozen transformer with LoRA adapters. Random initialisation, no
downloads."""

from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu(h + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """torchvision-style ResNet: 3x3 stem, BasicBlocks (BatchNorm, 1x1 downsample), pooling."""

    def __init__(self, classes=3, width=4, blocks=(1, 1)):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        layers, c = [], width
        for i, b in enumerate(blocks):
            cout = width * 2**i
            for j in range(b):
                layers.append(BasicBlock(c, cout, 2 if i > 0 and j == 0 else 1))
                c = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = self.layers(h)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def resnet18_cifar(classes: int = 10, width: int = 64) -> ResNet:
    """ResNet-18, CIFAR variant (3x3 stem, no max-pool; 11M parameters at width 64)."""
    return ResNet(classes, width, (2, 2, 2, 2))


class ViTBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, h):
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        return h + self.mlp(self.ln2(h))


class ViT(nn.Module):
    """Patch embedding (conv), class token (expand + cat), learned positions, pre-norm blocks
    with nn.MultiheadAttention and a GELU MLP, head on the class token."""

    def __init__(self, img=8, patch=4, d=8, heads=2, depth=1, classes=3):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, patch)
        n = (img // patch) ** 2
        self.cls = nn.Parameter(0.1 * torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.1 * torch.randn(1, n + 1, d))
        self.blocks = nn.Sequential(*[ViTBlock(d, heads) for _ in range(depth)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
        return self.head(self.ln(self.blocks(h))[:, 0])


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: a linear layer with its weight stored [in, out]."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(0.2 / math.sqrt(nx) * torch.randn(nx, nf))
        self.bias = nn.Parameter(0.1 * torch.randn(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = Conv1D(3 * d, d)
        self.c_proj = Conv1D(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = Conv1D(4 * d, d)
        self.c_out = Conv1D(d, 4 * d)

    def forward(self, h):
        n, T, d = h.shape
        q, k, v = self.c_attn(self.ln_1(h)).split(d, dim=2)
        q, k, v = (t.view(n, T, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        w = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
        w = w.masked_fill(~causal, float("-inf")).softmax(-1)
        a = (w @ v).transpose(1, 2).reshape(n, T, d)
        h = h + self.c_proj(a)
        return h + self.c_out(F.gelu(self.c_fc(self.ln_2(h)), approximate="tanh"))


class GPT2Style(nn.Module):
    """Token and learned position embeddings (position ids [1, T], broadcast over the batch),
    Conv1D blocks, final LayerNorm, output head tied to the token embedding; the output is
    the last position's logits."""

    def __init__(self, vocab=13, d=8, heads=2, layers=2, seq=6):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq, d)
        self.h = nn.ModuleList(GPT2Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, tokens):
        pos = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        h = self.wte(tokens) + self.wpe(pos)
        for block in self.h:
            h = block(h)
        return F.linear(self.ln_f(h)[:, -1], self.wte.weight)


class Encoder(nn.Module):
    """nn.TransformerEncoderLayer (sequence first inside when ``batch_first=False``)."""

    def __init__(self, d=8, heads=2, ff=12, batch_first=True, norm_first=False, classes=2):
        super().__init__()
        self.batch_first = batch_first
        self.layer = nn.TransformerEncoderLayer(
            d,
            heads,
            dim_feedforward=ff,
            dropout=0.0,
            batch_first=batch_first,
            norm_first=norm_first,
        )
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.layer(x if self.batch_first else x.transpose(0, 1))
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(h.mean(1))


class SeparableCNN(nn.Module):
    """Depthwise (groups = channels), pointwise and grouped (groups = 2) convolutions,
    GroupNorm, a LayerScale-style parameter multiplied with activations."""

    def __init__(self, cin=2, width=4, classes=3):
        super().__init__()
        w = width
        self.c1 = nn.Conv2d(cin, w, 3, padding=1)
        self.dw = nn.Conv2d(w, w, 3, padding=1, groups=w)
        self.pw = nn.Conv2d(w, 2 * w, 1)
        self.gn = nn.GroupNorm(2, 2 * w)
        self.dw2 = nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1, groups=2 * w)
        self.grouped = nn.Conv2d(2 * w, w, 3, groups=2, padding_mode="reflect", padding=1)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, w).reshape(1, w, 1, 1))
        self.fc = nn.Linear(w, classes)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.pw(self.dw(h)))
        h = torch.tanh(self.grouped(self.dw2(self.gn(h)))) * self.scale
        return self.fc(h.mean((2, 3)))


class Recurrent(nn.Module):
    def __init__(self, cell=nn.LSTM, d=3, hidden=4, classes=2):
        super().__init__()
        self.rnn = cell(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class LoRALinear(nn.Module):
    """A frozen linear layer with a trainable low-rank update, as PEFT builds it:
    ``base(x) + lora_B(lora_A(x)) * alpha / r``; ``lora_B`` random here (PEFT starts it at
    zero, where every kernel of ``lora_A`` would be zero)."""

    def __init__(self, d_in, d_out, r=8, alpha=16):
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)
        self.lora_A = nn.Linear(d_in, r, bias=False)
        self.lora_B = nn.Linear(r, d_out, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.02)
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


class _LoRABlock(nn.Module):
    def __init__(self, d, heads, r):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.q, self.v = LoRALinear(d, d, r), LoRALinear(d, d, r)
        self.k, self.o = nn.Linear(d, d), nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h):
        n, T, d = h.shape
        a = self.ln_1(h)
        q, k, v = (
            m(a).view(n, T, self.heads, d // self.heads).transpose(1, 2)
            for m in (self.q, self.k, self.v)
        )
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, T, d)
        h = h + self.o(a)
        return h + self.fc2(F.gelu(self.fc1(self.ln_2(h))))


class LoRAClassifier(nn.Module):
    """A frozen pre-norm transformer encoder (embeddings, attention, MLP, norms) with LoRA
    adapters on the query and value projections (PEFT's default targets) and a trainable
    classification head on the mean token: the fine-tuning whose kernel the adapters span."""

    def __init__(self, vocab=256, d=64, heads=4, layers=2, seq=16, r=8, classes=10):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Parameter(0.02 * torch.randn(1, seq, d))
        self.blocks = nn.ModuleList(_LoRABlock(d, heads, r) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        for name, p in self.named_parameters():
            p.requires_grad_("lora_" in name)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        h = self.wte(tokens) + self.wpe[:, : tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h).mean(1))


class _SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s), inplace=True)), inplace=True)


def _conv_bn(cin, cout, k, stride=1, groups=1, act=None):
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False)]
    layers.append(nn.BatchNorm2d(cout, eps=0.001, momentum=0.01))
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class _InvertedResidual(nn.Module):
    def __init__(self, cin, k, exp, cout, se, act, stride):
        super().__init__()
        layers = [] if exp == cin else [_conv_bn(cin, exp, 1, act=act)]
        layers.append(_conv_bn(exp, exp, k, stride, groups=exp, act=act))
        if se:
            layers.append(_SqueezeExcite(exp, max(8, int(exp / 4 + 4) // 8 * 8)))
        layers.append(_conv_bn(exp, cout, 1))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = self.block(x)
        if self.residual:
            h += x  # in place, as torchvision writes it
        return h


def mobilenet_v3_small(classes: int = 10) -> nn.Module:
    """torchvision's ``mobilenet_v3_small`` layer for layer (its configuration, in-place
    Hardswish/ReLU/Hardsigmoid, in-place residual sums, squeeze-excitation), for machines
    where torchvision does not load."""
    RE, HS = nn.ReLU, nn.Hardswish
    conf = [  # input, kernel, expanded, output, squeeze-excite, activation, stride
        (16, 3, 16, 16, True, RE, 2),
        (16, 3, 72, 24, False, RE, 2),
        (24, 3, 88, 24, False, RE, 1),
        (24, 5, 96, 40, True, HS, 2),
        (40, 5, 240, 40, True, HS, 1),
        (40, 5, 240, 40, True, HS, 1),
        (40, 5, 120, 48, True, HS, 1),
        (48, 5, 144, 48, True, HS, 1),
        (48, 5, 288, 96, True, HS, 2),
        (96, 5, 576, 96, True, HS, 1),
        (96, 5, 576, 96, True, HS, 1),
    ]
    features = [_conv_bn(3, 16, 3, 2, act=HS)] + [_InvertedResidual(*c) for c in conf]
    features.append(_conv_bn(96, 576, 1, act=HS))
    return nn.Sequential(
        nn.Sequential(*features),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(576, 1024),
        nn.Hardswish(inplace=True),
        nn.Dropout(0.2, inplace=True),
        nn.Linear(1024, classes),
    )


def randomize_norm_stats(model: nn.Module, seed: int = 11) -> nn.Module:
    """Non-trivial running statistics and affine parameters (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
            if (
                isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm))
                and getattr(m, "weight", None) is not None
            ):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.3, 0.3, generator=g)
    return model


# name -> (N, description, factory() -> (model, inputs)); float32, eval mode
def _images(n, c, s):
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(1))


ARCHITECTURES: Dict[str, Tuple[int, str, Callable[[int], tuple]]] = {
    "resnet": (
        128,
        "ResNet (16-32-64 channels, 3 stages, BatchNorm), 3x16x16 images, 10 classes",
        lambda n: (ResNet(10, 16, (1, 1, 1)), _images(n, 3, 16)),
    ),
    "vit": (
        128,
        "ViT (16x16 images, 4x4 patches, d=32, 4 heads, 2 blocks), 10 classes",
        lambda n: (ViT(16, 4, 32, 4, 2, 10), _images(n, 3, 16)),
    ),
    "gpt2": (
        96,
        "GPT-2-style decoder (vocab 128, d=32, 2 blocks, 12 tokens, tied head), last-token logits",
        lambda n: (
            GPT2Style(128, 32, 4, 2, 12),
            torch.randint(0, 128, (n, 12), generator=torch.Generator().manual_seed(1)),
        ),
    ),
    "encoder": (
        128,
        "nn.TransformerEncoderLayer (d=32, 4 heads, ff 64, 12 tokens), 10 classes",
        lambda n: (
            Encoder(32, 4, 64, True, False, 10),
            torch.randn(n, 12, 32, generator=torch.Generator().manual_seed(1)),
        ),
    ),
    "depthwise": (
        256,
        "depthwise-separable CNN (width 16, GroupNorm), 3x16x16 images, 10 classes",
        lambda n: (SeparableCNN(3, 16, 10), _images(n, 3, 16)),
    ),
    "lstm": (
        128,
        "LSTM classifier (16 -> 32, 12 steps), 10 classes",
        lambda n: (
            Recurrent(nn.LSTM, 16, 32, 10),
            torch.randn(n, 12, 16, generator=torch.Generator().manual_seed(1)),
        ),
    ),
    "lora": (
        128,
        "frozen transformer (d=64, 2 blocks, 16 tokens) with LoRA r=8 on q and v, 10 classes",
        lambda n: (
            LoRAClassifier(),
            torch.randint(0, 256, (n, 16), generator=torch.Generator().manual_seed(1)),
        ),
    ),
}


def architecture(name: str, n: int = 0, seed: int = 0):
    """``(model, inputs)`` of a benchmark architecture (float32, eval mode)."""
    N, _, make = ARCHITECTURES[name]
    torch.manual_seed(seed)
    model, x = make(n or N)
    return randomize_norm_stats(model).eval(), x
