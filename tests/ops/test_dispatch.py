"""The eager fast path of the custom ops (fastflow.ops._dispatch): on ordinary tensors it runs
the same implementation and autograd as the registered op, bitwise; anything the op machinery
must see (fake and meta tensors, compiling) still goes through ``torch.library``."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastflow.ops import _dispatch

cp = importlib.import_module("fastflow.ops.coupling")
lu = importlib.import_module("fastflow.ops.lu")
rq = importlib.import_module("fastflow.ops.rq_spline")  # ``fastflow.ops.rq_spline`` is also the function


def _lu_args(c, dtype):
    g = torch.Generator().manual_seed(c)
    perm = torch.randperm(c, generator=g)
    lower, upper = (0.3 * torch.randn(c, c, generator=g, dtype=dtype) for _ in range(2))
    log_s = 0.3 * torch.randn(c, generator=g, dtype=dtype)
    sign = torch.where(torch.rand(c, generator=g) > 0.5, 1.0, -1.0).to(dtype)
    return perm, lower, upper, log_s, sign


def _cases(dtype):
    """(FusedOp, args) for every op with autograd; tensors are fresh leaves."""
    x = torch.randn(6, 3, 4, 5, dtype=dtype)
    params = torch.randn(6, 6, 4, 5, dtype=dtype)  # the shift and raw scale as channel halves
    perm, lower, upper, log_s, sign = _lu_args(3, dtype)
    an_b, an_ls = 0.3 * torch.randn(3, dtype=dtype), 0.3 * torch.randn(3, dtype=dtype)
    log_scale = torch.randn(3, 4, 5, dtype=dtype)
    k = 4
    xs = 2.5 * torch.rand(7, 5, dtype=dtype) - 1.25
    uw, uh = torch.randn(7, 5, k, dtype=dtype), torch.randn(7, 5, k, dtype=dtype)
    ud = torch.randn(7, 5, k - 1, dtype=dtype)
    return {
        "affine": (cp._affine_coupling_op, lambda: (x, params[:, :3], params[:, 3:]),
                   ("softclamp", 2.0, False, "numba")),
        "affine-inverse": (cp._affine_coupling_op, lambda: (x, params[:, :3], params[:, 3:]),
                           ("sigmoid", 2.0, True, "reference")),
        "additive": (cp._additive_coupling_op, lambda: (x, params[:, :3]), (True, "numba")),
        "rescale": (cp._rescale_op, lambda: (x, log_scale), (False, "numba")),
        "rq_spline": (rq._rq_spline_op, lambda: (xs, uw, uh, ud), (False, 1.25, 1e-3, 1e-3, 1e-3, "numba")),
        "lu_conv1x1": (lu._lu_conv1x1_op, lambda: (x, perm, lower, upper, log_s, sign), (True, "reference")),
        "actnorm_conv1x1": (lu._actnorm_conv1x1_op, lambda: (x, an_b, an_ls, perm, lower, upper, log_s, sign),
                            (False, "reference")),
        "lu_linear": (lu._lu_linear_op, lambda: (x[:, :, 0, 0], perm, lower, upper, log_s, sign), (False, "reference")),
    }


def _run(fn, tensors, rest):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    outs = fn(*leaves, *rest)
    g = torch.Generator().manual_seed(5)
    cot = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    wrt = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(outs, wrt, cot, allow_unused=True)  # LU's sign gets no gradient
    return outs, grads


@pytest.mark.parametrize("name", list(_cases(torch.float64)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_path_equals_registered_op(name, dtype):
    fused, tensors, rest = _cases(dtype)[name]
    outs, grads = _run(fused, tensors(), rest)
    assert type(outs[0].grad_fn).__name__.endswith("FunctionBackward"), "the eager fast path was not taken"
    ref_outs, ref_grads = _run(fused.op, tensors(), rest)
    assert "GeneratedBackwardFor_fastflow" in type(ref_outs[0].grad_fn).__name__
    assert [g is None for g in grads] == [g is None for g in ref_grads]
    for a, b in zip((*outs, *grads), (*ref_outs, *ref_grads)):
        assert (a is None and b is None) or torch.equal(a, b)
    # Without autograd the implementation runs directly: the same values again.
    with torch.no_grad():
        plain = fused(*tensors(), *rest)
    for a, b in zip(plain, ref_outs):
        assert torch.equal(a, b)


def test_fake_and_meta_tensors_go_through_the_op():
    with FakeTensorMode():
        x = torch.randn(4, 3, 2, 2)
        y, lad = cp.affine_coupling(x, x, x, backend="numba")  # the numba impl cannot run on fakes
        assert y.shape == x.shape and lad.shape == (4,)
    assert not _dispatch._eager((torch.empty(2, device="meta"),))
    with torch.device("cpu"):  # a torch-function mode: take the registered op
        assert not _dispatch._eager((torch.empty(2),))
    assert _dispatch._eager((torch.empty(2), torch.nn.Parameter(torch.empty(2)), 3, "numba"))


def test_compiled_layer_uses_the_op():
    x = torch.randn(5, 4, 3, 3)
    p = torch.randn(5, 8, 3, 3)
    f = torch.compile(lambda a, b: cp.affine_coupling(a, b[:, :4], b[:, 4:], scale="exp", backend="numba"),
                      fullgraph=True, backend="eager")
    y, lad = f(x, p)
    y0, lad0 = cp.affine_coupling(x, p[:, :4], p[:, 4:], scale="exp", backend="numba")
    assert torch.equal(y, y0) and torch.equal(lad, lad0)


def test_lu_value_check_is_cached_but_sees_data_writes():
    perm, lower, upper, log_s, sign = _lu_args(4, torch.float32)
    x = torch.randn(3, 4)
    lu.lu_linear(x, perm, lower, upper, log_s, sign)
    lu.lu_linear(x, perm, lower, upper, log_s, sign)  # a cache hit
    perm.data[0] = perm.data[1]  # no version bump
    with pytest.raises(ValueError, match="perm must be a permutation"):
        lu.lu_linear(x, perm, lower, upper, log_s, sign)
    perm2 = torch.randperm(4)
    sign.data[2] = 0.5
    with pytest.raises(ValueError, match="sign must hold only"):
        lu.lu_linear(x, perm2, lower, upper, log_s, sign)
