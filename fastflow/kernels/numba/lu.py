"""Numba kernels for the small-matrix half of Glow's LU 1x1 convolution (Kingma & Dhariwal, 2018).

The op ``y = A x + c`` per pixel has two parts: the data pass (a GEMM, which torch's BLAS does
best) and the O(C^3) algebra on the factors: assembling ``A`` and ``c`` from
``W = P L (U + diag(sign * exp(log_s)))`` and ActNorm, and in the backward the chain rule from
``(dA, dc)`` back to ``L``, ``U``, ``log_s`` and ActNorm's parameters. With the few channels
of a Glow step (4 to 48) that algebra is ~15 tiny torch ops forward and ~30 backward, ~10 us
of dispatch each, which is most of a small batch's step. Here each half is one call.

Conventions are those of :mod:`fastflow.kernels.reference.lu` (``P = I[perm]``, only the strict
triangles of ``lower``/``upper`` are read). Arithmetic is float64 whatever the storage; the
caller rounds. Matrices are C-contiguous ``(C, C)`` arrays, vectors ``(C,)``.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
import torch

from fastflow.kernels.numba import BACKEND
from fastflow.kernels.torch import lu as tlu

_NJIT = dict(cache=True, error_model="numpy")


@nb.njit(**_NJIT)
def _factors(lower, upper, log_s, sign):
    """``(L, M, d)``: ``L`` unit lower, ``M = U + diag(d)``, ``d = sign * exp(log_s)``, float64."""
    c = lower.shape[0]
    lo = np.empty((c, c), np.float64)
    m = np.empty((c, c), np.float64)
    d = np.empty(c, np.float64)
    for i in range(c):
        d[i] = np.float64(sign[i]) * math.exp(np.float64(log_s[i]))
        for j in range(c):
            lo[i, j] = np.float64(lower[i, j]) if j < i else (1.0 if j == i else 0.0)
            m[i, j] = np.float64(upper[i, j]) if j > i else (d[i] if j == i else 0.0)
    return lo, m, d


@nb.njit(**_NJIT)
def _weight(perm, lo, m, w):
    """``W = (L M)[perm]``; ``(L M)[i, j]`` sums over ``k <= min(i, j)`` only."""
    c = lo.shape[0]
    for r in range(c):
        i = perm[r]
        for j in range(c):
            acc = 0.0
            for k in range(min(i, j) + 1):
                acc += lo[i, k] * m[k, j]
            w[r, j] = acc


@nb.njit(**_NJIT)
def _inverse_weight(perm, lo, m, v):
    """``W^-1 = M^-1 L^-1 P^T`` by forward then back substitution, column by column."""
    c = lo.shape[0]
    col = np.empty(c, np.float64)
    for r in range(c):  # column r of P^T is the unit vector e_{perm[r]}
        for i in range(c):
            acc = 1.0 if i == perm[r] else 0.0
            for k in range(i):
                acc -= lo[i, k] * col[k]
            col[i] = acc  # unit diagonal
        for i in range(c - 1, -1, -1):
            acc = col[i]
            for k in range(i + 1, c):
                acc -= m[i, k] * v[k, r]
            v[i, r] = acc / m[i, i]


@nb.njit(**_NJIT)
def assemble(perm, lower, upper, log_s, sign, an_b, an_ls, has_an, inverse, a_out, c_out):
    """The per-pixel map ``y = A x + c`` of the op into ``a_out (C, C)`` and ``c_out (C,)``.

    Forward: ``A = W diag(a)``, ``c = A b``. Inverse: ``A = diag(1/a) W^-1``, ``c = -b``
    (``a = exp(an_ls)``, ``b = an_b``; without ActNorm ``a = 1``, ``c = 0``).
    """
    c = lower.shape[0]
    lo, m, d = _factors(lower, upper, log_s, sign)
    w = np.empty((c, c), np.float64)
    if not inverse:
        _weight(perm, lo, m, w)
        for r in range(c):
            acc = 0.0
            for j in range(c):
                v = w[r, j]
                if has_an:
                    v *= math.exp(np.float64(an_ls[j]))
                    acc += v * np.float64(an_b[j])
                a_out[r, j] = v
            c_out[r] = acc
    else:
        _inverse_weight(perm, lo, m, w)
        for r in range(c):
            s = math.exp(-np.float64(an_ls[r])) if has_an else 1.0
            for j in range(c):
                a_out[r, j] = w[r, j] * s
            c_out[r] = -np.float64(an_b[r]) if has_an else 0.0


@nb.njit(**_NJIT)
def parameter_grads(g_a, g_c, g_lad_sum, n, perm, lower, upper, log_s, sign, an_b, an_ls, has_an, inverse,
                    g_bias, g_logscale, g_lower, g_upper, g_log_s):
    """The chain rule from ``(gA, gc)`` of :func:`assemble`'s map (and the log-det's gradient
    ``g_lad_sum``, summed over the batch; ``n`` pixels per sample) to the factors; the same
    formulas as :func:`fastflow.kernels.reference.lu.parameter_grads`. ``g_lower``/``g_upper``
    are zero outside the strict triangles; ``g_bias``/``g_logscale`` are written only with
    ActNorm."""
    c = lower.shape[0]
    lo, m, d = _factors(lower, upper, log_s, sign)
    g_w = np.empty((c, c), np.float64)
    sgn = -1.0 if inverse else 1.0
    if not inverse:
        w = np.empty((c, c), np.float64)
        _weight(perm, lo, m, w)
        if has_an:
            a = np.empty(c, np.float64)
            for j in range(c):
                a[j] = math.exp(np.float64(an_ls[j]))
            for j in range(c):
                gb = 0.0  # g_bias = A^T g_c
                gl = 0.0  # sum_r W[r, j] (gA + g_c b^T)[r, j]
                for r in range(c):
                    gb += w[r, j] * a[j] * g_c[r]
                    gt = g_a[r, j] + g_c[r] * np.float64(an_b[j])
                    gl += w[r, j] * gt
                    g_w[r, j] = gt * a[j]
                g_bias[j] = gb
                g_logscale[j] = gl * a[j] + n * g_lad_sum
        else:
            for r in range(c):
                for j in range(c):
                    g_w[r, j] = g_a[r, j]
    else:
        v = np.empty((c, c), np.float64)
        _inverse_weight(perm, lo, m, v)
        g_v = np.empty((c, c), np.float64)
        for r in range(c):
            s = math.exp(-np.float64(an_ls[r])) if has_an else 1.0
            if has_an:
                acc = 0.0  # d/d an_ls[r] of A[r, :] = -A[r, :]
                for j in range(c):
                    acc += g_a[r, j] * v[r, j] * s
                g_bias[r] = -g_c[r]
                g_logscale[r] = -acc - n * g_lad_sum
            for j in range(c):
                g_v[r, j] = g_a[r, j] * s
        # d(W^-1) = -W^-1 dW W^-1, so gW = -V^T gV V^T
        t = np.empty((c, c), np.float64)
        for i in range(c):
            for j in range(c):
                acc = 0.0
                for k in range(c):
                    acc += v[k, i] * g_v[k, j]
                t[i, j] = acc
        for i in range(c):
            for j in range(c):
                acc = 0.0
                for k in range(c):
                    acc += t[i, k] * v[j, k]
                g_w[i, j] = -acc
    # W = (L M)[perm]: row r of W is row perm[r] of L M
    g_lm = np.zeros((c, c), np.float64)
    for r in range(c):
        for j in range(c):
            g_lm[perm[r], j] = g_w[r, j]
    for i in range(c):
        for j in range(c):
            if j < i:  # g_L = g_LM M^T, strict lower part
                acc = 0.0
                for k in range(j, c):
                    acc += g_lm[i, k] * m[j, k]
                g_lower[i, j] = acc
            else:
                g_lower[i, j] = 0.0
            if j >= i:  # g_M = L^T g_LM, upper part with the diagonal
                acc = 0.0
                for k in range(i, c):
                    acc += lo[k, i] * g_lm[k, j]
                if j == i:
                    g_log_s[i] = acc * d[i] + sgn * n * g_lad_sum
                    g_upper[i, j] = 0.0
                else:
                    g_upper[i, j] = acc
            else:
                g_upper[i, j] = 0.0


# --------------------------------------------------------------------------------------------
# The launcher interface of kernels/<backend>/lu.py (see kernels/reference/lu.py). The O(C^3)
# algebra on the factors (assembling A, c; the chain rule back to the factors) is one compiled
# call each instead of ~15 and ~30 tiny torch ops, which dominate small Glow steps; the data
# pass is the torch backend's BLAS GEMM. Scalar O(C^3) loops lose to BLAS on wide layers: above
# MAX_CHANNELS the algebra is the torch backend's too.
# --------------------------------------------------------------------------------------------

# A fact of this backend (its declaration in __init__.py): above this many channels the algebra is
# the torch backend's.
MAX_CHANNELS = BACKEND.limits["lu_max_channels"]


def _arrays(an_b, an_ls, perm, lower, upper, log_s, sign):
    f = [t.detach().contiguous().numpy() for t in (lower, upper, log_s, sign)]
    has_an = an_ls is not None
    an = [t.detach().contiguous().numpy() for t in (an_b, an_ls)] if has_an else [f[2], f[2]]
    return (perm.contiguous().numpy(), *f, *an, has_an)


def coefficients(cd, an_b, an_ls, perm, lower, upper, log_s, sign, inverse):
    c = lower.shape[0]
    a_mat, bias = np.empty((c, c)), np.empty(c)
    assemble(*_arrays(an_b, an_ls, perm, lower, upper, log_s, sign), bool(inverse), a_mat, bias)
    return torch.from_numpy(a_mat).to(cd), (torch.from_numpy(bias).to(cd) if an_ls is not None else None)


def chain(cd, g_a, g_c, g_lad_sum, n, an_b, an_ls, perm, lower, upper, log_s, sign, inverse, a_mat):
    c = lower.shape[0]
    out = [np.empty(c), np.empty(c), np.empty((c, c)), np.empty((c, c)), np.empty(c)]
    parameter_grads(g_a.double().numpy(), g_c.double().numpy(), float(g_lad_sum), float(n),
                    *_arrays(an_b, an_ls, perm, lower, upper, log_s, sign), bool(inverse), *out)
    grads = [torch.from_numpy(o) for o in out]
    if an_ls is None:
        grads[0] = grads[1] = None
    return grads


def forward(x3, an_b, an_ls, perm, lower, upper, log_s, sign, inverse):
    if lower.shape[0] > MAX_CHANNELS:
        return tlu.forward(x3, an_b, an_ls, perm, lower, upper, log_s, sign, inverse)
    # Always the assembled map: with few channels forming A is cheap, also when B*N < C.
    cd = tlu.compute_dtype(x3.dtype)
    a_mat, bias = coefficients(cd, an_b, an_ls, perm, lower, upper, log_s, sign, inverse)
    return tlu.apply_affine(x3 if x3.dtype == cd else x3.to(cd), a_mat, bias)


def backward(g3, g_lad_sum, x3, an_b, an_ls, perm, lower, upper, log_s, sign, inverse, need_params):
    if lower.shape[0] > MAX_CHANNELS:
        return tlu.backward(g3, g_lad_sum, x3, an_b, an_ls, perm, lower, upper, log_s, sign, inverse, need_params)
    return tlu.backward(g3, g_lad_sum, x3, an_b, an_ls, perm, lower, upper, log_s, sign, inverse, need_params,
                        assemble=coefficients, chain=chain)
