"""The ``torch`` backend of the LU ops: the tuned plain-PyTorch path (BLAS GEMMs straight on NCHW
data, a channels-first copy for small inputs, the factor-by-factor map when there are fewer
pixels than channels, and a cache of ``W^-1`` on the CPU). It is the default on any device and
dtype the fused backends decline (CPU half precision, GPU float64, ...) and the data pass of the
numba backend. Results in the compute dtype (float32 for half precision, else the inputs' own);
the readable oracle is :mod:`fastflow.kernels.reference.lu`, whose algebra this reuses.

Launcher interface: that of :mod:`fastflow.kernels.reference.lu` (``forward``/``backward`` on
``(B, C, N)`` views).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from fastflow.kernels.reference import lu as ref

__all__ = ["forward", "backward", "apply_affine", "data_grads", "reduce_grads", "inverse_matrix",
           "clear_inverse_cache", "INVERSE_CACHE_STATS", "SMALL_ELEMS"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# Below this many elements (B*C*N) a batched GEMM over the samples costs more in its fixed
# overhead (~40 us on the 2-core CI machine, MKL's batched path) than copying the data to
# channels-first (C, B*N) and back around one plain GEMM (~15 us at 128 x 4 x 4 x 4).
SMALL_ELEMS = 16384


def _small(x3: torch.Tensor) -> bool:
    return x3.shape[2] > 1 and x3.numel() <= SMALL_ELEMS


def _channels_first(x3: torch.Tensor) -> torch.Tensor:
    b, c, n = x3.shape
    return x3.transpose(0, 1).reshape(c, b * n)


def _from_channels_first(y2: torch.Tensor, b: int, n: int) -> torch.Tensor:
    return y2.view(y2.shape[0], b, n).transpose(0, 1).contiguous()


def _gemm_operand(t3: torch.Tensor) -> torch.Tensor:
    """``t3`` as a batched GEMM reads it fast: itself when each sample's (C, N) matrix is one BLAS
    can take in place (a unit stride in one of the two, channels-last included), else a
    contiguous copy. Given a zero stride (an expanded gradient, as ``y.sum()`` hands back) or an
    irregular view, CPU ``bmm`` clones every sample's matrix on its own: ActNorm + 1x1
    convolution forward+backward at 4M elements took 42 ms that way, 17 ms with one copy."""
    zero = any(st == 0 and n > 1 for st, n in zip(t3.stride(), t3.shape))
    if zero or not (t3.stride(2) == 1 or t3.stride(1) == 1):
        return t3.contiguous()
    return t3


def apply_affine(x3: torch.Tensor, a_mat: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``y3[b, :, n] = A x3[b, :, n] + c``: one BLAS pass over NCHW data, no layout copies
    (small inputs go through a channels-first copy instead, see ``SMALL_ELEMS``)."""
    if x3.shape[2] == 1:  # (B, C) data: a single GEMM over the batch
        x2 = x3[:, :, 0]
        y2 = torch.addmm(bias, x2, a_mat.t()) if bias is not None else x2 @ a_mat.t()
        return y2.unsqueeze(2)
    if _small(x3):
        x2 = _channels_first(x3)
        y2 = torch.addmm(bias[:, None], a_mat, x2) if bias is not None else a_mat @ x2
        return _from_channels_first(y2, x3.shape[0], x3.shape[2])
    y3 = torch.matmul(a_mat, _gemm_operand(x3))
    if bias is not None:
        y3 += bias[:, None]
    return y3


def data_grads(g3: torch.Tensor, x3: torch.Tensor, a_mat: torch.Tensor):
    """For ``y = A x + c`` per pixel: ``(g_x3, gA, gc)`` from the output gradient ``g3``."""
    if not _small(x3):
        g3, x3 = _gemm_operand(g3), _gemm_operand(x3)
        return (apply_affine(g3, a_mat.t(), None), *reduce_grads(g3, x3))
    b, _, n = x3.shape
    g2 = _channels_first(g3)
    return _from_channels_first(a_mat.t() @ g2, b, n), g2 @ _channels_first(x3).t(), g2.sum(1)


def reduce_grads(g3: torch.Tensor, x3: torch.Tensor):
    """``gA = sum_{b,n} g[b,:,n] x[b,:,n]^T`` ``(C, C)`` and ``gc = sum_{b,n} g[b,:,n]`` ``(C,)``."""
    b, c, n = x3.shape
    if n == 1:
        g_a = g3[:, :, 0].t() @ x3[:, :, 0]
    elif c <= n:
        # The (B, C, C) temporary is no larger than the data: batched GEMM, then a small sum.
        g_a = torch.matmul(g3, x3.transpose(1, 2)).sum(0)
    else:
        g_a = torch.tensordot(g3, x3, dims=([0, 2], [0, 2]))
    return g_a, g3.sum(dim=(0, 2))


