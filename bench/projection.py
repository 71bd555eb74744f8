"""Projected loss-gradient path kernel of a GPT-2-small-width decoder against the
TRAK-style peer (issue 21's scale target):

    python bench/projection.py [--train 1000] [--query 100] [--k 4096] [--peer 4]

Model: bench/architectures' GPT2Style at d = 768, 12 heads, 4 blocks, 128 tokens, vocabulary
50,257, head tied to the token embedding (67M parameters); float32. Kernel: TracInCP's score
matrix of the last position's next-token cross-entropy, query x train, 2 checkpoints,
``project=k``. Each part runs in a fresh process, which prints its time and peak RSS:

- ours: ``pk.path_kernel(..., outputs=losses.cross_entropy, targets=..., project=k)``;
- peer: what TRAK does on the CPU: per-example gradients by ``torch.func`` (``vmap(grad)``)
  flattened, projected by a dense Gaussian sketch generated block by block (never P x k at once,
  each block generated once for a batch of ``--peer`` examples, 16 by default: the most
  whose gradients fit 8 GB); timed on one batch (the
  projection on its first blocks) and scaled to all examples and checkpoints (its cost is
  linear in both: no pair work to speak of);
- the FLOP limit: one forward + backward of every example per checkpoint (torch's
  FlopCounterMode, parameter gradients excluded: a projection needs the activations' and
  output gradients' passes only) at the sgemm rate measured in the same process.
"""

import argparse
import subprocess
import sys

SETUP = """
import resource, sys, time, math, torch
import pathkernel as pk
from pathkernel.bench.architectures import GPT2Style
N, M, k, peer = (int(a) for a in sys.argv[2:6])
torch.manual_seed(0)
V, T = 50257, 128
model = GPT2Style(vocab=V, d=768, heads=12, layers=4, seq=T).eval()
g = torch.Generator().manual_seed(1)
tokens = torch.randint(0, V, (N + M, T + 1), generator=g)
X, Y = tokens[:N, :T], tokens[:N, T]
Xq, Yq = tokens[N:, :T], tokens[N:, T]
w0 = {n: v.clone() for n, v in model.state_dict().items()}
w1 = {n: v + 0.01 * torch.randn(v.shape, generator=g) for n, v in w0.items()}
ckpts = [(w0, 1e-3), (w1, 1e-3)]
P = sum(p.numel() for p in model.parameters())
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
"""

OURS = """
t = time.perf_counter()
S = pk.path_kernel(model, ckpts, X, Xq, outputs=pk.losses.cross_entropy, targets=(Y, Yq),
                   project=k, memory_budget="6GB", progress=False)
t = time.perf_counter() - t
print(f"ours: {N} train x {M} query, 2 checkpoints, project={k}: {t:.1f} s, "
      f"peak RSS {peak():.2f} GiB; |S|_F = {S.norm():.4g}")
print(pk.plan(model, ckpts, X, Xq, outputs=pk.losses.cross_entropy, targets=(Y, Yq),
              project=k, memory_budget="6GB"))
"""

PEER = """
from torch.func import functional_call, grad, vmap
import torch.nn.functional as F
names = [n for n, _ in model.named_parameters()]
def loss(params, x, y):
    out = functional_call(model, params, (x.unsqueeze(0),))
    return F.cross_entropy(out, y.unsqueeze(0))
BLOCK, BLOCKS = 1 << 16, 4  # sketch columns generated at a time; blocks timed
params = {n: v for n, v in ckpts[0][0].items() if n in names}
t = time.perf_counter()
G = torch.empty(peer, P)  # the batch's flattened per-example gradients
for i in range(0, peer, 2):
    part = vmap(grad(loss), in_dims=(None, 0, 0))(params, X[i:i + 2], Y[i:i + 2])
    c = 0
    for n in names:
        v = part[n].reshape(part[n].shape[0], -1)
        G[i:i + 2, c:c + v.shape[1]] = v
        c += v.shape[1]
    del part
t_grad = time.perf_counter() - t
out = torch.zeros(peer, k)
gen = torch.Generator()
t = time.perf_counter()
for b in range(BLOCKS):  # the first BLOCKS blocks of the sketch, each generated once per batch
    c0 = b * BLOCK
    gen.manual_seed(b)
    R = torch.randn(BLOCK, k, generator=gen)  # TRAK's Gaussian sketch (its fastest here)
    out += G[:, c0:c0 + BLOCK] @ R
t_proj = (time.perf_counter() - t) * P / (BLOCKS * BLOCK)
per = (t_grad + t_proj) / peer
print(f"peer: per-example gradients {t_grad / peer:.2f} s per example; projection "
      f"{t_proj / peer:.2f} s per example (the first {BLOCKS} of {P / BLOCK:.0f} blocks of "
      f"{BLOCK} columns timed, scaled to P = {P:,}; a batch of {peer} examples shares each "
      f"generated block); {per:.2f} s per example and checkpoint; {N + M} examples x 2 "
      f"checkpoints: {per * 2 * (N + M):.0f} s; peak RSS {peak():.2f} GiB")
"""

LIMIT = """
from torch.utils.flop_counter import FlopCounterMode
x = X[:2]
for p in model.parameters():
    p.requires_grad_(False)
emb = model.wte(x).detach().requires_grad_(True)
h_hook = {}
def fwd():  # the forward pass from the embeddings, so only activation gradients are taken
    pos = torch.arange(T).unsqueeze(0)
    h = emb + model.wpe(pos)
    for b in model.h:
        h = b(h)
    return torch.nn.functional.linear(model.ln_f(h)[:, -1], model.wte.weight)
with FlopCounterMode(display=False) as fc:
    out = fwd()
    torch.autograd.grad(out.logsumexp(-1).sum(), emb)
per = fc.get_total_flops() / 2
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
a @ b
t = time.perf_counter()
for _ in range(5):
    a @ b
rate = 5 * 2 * 2048**3 / (time.perf_counter() - t)
print(f"limit: {per / 1e9:.1f} GFLOP per example forward + backward; sgemm "
      f"{rate / 1e9:.0f} GFLOP/s; {N + M} examples x 2 checkpoints: "
      f"{2 * (N + M) * per / rate:.0f} s at the sgemm rate")
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--query", type=int, default=100)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--peer", type=int, default=16)
    ap.add_argument("--only", choices=("ours", "peer", "limit"))
    a = ap.parse_args()
    for part, code in (("limit", LIMIT), ("ours", OURS), ("peer", PEER)):
        if a.only not in (None, part):
            continue
        args = [str(v) for v in (a.train, a.query, a.k, a.peer)]
        subprocess.run([sys.executable, "-c", SETUP + code, part, *args], check=True)


if __name__ == "__main__":
    main()
