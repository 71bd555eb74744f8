"""A weight shared by an embedding and an output head (GPT-2's tied head) keeps both uses'
factors: per pair of blocks, the rows of the tokens the two hold are materialized and the
head's other rows stay factored. Exact in float64 against torch.func in every mode, whichever
form a pair takes, across blocks holding different tokens and head positions, through tiles,
the scratch file, passes, the recorder and the probe."""

import numpy as np
import pytest
import torch
from torch import nn

import pathkernel as pk
from pathkernel._capture import blocks
from reference import assert_close, reference_ntk
from test_path_kernel import _dear_passes, _passes_only

VOCAB = 40


class TiedLM(nn.Module):
    """A tied head read at each example's last non-padding token (so blocks keep different
    head positions), padding tokens with no embedding gradient."""

    def __init__(self, vocab=VOCAB, d=6, pad=0):
        super().__init__()
        self.pad = pad
        self.emb = nn.Embedding(vocab, d, padding_idx=pad)
        self.pos = nn.Parameter(0.3 * torch.randn(5, d))
        self.mix = nn.Linear(d, d)

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.emb(tokens) + self.pos[: tokens.shape[1]]))
        logits = h @ self.emb.weight.t()  # the head at every position: [n, S, vocab]
        last = (tokens != self.pad).sum(1).clamp(min=1) - 1
        return logits[torch.arange(tokens.shape[0]), last][:, :3]  # three logits


def _tokens(n, seed, lo=1, hi=12):
    """Tokens from a few of the vocabulary's rows (so the other rows are the head's alone),
    trailing padding of different lengths."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(lo, hi, (n, 5), generator=g)
    for i in range(n):
        t[i, 5 - i % 3 :] = 0 if i % 3 else t[i, 5 - i % 3 :]
    return t


def _model():
    torch.manual_seed(0)
    return TiedLM().double()


def test_the_tied_weight_keeps_its_factors():
    d = pk.describe(_model(), _tokens(5, 0))
    assert {r.name: r.form for r in d.rows}["emb.weight"] == "tied", str(d)


@pytest.mark.parametrize("form", ["tied", "materialized"])
@pytest.mark.parametrize("outputs", ["trace", "full", 1, lambda o: o[:, 0] - 0.5 * o[:, 2]])
def test_exact_in_every_mode_whichever_form(outputs, form, monkeypatch):
    """x against itself, against other tokens (the union of two blocks' tokens), and in
    blocks of 2 (blocks whose head positions differ: padded when paired)."""
    costs = (0.0, 1.0) if form == "tied" else (1.0, 0.0)
    monkeypatch.setattr(blocks, "tied_cost", lambda *a: costs)
    model = _model()
    x1, x2 = _tokens(7, 1), _tokens(5, 2, lo=8, hi=30)
    ref = reference_ntk(model, x1, None, outputs)
    assert_close(pk.tangent_kernel(model, x1, outputs=outputs), ref, torch.float64)
    assert_close(
        pk.tangent_kernel(model, x1, x2, outputs=outputs, batch_size=2),
        reference_ntk(model, x1, x2, outputs),
        torch.float64,
    )


def test_the_pair_form_is_the_cheaper_one():
    """Few tokens and one head position: the rows and the factored rest; a head at many
    positions of a large vocabulary: the whole gradient."""
    rows, full = blocks.tied_cost(50257, 384, 4000, 1, 1, True)
    assert rows < 0.2 * full
    rows, full = blocks.tied_cost(50257, 384, 4000, 64, 1, True)
    assert rows > full


@pytest.mark.parametrize("form", ["tied", "materialized"])
def test_path_kernel_through_tiles_scratch_file_and_passes(tmp_path, monkeypatch, form):
    """Tied factors written to and read back from the scratch file, row blocks gathered from
    passes whose head positions differ, tiles pairing blocks of other tokens: the reference
    kernel, kept or recomputed."""
    costs = (0.0, 1.0) if form == "tied" else (1.0, 0.0)
    monkeypatch.setattr(blocks, "tied_cost", lambda *a: costs)
    model = _model()
    g = torch.Generator().manual_seed(3)
    ckpts = []
    for t in range(2):
        sd = {k: v + 0.05 * t * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in
              model.state_dict().items()}  # fmt: skip
        ckpts.append((sd, 0.1 * (t + 1)))
    X = _tokens(70, 4, hi=VOCAB)
    _dear_passes(monkeypatch)
    _passes_only(monkeypatch)
    kw = dict(outputs=1, dtype=torch.float64)

    def fits(b):
        try:
            p = pk.plan(model, ckpts, X, out=str(tmp_path / "p.npy"), memory_budget=b, **kw)
        except ValueError:  # too small
            return False
        return p.passes and p.spill_bytes > 0 and len(p.tiles) > 1

    kw["memory_budget"] = next(b for b in range(200_000, 8_000_000, 50_000) if fits(b))
    runs = {}
    for spill in (True, False):
        out = str(tmp_path / f"k{spill}.npy")
        pk.path_kernel(model, ckpts, X, out=out, spill=spill, progress=False, **kw)
        runs[spill] = np.load(out)
    ref = sum(
        w * reference_ntk(_with(model, sd), X, None, 1) for sd, w in ckpts
    )  # fmt: skip
    assert_close(torch.from_numpy(runs[True]), ref, torch.float64)
    assert_close(torch.from_numpy(runs[False]), ref, torch.float64)


def _with(model, sd):
    m = TiedLM().double()
    m.load_state_dict(sd)
    return m


def test_recorded_training_is_exact():
    """The recorder's per-example shares of SGD steps on the tied model reproduce it."""
    model = _model()
    X = _tokens(12, 5, hi=VOCAB)
    Y = torch.randint(0, 3, (12,))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    loss = nn.CrossEntropyLoss()
    rec = pk.PathRecorder(model, opt, loss, (X, Y), _tokens(4, 6), quadrature=8)
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        idx = torch.randperm(12, generator=g)[:4]
        with rec.step(idx):
            opt.zero_grad()
            loss(model(X[idx]), Y[idx]).backward()
            opt.step()
    assert rec.kernel_machine().report()["relative_error"] <= 1e-9


def test_wrong_head_factors_are_caught_by_the_probe(monkeypatch):
    """Tied factors that hand the head's part to another example are sent dense."""
    from pathkernel._capture import extract

    real = extract.group_factors

    def swapped(plan, uses, n, *args):
        out = real(plan, uses, n, *args)
        for f in out.values():
            if f.tied is not None and n > 1:
                f.tied.D = f.tied.D.roll(1, 0)
        return out

    monkeypatch.setattr(extract, "group_factors", swapped)
    monkeypatch.setattr("pathkernel._capture.probe.group_factors", swapped)
    d = pk.describe(TiedLM().double(), _tokens(5, 8))
    assert {r.name: r.form for r in d.rows}["emb.weight"] == "dense", str(d)