# --------------------------------------------------------------------------------------------
# The cached inverse matrix
# --------------------------------------------------------------------------------------------

_INV_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_INV_CACHE_SIZE = 64
INVERSE_CACHE_STATS = {"hits": 0, "misses": 0}


def clear_inverse_cache() -> None:
    """Forget every cached ``W^-1`` (they also expire by themselves when the factors change)."""
    _INV_CACHE.clear()


def tensor_version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter; the snapshot check remains
        return -1


def inverse_matrix(perm, lower, upper, log_s, sign, dtype: torch.dtype) -> torch.Tensor:
    """``W^-1`` in ``dtype`` by two triangular solves; cached on the CPU.

    The key holds each factor's ``data_ptr`` and ``_version`` (bumped by in-place updates such as
    an optimizer step); a hit is confirmed against a snapshot of the factors, which also catches
    writes through ``.data`` (no version bump) and a freed tensor's address being reused.
    """
    params = (perm, lower, upper, log_s, sign)
    cast = [p if p is perm else p.to(dtype) for p in params]
    if lower.device.type != "cpu":
        return ref.inverse_weight(*cast)
    key = (dtype, lower.shape[0]) + tuple((p.data_ptr(), tensor_version(p), p.dtype, p.stride()) for p in params)
    hit = _INV_CACHE.get(key)
    if hit is not None and all(torch.equal(s, p) for s, p in zip(hit[0], params)):
        _INV_CACHE.move_to_end(key)
        INVERSE_CACHE_STATS["hits"] += 1
        return hit[1]
    INVERSE_CACHE_STATS["misses"] += 1
    v = ref.inverse_weight(*cast)
    _INV_CACHE[key] = (tuple(p.detach().clone() for p in params), v)
    while len(_INV_CACHE) > _INV_CACHE_SIZE:
        _INV_CACHE.popitem(last=False)
    return v


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _cast(cd, *ts):
    return [t if t is None or t.dtype == cd else t.to(cd) for t in ts]


def coefficients(cd, an_b, an_ls, perm, lower, upper, log_s, sign, inverse):
    """The per-pixel map ``(A, c)`` in ``cd``, the inverse from the cached ``W^-1``."""
    v = inverse_matrix(perm, lower, upper, log_s, sign, cd) if inverse else None
    an_b, an_ls, lower, upper, log_s, sign = _cast(cd, an_b, an_ls, lower, upper, log_s, sign)
    return ref.coefficients(perm, lower, upper, log_s, sign, an_b, an_ls, inverse, inv_weight=v)


def forward(x3, an_b, an_ls, perm, lower, upper, log_s, sign, inverse):
    cd = compute_dtype(x3.dtype)
    b, c, n = x3.shape
    if b * n < c:
        # Fewer pixels than channels: applying the factors (O(B N C^2)) beats forming W (O(C^3)).
        args = _cast(cd, x3, lower, upper, log_s, sign, an_b, an_ls)
        return ref.apply_factored(args[0], perm, *args[1:], inverse=inverse)
    a_mat, bias = coefficients(cd, an_b, an_ls, perm, lower, upper, log_s, sign, inverse)
    return apply_affine(x3.to(cd), a_mat, bias)


def parameter_grads(cd, g_a, g_c, g_lad_sum, n, an_b, an_ls, perm, lower, upper, log_s, sign, inverse, a_mat):
    """``(g_an_bias, g_an_logscale, g_lower, g_upper, g_log_s)`` from the map's ``(gA, gc)``."""
    p = _cast(cd, lower, upper, log_s, sign, an_b, an_ls)
    return ref.parameter_grads(g_a, g_c, g_lad_sum.to(cd), n, perm, *p, inverse=inverse, a_mat=a_mat)


def backward(g3, g_lad_sum, x3, an_b, an_ls, perm, lower, upper, log_s, sign, inverse, need_params, *,
             assemble=coefficients, chain=parameter_grads):
    """The data pass in torch GEMMs; ``assemble`` (the map ``(A, c)``) and ``chain`` (the chain
    rule to the factors) may be another backend's, with the signatures of :func:`coefficients`
    and :func:`parameter_grads` (the numba backend passes its compiled ones)."""
    cd = compute_dtype(x3.dtype)
    a_mat, _ = assemble(cd, an_b, an_ls, perm, lower, upper, log_s, sign, inverse)
    g3c, x3c = _cast(cd, g3, x3)
    if not need_params:
        return apply_affine(g3c, a_mat.t(), None), None, None, None, None, None
    g_x3, g_a, g_c = data_grads(g3c, x3c, a_mat)
    grads = chain(cd, g_a, g_c, g_lad_sum, x3.shape[2], an_b, an_ls, perm, lower, upper, log_s, sign, inverse, a_mat)
    return (g_x3, *grads)
