"""The benchmark's peers compute the same kernels as pathkernel (a fast wrong peer would make
every ratio meaningless), and the FLOP limit counts the work it says."""

import torch
from torch import nn

from pathkernel.bench.workloads import flop_limit, torch_func_grad_ntk, torch_func_ntk
from reference import assert_close, reference_ntk


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def test_torch_func_peers_match_the_reference():
    m, x = _model(), torch.randn(6, 5, dtype=torch.float64)
    assert_close(torch_func_ntk(m, x), reference_ntk(m, x), torch.float64)
    assert_close(
        torch_func_ntk(m, x, outputs="full"), reference_ntk(m, x, outputs="full"), torch.float64
    )
    pick = lambda o: o[:, 0] - o[:, 1]  # noqa: E731
    assert_close(
        torch_func_grad_ntk(m, x, pick, chunk=4), reference_ntk(m, x, outputs=pick), torch.float64
    )
    kw = torch_func_grad_ntk(nn.ModuleDict({"m": m}).m, {"input": x}, pick)
    assert_close(kw, reference_ntk(m, x, outputs=pick), torch.float64)
    m[0].requires_grad_(False)  # frozen layers (LoRA's base) are not in the kernel
    assert_close(torch_func_ntk(m, x), reference_ntk(m, x), torch.float64)
    assert_close(torch_func_grad_ntk(m, x, pick), reference_ntk(m, x, outputs=pick), torch.float64)


def test_flop_limit_counts_forward_backward_and_gram():
    m, n = _model(), 6
    x = torch.randn(n, 5, dtype=torch.float64)
    P = 5 * 7 + 7 + 7 * 3 + 3
    fwd = 2 * n * (5 * 7 + 7 * 3)  # the two matmuls
    one = flop_limit(m, x, lambda o: o[:, 0], 1.0)
    gram = n * (n + 1) / 2 * P * 2
    assert fwd + gram < one < 4 * fwd + gram  # the backward costs 1-2 forwards
    trace = flop_limit(m, x, "trace", 1.0)
    assert trace > 3 * gram  # C = 3 outputs: C backward passes and a C x wider Gram
