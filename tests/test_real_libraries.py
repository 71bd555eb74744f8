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
