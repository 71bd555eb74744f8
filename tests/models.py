"""Small models that exercise every rule and every fallback."""

import torch
from torch import nn


def mlp(d_in=6, hidden=(9, 7), d_out=3, act=nn.Tanh, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    layers, d = [], d_in
    for h in hidden:
        layers += [nn.Linear(d, h), act()]
        d = h
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers).to(dtype)


class CNN(nn.Module):
    def __init__(self, c=(3, 4), classes=3):
        super().__init__()
        self.c1 = nn.Conv2d(1, c[0], 3, padding=1)
        self.c2 = nn.Conv2d(c[0], c[1], 3, stride=2, padding="valid")
        self.c3 = nn.Conv1d(c[1], c[1], 2, padding="same")
        self.fc = nn.Linear(c[1] * 3, classes)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))  # [n, c, 3, 3]
        h = h.flatten(2)[:, :, :3]  # [n, c, 3] as a sequence
        h = torch.tanh(self.c3(h))
        return self.fc(h.flatten(1))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=11, d=8, heads=2, seq=5, classes=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(0.1 * torch.randn(seq, d))
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.ff = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        h = self.emb(tokens) + self.pos
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.norm(h + a)
        h = h + torch.tanh(self.ff(h))
        return self.head(h.mean(1))


class Tied(nn.Module):
    """Embedding weight reused as the output projection, and a Linear called twice."""

    def __init__(self, vocab=7, d=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)

    def forward(self, tokens):
        h = self.emb(tokens)  # [n, S, d]
        h = torch.tanh(self.mix(h))
        h = torch.tanh(self.mix(h))  # the same module, a second time
        return h.mean(1) @ self.emb.weight.t()  # the tied role: [n, vocab]


class SharedLinear(nn.Module):
    """Two Linear modules holding the same weight and bias objects."""

    def __init__(self, d=4):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.b.weight = self.a.weight
        self.b.bias = self.a.bias
        self.out = nn.Linear(d, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


class FrozenBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)
        self.l2 = nn.Linear(6, 6)
        self.l3 = nn.Linear(6, 2)
        self.l1.weight.requires_grad_(False)  # frozen weight, trainable bias
        self.l2.bias.requires_grad_(False)  # trainable weight, frozen bias

    def forward(self, x):
        h = self.bn(self.l1(x))
        return self.l3(torch.relu(self.l2(h)))
