"""Pure-torch LU-parameterised invertible 1x1 convolution / linear map and fused ActNorm.

Glow (Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", NeurIPS 2018),
section 3.2: the channel-mixing weight is kept in LU form

    W = P L (U + diag(sign * exp(log_s)))

with ``P`` a fixed permutation, ``L`` unit lower-triangular, ``U`` strictly upper-triangular and
``sign`` a fixed +-1 vector, so that ``log|det W| = sum(log_s)`` costs O(C) instead of O(C^3).

Conventions (the ones every fastflow backend implements):

- ``P = I[perm]``, i.e. ``(P z)[i] = z[perm[i]]``: the permutation gathers the channels of
  ``L M z`` in the order ``perm``.
- Only the strictly-lower part of ``lower`` and the strictly-upper part of ``upper`` are read.
- Data are treated per pixel: ``x3`` is ``(B, C, N)`` (``N = H*W`` for NCHW data, ``N = 1`` for
  ``(B, C)`` data) and ``y3[b, :, n] = A x3[b, :, n] + c``.
- ActNorm (Glow section 3.1): ``an(x) = exp(an_logscale) * (x + an_bias)`` per channel; fused
  with the 1x1 convolution that follows it into one affine map
  ``y = W diag(a) x + W diag(a) b`` with ``a = exp(an_logscale)``, ``b = an_bias``.

Everything here is plain, differentiable torch on any device/dtype, written for reading: no
size thresholds, layout tricks or caches (those are the ``torch`` backend's,
:mod:`fastflow.kernels.torch.lu`). The backward is written out (not autograd through the
forward); its chain rule to the factors, :func:`parameter_grads`, is what the other backends
reuse after their kernels reduced the data.
"""

from __future__ import annotations

import torch

from fastflow.kernels.reference._precision import upcast


def factors(lower: torch.Tensor, upper: torch.Tensor, log_s: torch.Tensor, sign: torch.Tensor):
    """``L`` (unit lower), ``M = U + diag(d)`` (upper) and the diagonal ``d = sign*exp(log_s)``."""
    c = lower.shape[0]
    eye = torch.eye(c, dtype=lower.dtype, device=lower.device)
    d = sign * torch.exp(log_s)
    return torch.tril(lower, -1) + eye, torch.triu(upper, 1) + torch.diag(d), d


def weight(perm, lower, upper, log_s, sign) -> torch.Tensor:
    """The dense ``W = P L M`` ``(C, C)``."""
    lo, m, _ = factors(lower, upper, log_s, sign)
    return (lo @ m)[perm]


def inverse_weight(perm, lower, upper, log_s, sign) -> torch.Tensor:
    """``W^-1 = M^-1 L^-1 P^T`` ``(C, C)`` by two triangular solves (never a general inverse)."""
    lo, m, _ = factors(lower, upper, log_s, sign)
    eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    pt = eye[:, perm]  # P^T, since P = I[perm]
    t = torch.linalg.solve_triangular(lo, pt, upper=False, unitriangular=True)
    return torch.linalg.solve_triangular(m, t, upper=True)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


def coefficients(perm, lower, upper, log_s, sign, an_bias=None, an_logscale=None, inverse=False, inv_weight=None):
    """The per-pixel affine map ``y = A x + c`` of the op (``c`` is None without ActNorm).

    Forward: ``A = W diag(a)``, ``c = A b``. Inverse: ``A = diag(1/a) W^-1``, ``c = -b``.
    ``inv_weight`` may pass a precomputed ``W^-1`` (e.g. from a cache).
    """
    if not inverse:
        a_mat = weight(perm, lower, upper, log_s, sign)
        if an_logscale is None:
            return a_mat, None
        a_mat = a_mat * torch.exp(an_logscale)[None, :]
        return a_mat, a_mat @ an_bias
    v = inverse_weight(perm, lower, upper, log_s, sign) if inv_weight is None else inv_weight
    if an_logscale is None:
        return v, None
    return v * torch.exp(-an_logscale)[:, None], -an_bias


def apply_factored(x3, perm, lower, upper, log_s, sign, an_bias=None, an_logscale=None, inverse=False):
    """The same map applied factor by factor: O(B N C^2) without forming ``W`` (O(C^3)).

    Forward ``y = P L M (a * (x + b))``; inverse ``x = M^-1 L^-1 P^T y / a - b`` by triangular
    solves on the data. Worth it when there are fewer pixels than channels (``B*N < C``).
    """
    lo, m, _ = factors(lower, upper, log_s, sign)
    if not inverse:
        if an_logscale is not None:
            x3 = torch.exp(an_logscale)[:, None] * (x3 + an_bias[:, None])
        return torch.matmul(lo, torch.matmul(m, x3)).index_select(1, perm)
    z = x3.index_select(1, inverse_permutation(perm))
    u = torch.linalg.solve_triangular(lo, z, upper=False, unitriangular=True)
    out = torch.linalg.solve_triangular(m, u, upper=True)
    if an_logscale is not None:
        out = out * torch.exp(-an_logscale)[:, None] - an_bias[:, None]
    return out


