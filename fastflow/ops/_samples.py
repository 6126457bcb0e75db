"""The ops' test samples and declarations: for each public op, the :class:`OpSpec` the conformance
suite (``tests/ops/test_conformance.py``), the overhead benchmark and the behaviour corpus read.

Kept apart from the op modules, as PyTorch's OpInfo keeps sample and error inputs apart from the
op: an op module holds its argument checks, public functions and the op definition
(``fastflow/ops/_opdef.py``); here are valid examples for every option, the shapes to try (typical,
odd and empty) and the bad inputs with the errors they must raise. Importing this module fills
:data:`SPECS`.
"""

from __future__ import annotations

import torch

from fastflow.ops._spec import SPECS, BadInput, OpSpec, declare
from fastflow.ops.circular import _circular_op, rq_spline_circular
from fastflow.ops.coupling import (_additive_coupling_op, _affine_coupling_op, _rescale_op, additive_coupling,
                                   affine_coupling, rescale)
from fastflow.ops.lu import _actnorm_conv1x1_op, _lu_conv1x1_op, _lu_linear_op, actnorm_conv1x1, lu_conv1x1, lu_linear
from fastflow.ops.polynomial import _bernstein_op, _sos_op, bernstein, sos_polynomial
from fastflow.ops.rq_spline import OP, _rq_spline_op, rq_spline, rq_spline_bounded, rq_spline_zuko

__all__ = ["SPECS"]


# --------------------------------------------------------------------------------------------
# The spline (kernels/<backend>/spline.py implement the launcher interface documented in
# kernels/reference/spline.py for the parameterisations they list)
# --------------------------------------------------------------------------------------------

_MINS = {"min_bin_width": 2.0**-10, "min_bin_height": 2.0**-10, "min_derivative": 2.0**-10}


