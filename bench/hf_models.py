"""Library models as users hold them: a Hugging Face BERT (keyword x with a padding
mask, a ModelOutput) and torchvision's MobileNetV3-small (in-place Hardswish; where torchvision
does not load, the same layers built by ``bench.architectures.mobilenet_v3_small``), passed as
the libraries build them, against the torch.func recipe in the same process.

    python bench/hf_models.py [--n 64]

One output (logit 0), float32, x against itself. The peer: ``vmap(grad)`` per-example
gradients in chunks of 32, flattened, one GEMM (the recipe a user writes when the Jacobian
fits). The FLOP limit: a batched forward + backward of the N examples (``FlopCounterMode``)
plus the symmetric Gram, N(N+1)/2 pairs x P x 2, at the sgemm rate measured here. Each model
is skipped when its library is not installed.
"""

from __future__ import annotations

import argparse
import time

import torch

import pathkernel as pk
from pathkernel.bench.workloads import flop_limit, gemm_rate, paired_best, torch_func_grad_ntk


def bert(n):
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=128,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 30522, (n, 64), generator=g)
    mask = torch.ones(n, 64, dtype=torch.long)
    mask[::2, 48:] = 0  # every other example padded
    return (
        "BERT (d 256, 4 layers, seq 64, padding)",
        model,
        {"input_ids": ids, "attention_mask": mask},
    )


def mobilenet(n):
    torch.manual_seed(0)
    try:
        import torchvision

        model = torchvision.models.mobilenet_v3_small(num_classes=10)
        name = "MobileNetV3-small (torchvision, 64x64)"
    except (ImportError, RuntimeError):  # torchvision missing, or built for another torch
        from pathkernel.bench.architectures import mobilenet_v3_small

        model = mobilenet_v3_small(10)
        name = "MobileNetV3-small (torchvision's layers, built here; 64x64)"
    model.train()
    with torch.no_grad():  # set the BatchNorm statistics (default ones give a flat model)
        model(torch.randn(64, 3, 64, 64))
    model.eval()
    return name, model, torch.randn(n, 3, 64, 64)


def pick(o):
    return (o.logits if hasattr(o, "logits") else o)[:, 0]


def peer(model, x):
    if isinstance(x, dict):  # a 4-D additive mask: vmap cannot run HF's check of a 2-D one
        m = x["attention_mask"][:, None, None, :].to(torch.float32)
        x = {**x, "attention_mask": (1.0 - m) * torch.finfo(torch.float32).min}
    return torch_func_grad_ntk(model, x, pick)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    args = ap.parse_args()
    rate = gemm_rate()
    print(f"sgemm {rate / 1e9:.0f} GFLOP/s; N = {args.n}, one output, float32")
    for make in (bert, mobilenet):
        try:
            name, model, x = make(args.n)
        except ImportError as e:
            print(f"{make.__name__}: skipped ({e})")
            continue
        t = time.perf_counter()
        K = pk.tangent_kernel(model, x, outputs=pick)
        first = time.perf_counter() - t
        ref = peer(model, x)
        err = float((K - ref).abs().max() / ref.abs().max())
        ours, theirs = paired_best(
            lambda: pk.tangent_kernel(model, x, outputs=pick), lambda: peer(model, x), 3
        )
        lim = flop_limit(model, x, pick, rate)
        dense = pk.describe(model, x, outputs=pick).dense_share
        print(
            f"{name}: ours {ours:.2f} s (first call {first:.2f} s), torch.func {theirs:.2f} s "
            f"-> {theirs / ours:.2f}x; {100 * lim / ours:.0f}% of the FLOP limit "
            f"({lim:.2f} s); dense {100 * dense:.1f}%; max rel. diff {err:.1e}"
        )


if __name__ == "__main__":
    main()
