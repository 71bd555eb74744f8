"""The native accumulator against numpy, on awkward shapes, both dtypes, both modes."""

import numpy as np
import pytest
import torch

from pathkernel import _backend
from pathkernel._backend import Term
from reference import TOL
from reference import gram_reference as reference


def make_side(rng, n, C, specs, dtype):
    terms = []
    for k, (S, da, dd, beta) in enumerate(specs):
        A = None if da is None else torch.from_numpy(rng.standard_normal((n, S, da))).to(dtype)
        D = torch.from_numpy(rng.standard_normal((n, S, C, dd))).to(dtype)
        terms.append(Term(A, D, beta, 0.5 + 0.75 * k))  # per-term weights
    return terms


SHAPES = [
    # n1, n2, C1, C2, [(S, da, dd, beta)]
    (1, 1, 1, 1, [(1, 1, 1, 0.0)]),
    (7, 13, 1, 1, [(1, 5, 3, 1.0), (1, 17, 1, 0.0)]),
    (300, 261, 1, 1, [(1, 31, 29, 1.0)]),  # more than one tile, not multiples
    (11, 5, 3, 2, [(2, 4, 3, 1.0), (1, None, 7, 0.0)]),  # channels, S > 1, a dense term
    (37, 41, 1, 1, [(3, 6, 5, 1.0), (5, 2, 7, 0.0)]),  # S differs between terms
    (23, 23, 1, 1, [(1, None, 19, 0.0)]),
    (19, 31, 1, 1, [(1, None, 1, 0.0), (1, 3, 1, 1.0)]),  # rank-one output factors
]


