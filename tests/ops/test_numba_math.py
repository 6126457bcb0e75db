"""The Numba kernels' own elementary functions (fastflow/kernels/numba/_math.py) against numpy,
over their whole ranges and at the special values the kernels rely on."""

from __future__ import annotations

import numba as nb
import numpy as np
import pytest

from fastflow.kernels.numba import _math


def _vectorised(fn, dtype=np.float64):
    @nb.njit(fastmath={"contract", "arcp"}, error_model="numpy")
    def apply(a, out):
        for i in range(a.shape[0]):
            out[i] = fn(a[i])

    def call(a):
        a = np.ascontiguousarray(a, dtype=dtype)
        out = np.empty_like(a)
        apply(a, out)
        assert out.dtype == dtype
        return out

    return call


def _max_rel_err(got, want):
    finite = np.isfinite(want) & (want != 0)
    return float(np.max(np.abs(got[finite] - want[finite]) / np.abs(want[finite])))


def test_exp_matches_numpy_over_its_range_and_specials():
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.uniform(-745, 709.7, 200_000), rng.uniform(-1, 1, 100_000)])
    got = _vectorised(_math.exp)(a)
    want = np.exp(a)
    normal = want >= np.finfo(np.float64).tiny
    assert _max_rel_err(got[normal], want[normal]) < 2e-15
    # subnormal results carry fewer bits: judge them in units of the smallest subnormal
    assert np.max(np.abs(got[~normal] - want[~normal])) <= 2 * 5e-324
    specials = np.array([-np.inf, -1e4, -746.0, 0.0, -0.0, 709.8, 1e4, np.inf, np.nan])
    with np.errstate(over="ignore"):
        want = np.exp(specials)
    np.testing.assert_array_equal(_vectorised(_math.exp)(specials), want)


def test_log1p_unit_matches_numpy_on_the_unit_interval():
    a = np.concatenate([np.linspace(0.0, 1.0, 200_001), np.geomspace(1e-300, 1.0, 10_000)])
    got = _vectorised(_math.log1p_unit)(a)
    assert _max_rel_err(got, np.log1p(a)) < 2e-15
    assert got[0] == 0.0


def test_log_matches_numpy_from_subnormals_to_the_largest_float():
    rng = np.random.default_rng(1)
    a = np.concatenate([
        np.exp(rng.uniform(-744, 709, 200_000)),
        rng.uniform(0.5, 2.0, 100_000),  # around 1, where cancellation would show
        np.array([5e-324, 1e-310, 2.2250738585072014e-308, 1.0, np.finfo(np.float64).max]),
    ])
    got = _vectorised(_math.log)(a)
    want = np.log(a)
    assert _max_rel_err(got, want) < 2e-15
    # near 1 the result is tiny: judge it absolutely against the float spacing of x
    near = np.abs(a - 1.0) < 1e-3
    assert np.max(np.abs(got[near] - want[near])) < 4e-16
    assert got[np.flatnonzero(a == 1.0)[0]] == 0.0


@pytest.mark.parametrize(
    "x, expected",
    [(0.0, -np.inf), (-0.0, -np.inf), (-1.0, np.nan), (-np.inf, np.nan), (np.inf, np.inf), (np.nan, np.nan)],
)
def test_log_special_values(x, expected):
    got = _vectorised(_math.log)(np.array([x]))[0]
    np.testing.assert_equal(got, expected)