def _spline_example(n_derivs, lo, hi, kwargs):
    def example(shape, dtype, device, gen, k=5):
        def r(*size, scale=1.0):
            return (torch.randn(*size, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

        # inputs over the domain and a little past it (the identity there)
        x = (torch.rand(shape, generator=gen, dtype=torch.float64) * 1.2 - 0.1) * (hi - lo) + lo
        return [x.to(dtype=dtype, device=device), r(*shape, k), r(*shape, k), r(*shape, k + n_derivs)], dict(kwargs)

    return example


def _spline_mins(kw):
    return kw["min_bin_width"], kw["min_bin_height"], kw["min_derivative"]


def _spline_bad(widths, heights, derivs, k_derivs):
    return (
        BadInput("heights with another K", lambda t, kw: ([t[0], t[1], t[2][..., :3], t[3]], kw), ValueError,
                 f"{heights}.*K=5"),
        BadInput("derivatives of the wrong length", lambda t, kw: ([t[0], t[1], t[2], t[2]], kw), ValueError,
                 f"{derivs}.*K{k_derivs}"),
        BadInput("one bin", lambda t, kw: ([t[0], t[1][..., :1], t[2][..., :1], t[3][..., :0]], kw), ValueError,
                 "must have 2..1024 bins"),
        BadInput("parameters of another batch", lambda t, kw: ([t[0], t[1][:2], t[2], t[3]], kw), ValueError,
                 f"{widths} must have leading shape"),
        BadInput("integer inputs", lambda t, kw: ([torch.arange(t[0].numel()).view(t[0].shape), *t[1:]], kw),
                 TypeError, "inputs must have a floating dtype"),
        BadInput("mixed dtypes", lambda t, kw: ([t[0], t[1].to(torch.float16), *t[2:]], kw), TypeError,
                 f"{widths} has dtype float16 but inputs has"),
        BadInput("a list", lambda t, kw: ([t[0], t[1].tolist(), *t[2:]], kw), TypeError, "must be a torch.Tensor"),
        BadInput("another device", lambda t, kw: ([t[0], t[1].to("meta"), *t[2:]], kw), ValueError,
                 "is on device meta but inputs is on"),
    )


_SPLINE_SHAPES = ((37,), (3, 7), (1,), (0,), (0, 4))
_SPLINE = dict(op=OP, kernels="spline", grad_inputs=("x", "uw", "uh", "ud"),
               outputs=("like:x", "like:x"), logdet="elementwise", shapes=_SPLINE_SHAPES, fused=lambda: _rq_spline_op)
declare(OpSpec(
    name="rq_spline", fn=rq_spline, inputs=("x", "uw", "uh", "ud"),
    example=_spline_example(-1, -1.5, 1.5, {"tail_bound": 1.5, **_MINS}),
    options=({"k": 2}, {"k": 5}, {"k": 23}),
    op_args=lambda t, kw, inverse, backend: (*t, inverse, kw["tail_bound"], *_spline_mins(kw), backend),
    bad=_spline_bad("unnormalized_widths", "unnormalized_heights", "unnormalized_derivatives", "-1=4") + (
        BadInput("a negative tail bound", lambda t, kw: (t, {**kw, "tail_bound": -1.0}), ValueError,
                 "tail_bound must be a finite positive"),
        BadInput("too large a minimum bin", lambda t, kw: (t, {**kw, "min_bin_width": 0.3}), ValueError,
                 "min_bin_width=0.3 times K=5")),
    **_SPLINE))
declare(OpSpec(
    name="rq_spline_bounded", fn=rq_spline_bounded, inputs=("x", "uw", "uh", "ud"),
    example=_spline_example(1, 0.0, 1.0, _MINS),
    requires="nflows_bounded",
    op_args=lambda t, kw, inverse, backend: (*t, inverse, 1.0, *_spline_mins(kw), backend, "nflows_bounded",
                                             0.0, 1.0, 0.0, 1.0),
    bad=_spline_bad("unnormalized_widths", "unnormalized_heights", "unnormalized_derivatives", "\\+1=6") + (
        BadInput("an empty box", lambda t, kw: (t, {**kw, "left": 1.0}), ValueError, "left < right"),),
    **_SPLINE))
declare(OpSpec(
    name="rq_spline_zuko", fn=rq_spline_zuko, inputs=("x", "uw", "uh", "ud"),
    example=_spline_example(-1, -5.0, 5.0, {"slope": 2.0**-10}),  # bound 5: a tenth outside
    requires="zuko",
    op_args=lambda t, kw, inverse, backend: (*t, inverse, 5.0, 0.0, 0.0, 0.0, backend, "zuko", -5.0, 5.0, -5.0, 5.0,
                                             kw["slope"]),
    bad=_spline_bad("widths", "heights", "derivatives", "-1=4") + (
        BadInput("a slope of 1", lambda t, kw: (t, {**kw, "slope": 1.0}), ValueError, "slope must be in"),),
    **_SPLINE))


def _circular_example(shape, dtype, device, gen, k=5):
    # angles inside [-pi, pi) (any real is taken mod 2 pi, so a round trip returns x mod 2 pi):
    # the spline example's range, 1.2 times [-2.58, 2.58], is [-3.096, 3.096]
    return _spline_example(-1, -2.58, 2.58, {"slope": 2.0**-10})(shape, dtype, device, gen, k)


declare(OpSpec(
    name="rq_spline_circular", fn=rq_spline_circular, inputs=("x", "uw", "uh", "ud"), example=_circular_example,
    requires="zuko", options=({"k": 2}, {"k": 5}, {"k": 23}),
    op_args=lambda t, kw, inverse, backend: (*t, inverse, kw["slope"], backend),
    bad=_spline_bad("widths", "heights", "derivatives", "-1=4") + (
        BadInput("a slope of 0", lambda t, kw: (t, {**kw, "slope": 0.0}), ValueError, "slope must be in"),),
    **{**_SPLINE, "fused": lambda: _circular_op}))


# --------------------------------------------------------------------------------------------
# The Bernstein polynomial law (kernels/<backend>/bernstein.py implement the launcher interface
# documented in kernels/reference/bernstein.py)
# --------------------------------------------------------------------------------------------

def _bernstein_example(shape, dtype, device, gen, n=5):
    # inputs over [-B, B] and a little past it (linear there), raw coefficients of either sign
    x = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2.4 - 1.2) * 3.0
    theta = torch.randn(*shape, n, generator=gen, dtype=torch.float64) * 1.5
    return [x.to(dtype=dtype, device=device), theta.to(dtype=dtype, device=device)], {"bound": 3.0}


declare(OpSpec(
    name="bernstein", op="bernstein", fn=bernstein, kernels="bernstein", inputs=("x", "theta"),
    grad_inputs=("x", "theta"), outputs=("like:x", "like:x"), logdet="elementwise", shapes=_SPLINE_SHAPES,
    fused=lambda: _bernstein_op, example=_bernstein_example, options=({"n": 2}, {"n": 5}, {"n": 17}),
    op_args=lambda t, kw, inverse, backend: (*t, inverse, kw["bound"], backend),
    bad=(
        BadInput("one raw coefficient", lambda t, kw: ([t[0], t[1][..., :1]], kw), ValueError,
                 "theta must have 2..507 raw coefficients"),
        BadInput("theta of another batch", lambda t, kw: ([t[0], t[1][:2]], kw), ValueError,
                 "theta must have leading shape"),
        BadInput("theta without a coefficient dim", lambda t, kw: ([t[0], t[1].sum()], kw), ValueError,
                 "theta needs a trailing parameter dimension"),
        BadInput("integer inputs", lambda t, kw: ([torch.arange(t[0].numel()).view(t[0].shape), t[1]], kw),
                 TypeError, "inputs must have a floating dtype"),
        BadInput("mixed dtypes", lambda t, kw: ([t[0], t[1].to(torch.float16)], kw), TypeError,
                 "theta has dtype float16 but inputs has"),
        BadInput("a list", lambda t, kw: ([t[0], t[1].tolist()], kw), TypeError, "must be a torch.Tensor"),
        BadInput("another device", lambda t, kw: ([t[0], t[1].to("meta")], kw), ValueError,
                 "is on device meta but inputs is on"),
        BadInput("a negative bound", lambda t, kw: (t, {**kw, "bound": -1.0}), ValueError,
                 "bound must be a finite positive"),
        BadInput("a NaN bound", lambda t, kw: (t, {**kw, "bound": float("nan")}), ValueError,
                 "bound must be a finite positive"),
    )))


def _sos_example(shape, dtype, device, gen, k=3, degree=4):
    # inputs over the polynomials' range and past it, coefficients of either sign
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 4.0
    a = torch.randn(*shape, k, degree + 1, generator=gen, dtype=torch.float64) * 0.6
    return [x.to(dtype=dtype, device=device), a.to(dtype=dtype, device=device)], {"bound": 5.0, "slope": 0.01}


declare(OpSpec(
    name="sos_polynomial", op="sos_polynomial", fn=sos_polynomial, kernels="sos", inputs=("x", "a"),
    grad_inputs=("x", "a"), outputs=("like:x", "like:x"), logdet="elementwise", shapes=_SPLINE_SHAPES,
    fused=lambda: _sos_op, example=_sos_example, options=({"k": 1, "degree": 0}, {}, {"k": 2, "degree": 7}),
    op_args=lambda t, kw, inverse, backend: (*t, inverse, kw["bound"], kw["slope"], backend),
    bad=(
        BadInput("a without the polynomial dims", lambda t, kw: ([t[0], t[1][..., 0, 0]], kw), ValueError,
                 r"a must be \(\.\.\., K, L \+ 1\)"),
        BadInput("too high a degree", lambda t, kw: ([t[0], t[1][..., :1].expand(*t[1].shape[:-1], 40)], kw),
                 ValueError, "degree 0..31"),
        BadInput("a of another batch", lambda t, kw: ([t[0], t[1][:2]], kw), ValueError, "a must have leading shape"),
        BadInput("integer inputs", lambda t, kw: ([torch.arange(t[0].numel()).view(t[0].shape), t[1]], kw),
                 TypeError, "inputs must have a floating dtype"),
        BadInput("mixed dtypes", lambda t, kw: ([t[0], t[1].to(torch.float16)], kw), TypeError,
                 "a has dtype float16 but inputs has"),
        BadInput("a list", lambda t, kw: ([t[0], t[1].tolist()], kw), TypeError, "must be a torch.Tensor"),
        BadInput("a zero slope", lambda t, kw: (t, {**kw, "slope": 0.0}), ValueError,
                 "slope must be a finite positive"),
        BadInput("an infinite bound", lambda t, kw: (t, {**kw, "bound": float("inf")}), ValueError,
                 "bound must be a finite positive"),
    )))


# --------------------------------------------------------------------------------------------
# The coupling laws (kernels/<backend>/coupling.py implement the launcher interface documented in
# kernels/reference/coupling.py; csrc/coupling.cu has the affine and additive laws)
# --------------------------------------------------------------------------------------------

def _randn(gen, dtype, device, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def _batch_example(n):
    def example(shape, dtype, device, gen, **kwargs):
        return [_randn(gen, dtype, device, *shape, scale=0.7) for _ in range(n)], kwargs

    return example


def _rescale_example(shape, dtype, device, gen):
    # a per-channel scale (broadcast over the rest of the event) for image-like inputs
    ls_shape = (shape[1],) + (1,) * (len(shape) - 2) if len(shape) > 2 else shape[1:]
    return [_randn(gen, dtype, device, *shape), _randn(gen, dtype, device, *ls_shape, scale=0.4)], {}


def _mismatch(i):
    return lambda t, kw: ([*t[:i], t[i][:, :1], *t[i + 1:]], kw)


_COUPLING_BAD = (
    BadInput("integer x", lambda t, kw: ([torch.zeros(t[0].shape, dtype=torch.int64), *t[1:]], kw), TypeError,
             "x must have a floating dtype"),
    BadInput("mixed dtypes", lambda t, kw: ([t[0], t[1].to(torch.float16), *t[2:]], kw), TypeError,
             "has dtype float16 but x has"),
    BadInput("a scalar x", lambda t, kw: ([v.reshape(-1)[0] for v in t], kw), ValueError, "batch dimension"),
    BadInput("another device", lambda t, kw: ([t[0], t[1].to("meta"), *t[2:]], kw), ValueError,
             "is on device meta but x is on"),
)
_COUPLING_SHAPES = ((6, 4), (5, 3, 4, 4), (1, 1), (0, 4), (3, 0))
_COUPLING = dict(kernels="coupling", logdet="sample", outputs=("like:x", "batch:x"), shapes=_COUPLING_SHAPES)
declare(OpSpec(
    name="affine_coupling", op="affine_coupling", fn=affine_coupling, inputs=("x", "shift", "raw_scale"),
    grad_inputs=("x", "shift", "raw_scale"),
    example=_batch_example(3), fused=lambda: _affine_coupling_op,
    op_args=lambda t, kw, inverse, backend: (*t, kw.get("scale", "exp"), kw.get("clamp", 2.0), inverse, backend),
    options=({"scale": "exp"}, {"scale": "softclamp", "clamp": 1.5}, {"scale": "sigmoid"}),
    bad=_COUPLING_BAD + (BadInput("shift of another shape", _mismatch(1), ValueError, "shift must have the shape of x"),
                BadInput("an unknown scale", lambda t, kw: (t, {**kw, "scale": "tanh"}), ValueError,
                         "scale must be one of"),
                BadInput("a zero clamp", lambda t, kw: (t, {**kw, "clamp": 0.0}), ValueError, "clamp")),
    **_COUPLING))
declare(OpSpec(
    name="additive_coupling", op="additive_coupling", fn=additive_coupling, inputs=("x", "shift"),
    grad_inputs=("x", "shift"),
    example=_batch_example(2), fused=lambda: _additive_coupling_op,
    op_args=lambda t, kw, inverse, backend: (*t, inverse, backend),
    bad=_COUPLING_BAD + (BadInput("shift of another shape", _mismatch(1), ValueError,
                                  "shift must have the shape of x"),),
    **_COUPLING))
declare(OpSpec(
    name="rescale", op="rescale", fn=rescale, inputs=("x", "log_scale"), grad_inputs=("x", "log_scale"),
    example=_rescale_example, fused=lambda: _rescale_op,
    op_args=lambda t, kw, inverse, backend: (t[0], t[1].expand(t[0].shape[1:]), inverse, backend),
    bad=_COUPLING_BAD[:2] + _COUPLING_BAD[3:] + (
        BadInput("a log_scale of another event", lambda t, kw: ([t[0], torch.zeros(7, dtype=t[1].dtype)], kw),
                 ValueError, "log_scale must have the event shape"),),
    **_COUPLING))


# --------------------------------------------------------------------------------------------
# The LU maps (kernels/<backend>/lu.py implement the launcher interface documented in
# kernels/reference/lu.py: forward/backward on (B, C, N) views of the data)
# --------------------------------------------------------------------------------------------

def _lu_example(has_an):
    def example(shape, dtype, device, gen):
        c = shape[1]

        def r(*size, scale=0.3):
            return (torch.randn(*size, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

        perm = torch.randperm(c, generator=gen).to(device)
        sign = torch.where(torch.rand(c, generator=gen) > 0.5, 1.0, -1.0).to(dtype=dtype, device=device)
        an = [r(c), r(c)] if has_an else []
        return [r(*shape, scale=1.0), *an, perm, r(c, c), r(c, c), r(c), sign], {}

    return example


def _lu_bad(i_perm):
    def at(i, f):
        return lambda t, kw: ([*t[:i], f(t[i]), *t[i + 1:]], kw)

    i_lower = i_perm + 1
    return (
        BadInput("integer x", at(0, lambda v: torch.zeros(v.shape, dtype=torch.int64)), TypeError,
                 "x must have a floating dtype"),
        BadInput("lower of another size", at(i_lower, lambda v: v[:-1, :-1]), ValueError, "lower must be \\(C, C\\)"),
        BadInput("a float perm", at(i_perm, lambda v: v.double()), TypeError, "perm must be an int64"),
        BadInput("a repeated index", at(i_perm, torch.zeros_like), ValueError, "perm must be a permutation"),
        BadInput("a sign of 0.5", at(i_perm + 4, lambda v: v * 0.5), ValueError, "sign must hold only"),
        BadInput("mixed dtypes", at(i_lower, lambda v: v.to(torch.float16)), TypeError, "lower has dtype float16"),
        BadInput("a list", at(i_lower, lambda v: v.tolist()), TypeError, "must be a torch.Tensor"),
    )


_LU = ("perm", "lower", "upper", "log_s", "sign")
_LU_COMMON = dict(kernels="lu", outputs=("like:x", "batch:x"),
               logdet="sample")
declare(OpSpec(
    name="lu_linear", op="lu_linear", fn=lu_linear, inputs=("x",) + _LU, grad_inputs=("x", "lower", "upper", "log_s"),
    example=_lu_example(False), shapes=((7, 5), (1, 3), (2, 1), (0, 4)), fused=lambda: _lu_linear_op,
    op_args=lambda t, kw, inverse, backend: (*t, inverse, backend), bad=_lu_bad(1), **_LU_COMMON))
declare(OpSpec(
    name="lu_conv1x1", op="lu_conv1x1", fn=lu_conv1x1, inputs=("x",) + _LU,
    grad_inputs=("x", "lower", "upper", "log_s"), example=_lu_example(False),
    shapes=((3, 4, 2, 3), (2, 6, 1, 1), (1, 3, 5, 1), (0, 4, 2, 2)), fused=lambda: _lu_conv1x1_op,
    op_args=lambda t, kw, inverse, backend: (*t, inverse, backend), bad=_lu_bad(1), **_LU_COMMON))
declare(OpSpec(
    name="actnorm_conv1x1", op="actnorm_conv1x1", fn=actnorm_conv1x1, inputs=("x", "an_bias", "an_logscale") + _LU,
    grad_inputs=("x", "an_bias", "an_logscale", "lower", "upper", "log_s"), example=_lu_example(True),
    shapes=((3, 4, 2, 3), (5, 3), (2, 6, 1, 1), (0, 4, 2, 2)), fused=lambda: _actnorm_conv1x1_op,
    op_args=lambda t, kw, inverse, backend: (*t, inverse, backend), bad=_lu_bad(3), **_LU_COMMON))
