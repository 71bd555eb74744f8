"""Models from real libraries, where installed (random initialisation, no downloads)."""

import pytest
import torch
from torch import nn

import pathkernel as pk
from reference import assert_close, reference_ntk


class LastLogits(nn.Module):
    """A Hugging Face causal LM as a function of token ids: the last position's logits."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids).logits[:, -1]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_huggingface_gpt2(attn):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=17, n_positions=8, n_embd=8, n_layer=2, n_head=2, attn_implementation=attn
    )
    torch.manual_seed(0)
    model = LastLogits(transformers.GPT2LMHeadModel(cfg)).double().eval()
    x1, x2 = torch.randint(0, 17, (5, 6)), torch.randint(0, 17, (3, 6))
    for outputs in ("trace", "full", 3):
        assert_close(
            pk.tangent_kernel(model, x1, x2, outputs=outputs),
            reference_ntk(model, x1, x2, outputs),
            torch.float64,
        )
    d = pk.describe(model, x1)
    assert d.dense_share == 0.0, str(d)
    # the tied wte / lm_head weight keeps its embedding and head factors
    assert {r.name: r.form for r in d.rows}["lm.transformer.wte.weight"] == "tied", str(d)


def test_torchvision_resnet_and_vit():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    resnet = tv.models.resnet18(num_classes=3).double().eval()
    vit = (
        tv.models.VisionTransformer(
            image_size=16,
            patch_size=8,
            num_layers=1,
            num_heads=2,
            hidden_dim=8,
            mlp_dim=16,
            num_classes=3,
        )
        .double()
        .eval()
    )
    for model, shape in ((resnet, (3, 32, 32)), (vit, (3, 16, 16))):
        x1, x2 = (
            torch.randn(3, *shape, dtype=torch.float64),
            torch.randn(2, *shape, dtype=torch.float64),
        )
        assert_close(pk.tangent_kernel(model, x1, x2), reference_ntk(model, x1, x2), torch.float64)
        assert pk.describe(model, x1).dense_share == 0.0


class ByPosition(nn.Module):
    """The reference's view of a Hugging Face model: positional tensors in, one tensor out."""

    def __init__(self, model, keys, pick):
        super().__init__()
        self.model, self.keys, self.pick = model, keys, pick

    def forward(self, *xs):
        return self.pick(self.model(**dict(zip(self.keys, xs))))


def _padded(n, T, vocab, seed, left):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    for i in range(n):
        pad = i % 3  # 0-2 padding tokens
        if pad:
            mask[i, :pad] = 0 if left else 1
            mask[i, T - pad :] = 1 if left else 0
    return {"input_ids": ids, "attention_mask": mask}


def _hf_cases(transformers):
    """Tiny configurations of each family (random weights, no downloads): the model, its
    inputs (a dict with a padding mask), and the tensor to take from its output."""
    small = dict(vocab_size=19, hidden_size=8, num_attention_heads=2, intermediate_size=16)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=19, n_positions=8, n_embd=8, n_layer=2, n_head=2)
    )
    bert = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            num_hidden_layers=2, max_position_embeddings=8, num_labels=3, **small
        )
    )
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            num_hidden_layers=2, num_key_value_heads=1, max_position_embeddings=8, **small
        )
    )
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=19,
            d_model=8,
            d_kv=4,
            d_ff=16,
            num_layers=1,
            num_heads=2,
            decoder_start_token_id=0,
        )
    )
    last = lambda o: o.logits[:, -1]  # noqa: E731
    return {
        "gpt2": (gpt2, lambda n, s: _padded(n, 6, 19, s, left=True), last),
        "bert": (bert, lambda n, s: _padded(n, 6, 19, s, left=False), lambda o: o.logits),
        "llama": (llama, lambda n, s: _padded(n, 6, 19, s, left=True), last),
        "t5": (
            t5,
            lambda n, s: {
                **_padded(n, 5, 19, s, left=False),
                "decoder_input_ids": torch.randint(
                    0, 19, (n, 3), generator=torch.Generator().manual_seed(s + 7)
                ),
            },
            last,
        ),
    }


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama", "t5"])
def test_huggingface_models_as_the_library_builds_them(family):
    """No wrapper: the model takes the dict of inputs as keyword arguments, returns its
    ModelOutput; the built-in modes read its logits, a callable picks a tensor."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, make, pick = _hf_cases(transformers)[family]
    model = model.double().eval()
    x1, x2 = make(4, 0), make(3, 1)
    keys = tuple(x1)
    ref_model = ByPosition(model, keys, pick)
    p1, p2 = tuple(x1.values()), tuple(x2.values())
    for outputs in ("trace", 2):
        assert_close(
            pk.tangent_kernel(
                model,
                x1,
                x2,
                outputs=lambda o: pick(o)[:, outputs] if outputs == 2 else pick(o).sum(1),
            ),
            reference_ntk(ref_model, p1, p2, lambda o: o[:, outputs] if outputs == 2 else o.sum(1)),
            torch.float64,
        )
    if family == "bert":  # its logits are the built-in modes' output
        assert_close(
            pk.tangent_kernel(model, x1, outputs="full"),
            reference_ntk(ref_model, p1, outputs="full"),
            torch.float64,
        )
    d = pk.describe(model, x1, outputs=lambda o: pick(o)[:, 0])
    # T5's relative position bias is looked up once for all examples (a [T, T] table
    # broadcast over the batch): no batch layout, so the dense path, exact
    dense = {r.name for r in d.rows if r.form == "dense"}
    assert all("relative_attention_bias" in n for n in dense), str(d)