def test_exp32_is_float32_accurate():
    a = np.concatenate([np.linspace(-103.0, 88.7, 400_001), np.linspace(-1, 1, 100_001)]).astype(np.float32)
    got = _vectorised(_math.exp32, np.float32)(a).astype(np.float64)
    want = np.exp(a.astype(np.float64))
    normal = want >= np.finfo(np.float32).tiny
    assert _max_rel_err(got[normal], want[normal]) < 2.5e-7  # ~2 ulp of float32
    assert np.max(np.abs(got[~normal] - want[~normal])) <= 2 * float(np.finfo(np.float32).smallest_subnormal)
    specials = np.array([-np.inf, -200.0, 0.0, 88.8, 200.0, np.inf, np.nan], np.float32)
    with np.errstate(over="ignore"):
        want = np.exp(specials.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(_vectorised(_math.exp32, np.float32)(specials), want)


def test_exp32_bounded_is_exp32_on_its_range_and_clamps_outside():
    rng = np.random.default_rng(3)
    a = np.concatenate([np.linspace(-87.0, 87.0, 1_000_001), rng.uniform(-87, 87, 200_000),
                        np.array([-87.0, 87.0, 0.0, -0.0, 1e-30, -1e-30])]).astype(np.float32)
    bounded = _vectorised(_math.exp32_bounded, np.float32)
    np.testing.assert_array_equal(bounded(a).view(np.int32), _vectorised(_math.exp32, np.float32)(a).view(np.int32))
    edge = bounded(np.array([-87.0, 87.0], np.float32))
    outside = bounded(np.array([-np.inf, -500.0, -87.5, 87.5, 500.0, np.inf, np.nan], np.float32))
    np.testing.assert_array_equal(outside[:6], np.repeat(edge, 3))
    assert np.isnan(outside[6])


def test_log1p_unit32_is_float32_accurate():
    a = np.concatenate([np.linspace(0.0, 1.0, 200_001), np.geomspace(1e-38, 1.0, 10_000)]).astype(np.float32)
    got = _vectorised(_math.log1p_unit32, np.float32)(a).astype(np.float64)
    assert _max_rel_err(got, np.log1p(a.astype(np.float64))) < 2.5e-7


def _sum8_definition(v, o, n):
    """The log-det sum's definition in plain Python floats: eight partials, partial l taking
    elements l, l+8, ... in order, the tail on partial 0, then a fixed pairwise tree."""
    p = [0.0] * 8
    n8 = n - n % 8
    for j in range(n8):
        p[j % 8] += float(v[o + j])
    for j in range(n8, n):
        p[0] += float(v[o + j])
    return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_simd_run_sums_are_bitwise_the_scalar_definition(dtype):
    """``_simd.sum8_runs4`` (explicit <8 x double> partials, four runs at once) must give the
    bits of the scalar ``_sum8`` and of the definition, for every run length and offset
    (vector body and scalar tail), overlapping runs (d < n, d = 0), values over 16 decades
    (so that the order shows in the bits) and NaN/inf."""
    from fastflow.kernels.numba._simd import sum8_runs1, sum8_runs4
    from fastflow.kernels.numba.coupling import _sum8

    @nb.njit
    def simd4(v, o, n, d):
        return sum8_runs4(v, np.uint64(o), n, np.uint64(d))

    @nb.njit
    def simd1(v, o, n):
        return sum8_runs1(v, np.uint64(o), n, np.uint64(0))[0]

    @nb.njit
    def scalar(v, o, n):
        return _sum8(v, np.uint64(o), n)

    rng = np.random.default_rng(7)
    v = (rng.standard_normal(1200) * 10.0 ** rng.integers(-8, 8, 1200)).astype(dtype)
    bits = lambda a: np.array(a, dtype=np.float64).view(np.int64).tolist()  # noqa: E731
    checked = 0
    for n in range(0, 41):
        for o in (0, 1, 5):
            for d in (n, n + 3, 2, 0):
                want = [_sum8_definition(v, o + r * d, n) for r in range(4)]
                assert bits(simd4(v, o, n, d)) == bits(want), (n, o, d)
                assert bits([scalar(v, o + r * d, n) for r in range(4)]) == bits(want)
                checked += 1
            assert bits(simd1(v, o, n)) == bits(want[0])
    assert checked == 41 * 12
    specials = np.array([1.0, np.nan, 2.0, np.inf] + [0.5] * 12, dtype=dtype)
    got = simd4(specials, 0, 4, 4)
    assert np.isnan(got[0]) and got[1:] == (2.0, 2.0, 2.0)
    got = simd4(np.array([np.inf, -np.inf] + [1.0] * 30, dtype=dtype), 0, 8, 8)
    assert np.isnan(got[0]) and got[1:] == (8.0, 8.0, 8.0)


def test_simd_run_sums_refuse_strided_arrays():
    from numba.core.errors import TypingError

    from fastflow.kernels.numba._simd import sum8_runs4

    @nb.njit
    def simd4(v):
        return sum8_runs4(v, np.uint64(0), 8, np.uint64(8))

    with pytest.raises(TypingError):
        simd4(np.ones(64, np.float32)[::2])  # an 'A'-layout view: its strides would be ignored
    assert simd4(np.ones(64, np.float32)) == (8.0, 8.0, 8.0, 8.0)