def logabsdet(log_s: torch.Tensor, an_logscale: torch.Tensor | None, n: int, inverse: bool) -> torch.Tensor:
    """Per-sample ``log|det J|`` (a 0-d tensor): ``+-N (sum(log_s) + sum(an_logscale))``, O(C)."""
    total = log_s.sum()
    if an_logscale is not None:
        total = total + an_logscale.sum()
    return -n * total if inverse else n * total


def parameter_grads(g_a, g_c, g_lad_sum, n, perm, lower, upper, log_s, sign, an_bias=None, an_logscale=None,
                    inverse=False, a_mat=None):
    """Chain rule from the affine map's ``(gA, gc)`` to the factors (all O(C^2) or O(C^3)).

    Args:
        g_a, g_c: gradients of the loss w.r.t. ``A`` and ``c`` of :func:`coefficients`
            (``g_c`` is ignored without ActNorm).
        g_lad_sum: sum over the batch of the gradient w.r.t. the per-sample log-det.
        n: pixels per sample (the log-det scale).
        a_mat: the ``A`` of the forward call (saves recomputing ``W`` / ``W^-1``).

    Returns:
        ``(g_an_bias, g_an_logscale, g_lower, g_upper, g_log_s)``; the ActNorm ones are None
        without ActNorm. ``g_lower``/``g_upper`` are zero outside the strict triangles.
    """
    lo, m, d = factors(lower, upper, log_s, sign)
    sgn = -1.0 if inverse else 1.0
    g_bias = g_logscale = None
    if not inverse:
        w = (lo @ m)[perm]
        if an_logscale is not None:
            a = torch.exp(an_logscale)
            a_mat = w * a[None, :] if a_mat is None else a_mat
            g_tot = g_a + torch.outer(g_c, an_bias)  # c = A b
            g_bias = a_mat.t() @ g_c
            g_logscale = (w * g_tot).sum(0) * a + n * g_lad_sum
            g_w = g_tot * a[None, :]
        else:
            g_w = g_a
    else:
        if an_logscale is not None:
            if a_mat is None:
                a_mat = inverse_weight(perm, lower, upper, log_s, sign) * torch.exp(-an_logscale)[:, None]
            g_bias = -g_c
            g_logscale = -(g_a * a_mat).sum(1) - n * g_lad_sum
            v = a_mat * torch.exp(an_logscale)[:, None]
            g_v = g_a * torch.exp(-an_logscale)[:, None]
        else:
            v = inverse_weight(perm, lower, upper, log_s, sign) if a_mat is None else a_mat
            g_v = g_a
        g_w = -(v.t() @ g_v @ v.t())  # d(W^-1) = -W^-1 dW W^-1
    g_lm = torch.zeros_like(g_w).index_copy_(0, perm, g_w)  # W = (L M)[perm]
    g_l = g_lm @ m.t()
    g_m = lo.t() @ g_lm
    g_log_s = torch.diagonal(g_m) * d + sgn * n * g_lad_sum
    return g_bias, g_logscale, torch.tril(g_l, -1), torch.triu(g_m, 1), g_log_s


# --------------------------------------------------------------------------------------------
# The launcher interface every kernels/<backend>/lu.py implements (x3, g3: (B, C, N) views of the
# data, N pixels per sample; an_b/an_ls None without ActNorm; returned tensors are new):
#   forward(x3, an_b, an_ls, perm, lower, upper, log_s, sign, inverse) -> y3
#   backward(g3, g_lad_sum, x3, an_b, an_ls, perm, lower, upper, log_s, sign, inverse, need_params)
#       -> (g_x3, g_an_b, g_an_ls, g_lower, g_upper, g_log_s)   (parameter grads None if not needed)
# in any compute dtype (the op rounds to the parameters' dtypes).
# --------------------------------------------------------------------------------------------


def forward(x3, an_b, an_ls, perm, lower, upper, log_s, sign, inverse):
    x3, an_b, an_ls, lower, upper, log_s, sign = upcast(x3, an_b, an_ls, lower, upper, log_s, sign)
    a_mat, bias = coefficients(perm, lower, upper, log_s, sign, an_b, an_ls, inverse)
    y3 = torch.einsum("ok,bkn->bon", a_mat, x3)
    return y3 if bias is None else y3 + bias[:, None]


def backward(g3, g_lad_sum, x3, an_b, an_ls, perm, lower, upper, log_s, sign, inverse, need_params):
    g3, g_lad_sum, x3, an_b, an_ls, lower, upper, log_s, sign = upcast(
        g3, g_lad_sum, x3, an_b, an_ls, lower, upper, log_s, sign)
    a_mat, _ = coefficients(perm, lower, upper, log_s, sign, an_b, an_ls, inverse)
    g_x3 = torch.einsum("ok,bon->bkn", a_mat, g3)
    if not need_params:
        return g_x3, None, None, None, None, None
    g_a = torch.einsum("bon,bkn->ok", g3, x3)
    g_c = g3.sum(dim=(0, 2))
    grads = parameter_grads(g_a, g_c, g_lad_sum, x3.shape[2], perm, lower, upper, log_s, sign, an_b, an_ls,
                            inverse=inverse, a_mat=a_mat)
    return (g_x3, *grads)
