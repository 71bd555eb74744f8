"""CUDA backend: every kernel against a float64 reference on the GPU (skipped without one)."""

import numpy as np
import pytest
import torch

import pathkernel as pk
from pathkernel._backend import Term, accumulate

pytestmark = pytest.mark.cuda
HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU")


def test_module_built_when_a_gpu_is_present():
    if not HAS_GPU:
        pytest.skip("no CUDA GPU")
    info = pk.backend_info()
    assert info["cuda"], (
        "a GPU is present but pathkernel._native_cuda was not built: "
        "reinstall with nvcc on the PATH (PATHKERNEL_CUDA=ON)"
    )
    assert info["cuda_devices"] >= 1


def _side(g, n, C, specs, dtype, device):
    terms = []
    for S, da, dd, beta in specs:
        A = None if da is None else torch.randn(n, S, da, generator=g, dtype=torch.float64)
        D = torch.randn(n, S, C, dd, generator=g, dtype=torch.float64)
        terms.append(Term(A, D, beta))
    gpu = [
        Term(None if t.A is None else t.A.to(device, dtype), t.D.to(device, dtype), t.beta)
        for t in terms
    ]
    return terms, gpu


CASES = [  # n1, n2, C, specs: tensor-core tiles (S = C = 1) and the generic kernel
    (33, 47, 1, [(1, 31, 17, 1.0), (1, 70, 1, 0.0)]),
    (64, 64, 1, [(1, 128, 96, 1.0)]),
    (100, 37, 1, [(1, None, 45, 0.0), (1, 9, 33, 1.0)]),
    (19, 23, 3, [(2, 5, 7, 1.0), (1, None, 4, 0.0)]),
    (300, 261, 1, [(1, 64, 40, 1.0), (1, None, 8, 0.0), (1, 24, 1, 1.0)]),  # several tiles
    (40, 50, 1, [(1, 3, 5, 1.0)] * 18),  # more terms than one launch takes
    # 16-byte rows in every precision (the TMA kernel ws can take them):
    (300, 261, 1, [(1, 64, 40, 1.0), (1, None, 8, 0.0), (1, 24, 16, 1.0)]),  # partial chunks
    (130, 140, 1, [(1, 8, 8, 1.0)] * 18),  # small K, more terms than one launch takes
    (200, 129, 1, [(1, 520, 264, 1.0)]),  # more K chunks than pipeline stages
    (1800, 1800, 1, [(1, 16, 8, 1.0)]),  # more tiles than SMs: persistent blocks loop
]
PRECISIONS = {
    torch.float32: ["3xtf32", "tf32", "exact"],
    torch.float16: ["3xtf32"],
    torch.bfloat16: ["3xtf32"],
    torch.float64: ["exact"],
}


