"""Real architectures in miniature (random initialisation, no downloads).

Each one exercises parameter uses that a module-level rule would miss: attention's packed
in-projection and its out-projection (functional calls inside ``multi_head_attention_forward``,
sequence-first), GPT-2's ``Conv1D`` (``addmm`` on a flattened batch), position ids broadcast
over the batch, a tied output head, norms' affine parameters, grouped, depthwise and 3-d
convolutions, LoRA matrices applied with ``matmul``, a layer applied to a constant buffer,
and recurrent layers that only the dense path covers.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def _randomize_norm_stats(model):
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) \
                    and getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.3, 0.3, generator=g)
    return model


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu(h + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """torchvision-style ResNet (BasicBlocks, BatchNorm in eval, 1x1 downsample, pooling)."""

    def __init__(self, classes=3, width=4):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = self.layer2(self.layer1(h))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class ViT(nn.Module):
    """Patch embedding (conv), class token (expand + cat), learned positions, one pre-norm
    encoder block with nn.MultiheadAttention, GELU MLP, head on the class token."""

    def __init__(self, img=8, patch=4, d=8, heads=2, classes=3):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, patch)
        n = (img // patch) ** 2
        self.cls = nn.Parameter(0.1 * torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.1 * torch.randn(1, n + 1, d))
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.ln2(h))
        return self.head(self.ln(h)[:, 0])


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: a linear layer with its weight stored [in, out]."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(0.2 * torch.randn(nx, nf))
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


class Encoder(nn.Module):
    def __init__(self, d=8, batch_first=True, norm_first=False):
        super().__init__()
        self.batch_first = batch_first
        self.layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=12, dropout=0.0,
                                                batch_first=batch_first, norm_first=norm_first)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = self.layer(x if self.batch_first else x.transpose(0, 1))
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(h.mean(1))


class SeparableCNN(nn.Module):
    """Depthwise (groups = channels), pointwise and grouped (groups = 2) convolutions,
    GroupNorm, a LayerScale-style parameter multiplied with activations."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.pw = nn.Conv2d(4, 6, 1)
        self.gn = nn.GroupNorm(2, 6)
        self.grouped = nn.Conv2d(6, 4, 3, stride=2, groups=2, padding_mode="reflect", padding=1)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4).reshape(1, 4, 1, 1))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.pw(self.dw(h)))
        h = torch.tanh(self.grouped(self.gn(h))) * self.scale
        return self.fc(h.mean((2, 3)))


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
        h = torch.tanh(self.inp(x)).unsqueeze(1) * k                        # [n, 3, d]
        return self.head(h.sum(1))


class Recurrent(nn.Module):
    def __init__(self, cell=nn.LSTM, d=3, hidden=4):
        super().__init__()
        self.rnn = cell(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


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


def _float(n, *shape):
    return lambda k: torch.randn(k, *shape, dtype=torch.float64)


def cases():
    """name -> (model in float64 eval mode, make(n) -> inputs, parameters allowed to be dense)."""
    torch.manual_seed(0)
    cs = {
        "resnet": (ResNet(), _float(0, 3, 8, 8), set()),
        "vit": (ViT(), _float(0, 3, 8, 8), set()),
        "gpt2": (GPT2Style(), lambda k: torch.randint(0, 13, (k, 6)), set()),
        "mha-self": (SelfAttention(), _float(0, 4, 8), set()),
        "mha-self-batch-first": (SelfAttention(batch_first=True), _float(0, 4, 8), set()),
        "mha-bias-kv": (SelfAttention(bias_kv=True), _float(0, 4, 8), {"attn.bias_k", "attn.bias_v"}),
        "mha-cross": (CrossAttention(), lambda k: (torch.randn(k, 3, 8, dtype=torch.float64),
                                                   torch.randn(k, 4, 5, dtype=torch.float64)), set()),
        "mha-cross-kdim": (CrossAttention(kdim=6), lambda k: (
            torch.randn(k, 3, 8, dtype=torch.float64), torch.randn(k, 4, 5, dtype=torch.float64)),
            set()),
        "encoder": (Encoder(), _float(0, 4, 8), set()),
        "encoder-seq-first-norm-first": (Encoder(batch_first=False, norm_first=True),
                                         _float(0, 4, 8), set()),
        "separable-cnn": (SeparableCNN(), _float(0, 2, 6, 6), set()),
        "conv3d": (Conv3dNet(), _float(0, 2, 3, 5, 6), set()),
        "lora": (LoRA(), _float(0, 6), set()),
        "buffer-linear": (BufferLinear(), _float(0, 4), {"table_proj.weight", "table_proj.bias"}),
        "lstm": (Recurrent(nn.LSTM), _float(0, 5, 3), {"rnn.weight_ih_l0", "rnn.weight_hh_l0",
                                                      "rnn.bias_ih_l0", "rnn.bias_hh_l0"}),
        "gru": (Recurrent(nn.GRU), _float(0, 5, 3), {"rnn.weight_ih_l0", "rnn.weight_hh_l0",
                                                    "rnn.bias_ih_l0", "rnn.bias_hh_l0"}),
        "norms": (RMSScale(), _float(0, 4), set()),
    }
    out = {}
    for name, (m, make, dense) in cs.items():
        m = _randomize_norm_stats(m.double().eval())
        out[name] = (m, make, dense)
    return out
