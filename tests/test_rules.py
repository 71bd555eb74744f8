"""Per-example weight gradients from factors (``_capture/rules.py``) against the plain
contraction in float64: token inputs added up by rows (padding -1 counts nothing), outputs
added into an existing sum, positions whose gradient is zero everywhere dropped."""

import pytest
import torch

from pathkernel._capture.rules import live_positions, one_hot, weight_grads


def _plain(A, D, shape, transposed, vocab):
    if A.dtype == torch.long:
        A = one_hot(A, vocab, D.dtype)
    m = torch.einsum("nscd,nsa->ncad" if transposed else "nscd,nsa->ncda", D, A)
    return m.reshape(*m.shape[:2], *shape)


@pytest.mark.parametrize("transposed", [True, False])
def test_token_rows_equal_the_one_hot_contraction(transposed):
    g = torch.Generator().manual_seed(0)
    n, S, C, dd, vocab = 3, 7, 2, 5, 11
    A = torch.randint(-1, vocab, (n, S), generator=g)
    A[0, :3] = 4  # a token repeated
    D = torch.randn(n, S, C, dd, generator=g, dtype=torch.float64)
    shape = (vocab, dd) if transposed else (dd, vocab)
    want = _plain(A, D, shape, transposed, vocab)
    got = weight_grads(A, D, shape, transposed, vocab)
    assert got.shape == (n, C, *shape)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    # added into another use's gradient of the same weight (a tied head's), in place
    H = torch.randn(n, C, *shape, generator=g, dtype=torch.float64)
    into = H.clone()
    out = weight_grads(A, D, shape, transposed, vocab, into=into)
    assert out.data_ptr() == into.data_ptr()
    torch.testing.assert_close(out, H + want, rtol=1e-13, atol=1e-13)


def test_positions_with_a_zero_gradient_everywhere_are_dropped():
    g = torch.Generator().manual_seed(1)
    n, S, C, dd, da = 4, 6, 2, 3, 5
    A = torch.randn(n, S, da, generator=g, dtype=torch.float64)
    D = torch.randn(n, S, C, dd, generator=g, dtype=torch.float64)
    D[:, [0, 2, 3]] = 0  # a head read at positions 1, 4, 5 only
    D[1, 4] = 0  # zero in one example only: kept
    A2, D2 = live_positions(A, D)
    assert D2.shape[1] == 3 and torch.equal(A2, A[:, [1, 4, 5]])
    want = _plain(A, D, (dd, da), False, 0)
    torch.testing.assert_close(weight_grads(A, D, (dd, da), False), want, rtol=1e-13, atol=0)
    nothing = torch.zeros_like(D)  # no position left: a zero gradient
    assert live_positions(A, nothing)[1].shape[1] == 0
    assert torch.equal(
        weight_grads(A, nothing, (dd, da), False), torch.zeros(n, C, dd, da).double()
    )


@pytest.mark.parametrize("outputs", ["trace", "full", 0])
@pytest.mark.parametrize("conv", [dict(padding=1), dict(stride=2, padding=2, dilation=2)])
def test_convolutions_materialized_directly_are_exact(monkeypatch, outputs, conv):
    """Wide convolutions at 16 x 16 and more: their per-example gradients come from one
    convolution with the examples as groups (no patches), bias included; the kernel equals
    the float64 reference, and the direct path was taken."""
    from torch import nn

    import pathkernel as pk
    from pathkernel._capture import extract
    from reference import assert_close, reference_ntk

    taken = []
    real = extract.direct_conv_grads

    def counted(*a, **k):
        z = real(*a, **k)
        taken.append(z is not None)
        return z

    monkeypatch.setattr(extract, "direct_conv_grads", counted)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 32, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(32, 6, 3, **conv),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 3),
    ).double()
    x = torch.randn(5, 2, 32, 32, dtype=torch.float64)
    K = pk.tangent_kernel(model, x, outputs=outputs)
    assert any(taken)
    assert_close(K, reference_ntk(model, x, outputs=outputs), torch.float64)