def torch_composition(side1, side2, alpha, w, precision):
    """The same sum as the fused kernel, as a torch composition on the GPU in the inputs'
    precision (two matmul Grams per term, their product, the sum): float64 on the CPU.
    TF32 matmuls for precision "tf32"; float32 inputs are otherwise multiplied in float32."""
    side2 = side1 if side2 is None else side2
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        out = 0
        for t1, t2 in zip(side1, side2):
            GD = torch.einsum("iscd,jted->ijstce", t1.D, t2.D)
            GA = (
                torch.ones((), dtype=t1.D.dtype, device=t1.D.device)
                if t1.A is None
                else torch.einsum("isa,jta->ijst", t1.A, t2.A) + t1.beta
            )
            GA = GA.reshape(GA.shape + (1, 1)) if t1.A is not None else GA
            out = out + t1.scale * (GA * GD).sum((2, 3))
        out = alpha * out * w.to(out.dtype).reshape(1, -1, 1, 1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return out.double().cpu()


@needs_gpu
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype,precision", [(d, p) for d, ps in PRECISIONS.items() for p in ps])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("symmetric", [False, True])
def test_kernels_against_float64(case, dtype, precision, out_dtype, symmetric):
    """Error against float64 (inputs rounded as the kernel sees them) within twice the error
    of the torch composition at the same precision (float64: 1e-12 relative)."""
    from reference import gram_reference

    n1, n2, C, specs = CASES[case]
    if symmetric:
        n2 = n1
    g = torch.Generator().manual_seed(case)
    s1, g1 = _side(g, n1, C, specs, dtype, "cuda")
    s2, g2 = (s1, None) if symmetric else _side(g, n2, C, specs, dtype, "cuda")
    w = torch.rand(n2, generator=g, dtype=torch.float64) + 0.5
    # a poisoned start: every element must receive exactly its own increment
    init = torch.randn(n1, n2, C, C, generator=g, dtype=torch.float64)
    out = init.to("cuda", out_dtype)
    accumulate(out, g1, g2, alpha=0.75, col_weights=w.to("cuda", out_dtype), precision=precision)
    torch.cuda.synchronize()
    rounded = lambda side: [
        Term(None if t.A is None else t.A.to(dtype).double(), t.D.to(dtype).double(), t.beta)
        for t in side
    ]
    ref = gram_reference(rounded(s1), None if symmetric else rounded(s2), 0.75, w)
    scale = np.abs(ref).max()
    err = np.abs(out.double().cpu().numpy() - init.numpy() - ref).max() / scale
    if dtype == torch.float64:
        bound = 1e-12
    else:
        peer = torch_composition(g1, g2, 0.75, w.to("cuda", dtype), precision).numpy()
        bound = 2 * np.abs(peer - ref).max() / scale
        bound = max(bound, 4 * torch.finfo(out_dtype).eps)  # the output's own rounding
    assert err <= bound, f"error {err:.2e} > {bound:.2e}"


def _runs_sm90a() -> bool:
    return torch.cuda.get_device_capability() == (9, 0) and "90a" in pk.backend_info().get(
        "cuda_arches", ""
    )


@needs_gpu
def test_a_forced_variant_runs_where_it_can(monkeypatch):
    """PATHKERNEL_CUDA_FUSED runs the variant it names (so that the variant runs of the
    tests and the timings measure it), and falls back where that variant cannot run the call:
    ws on rows that are not 16-byte aligned, wg32 and ws off sm_90a, 3xTF32 without wgmma."""
    from pathkernel._backend import last_cuda_kernel

    g = torch.Generator().manual_seed(0)
    _, aligned = _side(g, 200, 1, [(1, 64, 40, 1.0)], torch.bfloat16, "cuda")
    _, odd = _side(g, 200, 1, [(1, 63, 40, 1.0)], torch.bfloat16, "cuda")
    hopper = _runs_sm90a()
    expect = {
        "ldm16": ["fused_mma_kernel"] * 2,
        "ldm32": ["fused_mma_kernel"] * 2,
        "wg32": ["fused_mma_kernel (wgmma)" if hopper else "fused_mma_kernel"] * 2,
        "ws": ["ws_kernel" if hopper else "fused_mma_kernel", "fused_mma_kernel"],
    }
    for variant, (on_aligned, on_odd) in expect.items():
        monkeypatch.setenv("PATHKERNEL_CUDA_FUSED", variant)
        for side, name in ((aligned, on_aligned), (odd, on_odd)):
            accumulate(torch.zeros(200, 200, 1, 1, device="cuda"), side, precision="tf32")
            assert last_cuda_kernel() == name, variant
        f32 = [Term(t.A.float(), t.D.float(), t.beta) for t in aligned]
        accumulate(torch.zeros(200, 200, 1, 1, device="cuda"), f32, precision="3xtf32")
        assert last_cuda_kernel() == "fused_mma_kernel (3xTF32)", variant
    monkeypatch.setenv("PATHKERNEL_CUDA_FUSED", "fast")
    with pytest.raises(RuntimeError, match="PATHKERNEL_CUDA_FUSED: expected ws, wg32"):
        accumulate(torch.zeros(200, 200, 1, 1, device="cuda"), aligned, precision="tf32")


@needs_gpu
def test_tangent_kernel_pipeline_on_gpu_matches_cpu():
    from models import CNN, mlp

    for model, x in [
        (mlp(), torch.randn(40, 6, dtype=torch.float64)),
        (CNN().double(), torch.randn(12, 1, 6, 6, dtype=torch.float64)),
    ]:
        cpu = pk.tangent_kernel(model, x, outputs="full")
        gpu = pk.tangent_kernel(model.cuda(), x.cuda(), outputs="full")
        assert gpu.device.type == "cuda"
        assert torch.allclose(gpu.cpu(), cpu, rtol=1e-10, atol=1e-12)


@needs_gpu
def test_bad_cuda_arguments():
    out = torch.zeros(4, 4, 1, 1, device="cuda")
    side = [Term(None, torch.ones(4, 1, 1, 2, device="cuda"), 0.0)]
    with pytest.raises(ValueError, match="out: all tensors must be on one device"):
        accumulate(out, [Term(None, torch.ones(4, 1, 1, 2), 0.0)])
    with pytest.raises(ValueError, match="precision: expected"):
        accumulate(out, side, precision="fast")
    with pytest.raises(ValueError, match=r"out: expected shape \(4, 4, 1, 1\)"):
        accumulate(torch.zeros(4, 5, 1, 1, device="cuda"), side)