@pytest.mark.parametrize(
    "dtype,out_dtype",
    [
        (torch.float64, torch.float64),
        (torch.float32, torch.float32),
        (torch.float32, torch.float64),
    ],
)
@pytest.mark.parametrize("case", range(len(SHAPES)))
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_matches_numpy(case, dtype, out_dtype, weighted):
    n1, n2, C1, C2, specs = SHAPES[case]
    rng = np.random.default_rng(case)
    s1 = make_side(rng, n1, C1, specs, dtype)
    s2 = make_side(rng, n2, C2, specs, dtype)
    w = torch.from_numpy(rng.standard_normal(n2)).to(out_dtype) if weighted else None
    init = torch.from_numpy(rng.standard_normal((n1, n2, C1, C2))).to(out_dtype)
    out = init.clone()
    _backend.accumulate(out, s1, s2, alpha=-0.7, col_weights=w, tile=64)
    ref = init.double().numpy() + reference(s1, s2, -0.7, w)
    tol = TOL["gram", dtype]
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=tol, atol=tol * np.abs(ref).max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,C,tile", [(1, 1, 4), (97, 1, 16), (64, 3, 8), (130, 2, 256)])
def test_symmetric_matches_cross(n, C, tile, dtype):
    rng = np.random.default_rng(n)
    side = make_side(rng, n, C, [(1, 9, 4, 1.0), (2, 3, 5, 0.0), (1, None, 6, 0.0)], dtype)
    w = torch.from_numpy(rng.uniform(0.5, 2.0, n)).to(dtype)
    poison = torch.full((n, n, C, C), 0.25, dtype=dtype)
    sym = _backend.accumulate(poison.clone(), side, None, alpha=1.5, col_weights=w, tile=tile)
    ref = 0.25 + reference(side, None, 1.5, w)
    tol = TOL["gram", dtype]
    np.testing.assert_allclose(sym.double().numpy(), ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_threads_do_not_change_result():
    rng = np.random.default_rng(0)
    side = make_side(rng, 200, 1, [(1, 33, 17, 1.0)], torch.float64)
    a = _backend.accumulate(
        torch.zeros(200, 200, 1, 1, dtype=torch.float64), side, tile=32, threads=1
    )
    b = _backend.accumulate(
        torch.zeros(200, 200, 1, 1, dtype=torch.float64), side, tile=32, threads=2
    )
    assert torch.equal(a, b)


# ---- bad input: every argument is named, nothing crashes -------------------------------------


def _ok_side(n=4, dtype=torch.float64):
    return [Term(torch.ones(n, 1, 3, dtype=dtype), torch.ones(n, 1, 1, 2, dtype=dtype), 1.0)]


def test_rejects_wrong_out_shape():
    with pytest.raises(ValueError, match=r"out: expected shape \(4, 4, 1, 1\)"):
        _backend.accumulate(torch.zeros(4, 5, 1, 1, dtype=torch.float64), _ok_side())


def test_rejects_mixed_dtypes():
    s2 = _ok_side(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"side2\[0\].D: all factors must share one dtype"):
        _backend.accumulate(torch.zeros(4, 4, 1, 1, dtype=torch.float64), _ok_side(), s2)


def test_rejects_integer_dtype():
    side = [Term(None, torch.ones(2, 1, 1, 2, dtype=torch.int32), 0.0)]
    with pytest.raises(ValueError, match=r"side1\[0\].D: expected dtype float32 or float64"):
        _backend.accumulate(torch.zeros(2, 2, 1, 1, dtype=torch.float64), side)


def test_rejects_feature_mismatch():
    s2 = [
        Term(
            torch.ones(4, 1, 5, dtype=torch.float64),
            torch.ones(4, 1, 1, 2, dtype=torch.float64),
            1.0,
        )
    ]
    with pytest.raises(ValueError, match=r"side2\[0\].A: expected feature size 3"):
        _backend.accumulate(torch.zeros(4, 4, 1, 1, dtype=torch.float64), _ok_side(), s2)


def test_rejects_a_shape_mismatch():
    side = [
        Term(
            torch.ones(3, 1, 3, dtype=torch.float64),
            torch.ones(4, 1, 1, 2, dtype=torch.float64),
            1.0,
        )
    ]
    with pytest.raises(ValueError, match=r"side1\[0\].A: expected leading dims \(4, 1\)"):
        _backend.accumulate(torch.zeros(4, 4, 1, 1, dtype=torch.float64), side)


def test_rejects_aliasing_output():
    buf = torch.zeros(4 * 4 + 8, dtype=torch.float64)
    out = buf[:16].view(4, 4, 1, 1)
    side = [Term(None, buf[8:16].view(4, 1, 1, 2), 0.0)]
    with pytest.raises(ValueError, match=r"out: overlaps the memory of side1\[0\].D"):
        _backend.accumulate(out, side)


def test_rejects_bad_weights():
    with pytest.raises(ValueError, match=r"col_weights: expected shape \(4,\)"):
        _backend.accumulate(
            torch.zeros(4, 4, 1, 1, dtype=torch.float64),
            _ok_side(),
            col_weights=torch.ones(3, dtype=torch.float64),
        )
    with pytest.raises(ValueError, match=r"col_weights: expected the dtype of out"):
        _backend.accumulate(
            torch.zeros(4, 4, 1, 1, dtype=torch.float64),
            _ok_side(),
            col_weights=torch.ones(4, dtype=torch.float32),
        )


def test_rejects_noncontiguous_out_and_bad_tile():
    with pytest.raises(ValueError, match="out: expected a contiguous tensor"):
        _backend.accumulate(
            torch.zeros(4, 4, 1, 1, dtype=torch.float64).transpose(0, 1), _ok_side()
        )
    with pytest.raises(ValueError, match="tile: expected a positive tile size"):
        _backend.accumulate(torch.zeros(4, 4, 1, 1, dtype=torch.float64), _ok_side(), tile=0)


def test_rejects_empty_and_malformed_sides():
    from pathkernel import _native

    out = np.zeros((4, 4, 1, 1))
    with pytest.raises(ValueError, match="side1: expected at least one term"):
        _native.accumulate(out, [])
    with pytest.raises(ValueError, match=r"side1\[0\]: expected a tuple"):
        _native.accumulate(out, [(None, np.ones((4, 1, 1, 1)))])
    with pytest.raises(ValueError, match=r"side1\[0\]: beta and scale must be finite"):
        _native.accumulate(out, [(None, np.ones((4, 1, 1, 1)), 0.0, float("nan"))])
    with pytest.raises(ValueError, match=r"side1\[0\].D: expected 4 dims"):
        _native.accumulate(out, [(None, np.ones((4, 1, 1)), 0.0)])


@pytest.mark.parametrize(
    "M,N,bm,bn,sym,panel",
    [
        (1, 1, 4, 4, True, 1),
        (97, 97, 16, 16, True, 4),
        (100, 100, 33, 33, True, 8),
        (37, 53, 8, 13, False, 2),
    ],
)
def test_task_list_covers_each_element_once(M, N, bm, bn, sym, panel):
    """Host-side check of the tile index arithmetic (shared with the CUDA launch plan)."""
    from pathkernel import _native

    hits = np.zeros((M, N), dtype=int)
    for i0, m, j0, n in _native._testing.tasks(M, N, bm, bn, sym, panel):
        for i in range(i0, i0 + m):
            for j in range(j0, j0 + n):
                if not sym or j >= i:
                    hits[i, j] += 1
                    if sym and j > i:
                        hits[j, i] += 1
    assert (hits == 1).all()


@pytest.mark.parametrize(
    "rb,cb,sym",
    [(1, 1, True), (5, 5, True), (17, 17, True), (3, 7, False), (1, 4, False), (19, 5, False)],
)
@pytest.mark.parametrize("group", [1, 3, 8])
def test_cuda_tile_plan_on_host(rb, cb, sym, group):
    """The CUDA kernels' grouped tile enumeration, compiled for the host: every tile of the
    grid (its upper triangle when symmetric) exactly once, and consecutive tiles inside one
    group of row blocks."""
    from pathkernel import _native

    seen = [
        _native._testing.cuda_tile_coords(t, rb, cb, sym, group)
        for t in range(_native._testing.cuda_tile_count(rb, cb, sym))
    ]
    expect = {(r, c) for r in range(rb) for c in range(r if sym else 0, cb)}
    assert len(seen) == len(expect) and set(seen) == expect
    groups = [r // group for r, _ in seen]
    assert groups == sorted(groups)
    if group == 1:  # plain row-major order
        assert seen == sorted(expect)


@pytest.mark.parametrize("sym", [False, True])
def test_cuda_persistent_waves_share_panels_on_host(sym):
    """The persistent kernel (ws) runs tiles t, t + G, ... on each of G blocks, so a wave of G
    consecutive tiles is in flight at once: in the grouped order it reads far fewer distinct
    row and column panels (L2 reuse) than in row-major order, and every tile is run once."""
    from pathkernel import _native

    rb = cb = 128  # N = 16,384 in tiles of 128
    G = 132  # blocks: one per SM of an H100 / H200
    n = _native._testing.cuda_tile_count(rb, cb, sym)

    def mean_panels(group):
        order = [_native._testing.cuda_tile_coords(t, rb, cb, sym, group) for t in range(n)]
        runs = [sorted(order[b::G]) for b in range(G)]  # what each persistent block runs
        assert sorted(t for r in runs for t in r) == sorted(set(order)) and len(order) == n
        waves = [order[w : w + G] for w in range(0, n - G + 1, G)]
        return np.mean([len({r for r, _ in w}) + len({c for _, c in w}) for w in waves])

    assert mean_panels(8) < 0.5 * mean_panels(1)


def test_cuda_epilogue_and_ownership_on_host():
    from pathkernel import _native

    assert _native._testing.cuda_fuse(1.0, 2.0, 3.0, 1.0, True) == 1.0 + (2.0 + 1.0) * 3.0
    assert _native._testing.cuda_fuse(1.0, 2.0, 3.0, 1.0, False) == 4.0
    n = 6
    hits = np.zeros((n, n), dtype=int)
    for i in range(n):
        for j in range(n):
            if _native._testing.cuda_owns(i, j, True):
                hits[i, j] += 1
            if _native._testing.cuda_mirrors(i, j, True):
                hits[j, i] += 1
    assert (hits == 1).all()
    assert _native._testing.cuda_owns(3, 1, False) and not _native._testing.cuda_mirrors(
        1, 3, False
    )


def test_random_valid_and_invalid_calls_never_crash():
    """Random shapes, dtypes, layouts and a few corruptions: a correct result or a ValueError."""
    from pathkernel import _native

    rng = np.random.default_rng(7)
    for _ in range(150):
        n1, n2, C = int(rng.integers(0, 9)), int(rng.integers(0, 9)), int(rng.integers(1, 3))
        dt = np.float32 if rng.random() < 0.5 else np.float64
        specs = [
            (
                int(rng.integers(1, 3)),
                None if rng.random() < 0.3 else int(rng.integers(0, 6)),
                int(rng.integers(0, 6)),
                float(rng.integers(0, 2)),
            )
            for _ in range(int(rng.integers(1, 4)))
        ]

        def side(n):
            return [
                (
                    None if da is None else rng.standard_normal((n, S, da)).astype(dt),
                    rng.standard_normal((n, S, C, dd)).astype(dt),
                    beta,
                )
                for S, da, dd, beta in specs
            ]

        s1, s2 = side(n1), side(n2)
        out = np.zeros((n1, n2, C, C), dtype=dt)
        corrupt = rng.integers(0, 6)
        if corrupt == 1:
            out = np.zeros((n1 + 1, n2, C, C), dtype=dt)
        elif corrupt == 2 and s2:
            A, D, b = s2[0]
            s2[0] = (A, D[:, :, :, :-1] if D.shape[3] else D.astype(np.int64), b)
        elif corrupt == 3:
            A, D, b = s1[0]
            s1[0] = (
                A,
                np.asfortranarray(D)
                if D.ndim == 4 and D.size > 1 and min(D.shape) > 1
                else D.astype(np.float16),
                b,
            )
        try:
            _native.accumulate(out, s1, s2)
        except ValueError:
            assert corrupt in (1, 2, 3)
            continue
        ref = reference(
            [
                Term(
                    None if a is None else torch.from_numpy(np.ascontiguousarray(a)),
                    torch.from_numpy(np.ascontiguousarray(d)),
                    b,
                )
                for a, d, b in s1
            ],
            [
                Term(None if a is None else torch.from_numpy(a), torch.from_numpy(d), b)
                for a, d, b in s2
            ],
            1.0,
            None,
        )
        tol = TOL["gram", torch.float32 if dt == np.float32 else torch.float64]
        np.testing.assert_allclose(
            out, ref, rtol=tol, atol=tol * max(1.0, np.abs(ref).max(initial=0))
        )


@pytest.mark.parametrize("tensor_cores", [True, False])
def test_cuda_selfcheck_logic_runs_on_the_cpu(tensor_cores):
    """The GPU self-check's reference/rounding/tolerance code, exercised with CPU tensors."""
    from pathkernel._backend import cuda_check

    cuda_check._CHECKED.clear()
    cuda_check.selfcheck(torch.float32, torch.float32, "3xtf32", torch.device("cpu"), tensor_cores)
    assert (
        cuda_check._CHECKED[("torch.float32", "torch.float32", "3xtf32", "cpu", tensor_cores)]
        is True
    )
    cuda_check._CHECKED.clear()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,tile", [(1, 4), (97, 16), (130, 64), (300, 512)])
def test_symmetric_triangular_diagonal_tiles(n, tile, dtype):
    """S = C = 1: diagonal tiles are computed as triangles (gemmt), every element once."""
    rng = np.random.default_rng(n + tile)
    side = make_side(rng, n, 1, [(1, 9, 4, 1.0), (1, None, 6, 0.0), (1, 5, 1, 1.0)], dtype)
    w = torch.from_numpy(rng.uniform(0.5, 2.0, n)).to(dtype)
    init = torch.from_numpy(rng.standard_normal((n, n, 1, 1))).to(dtype)
    got = _backend.accumulate(init.clone(), side, None, alpha=0.5, col_weights=w, tile=tile)
    ref = init.double().numpy() + reference(side, None, 0.5, w)
    tol = TOL["gram", dtype]
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=tol, atol=tol * np.abs(ref).max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("positions", [1, 2])  # S = 1 everywhere: triangles (gemmt)
def test_few_tiles_cut_the_inner_dimension_over_the_threads(dtype, threads, symmetric, positions):
    """Fewer tiles than threads: each GEMM's inner dimension is cut into slices computed by
    the threads and summed (triangles, rectangles, S > 1, an uneven last slice)."""
    rng = np.random.default_rng(threads)
    specs = [(1, 3100, 5, 1.0), (positions, 2049, 3, 0.0), (1, None, 4000, 0.0), (1, 7, 2100, 1.0)]
    s1 = make_side(rng, 21, 1, specs, dtype)
    s2 = None if symmetric else make_side(rng, 9, 1, specs, dtype)
    n2 = 21 if symmetric else 9
    init = torch.from_numpy(rng.standard_normal((21, n2, 1, 1))).to(dtype)
    got = _backend.accumulate(init.clone(), s1, s2, alpha=0.5, threads=threads)
    ref = init.double().numpy() + reference(s1, s2, 0.5, None)
    tol = TOL["gram", dtype]
    np.testing.assert_allclose(got.double().numpy(), ref, rtol=tol, atol=tol * np.abs(ref).max())
    again = _backend.accumulate(init.clone(), s1, s2, alpha=0.5, threads=threads)
    assert torch.equal(got, again)  # the slices are summed in a fixed order
