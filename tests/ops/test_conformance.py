"""The conformance suite: every op declared in ``fastflow.ops._samples.SPECS`` on every backend that
has kernels for it and runs here (reference, numba, torch; triton under TRITON_INTERPRET=1; cuda
on a GPU): agreement with the float64 reference, round trip, the naive-Jacobian log-det, fp64
gradcheck, opcheck, torch.compile fullgraph (static and dynamic shapes), odd, empty and strided
shapes, the declared bad inputs and backend forcing.

Op-specific behaviour (peers' own functions, layouts, caches, extreme parameters, NaN handling,
routes) stays in ``test_rq_spline.py``, ``test_coupling.py``, ``test_lu.py`` and
``test_spline_parameterizations.py``.
"""

from __future__ import annotations

import pytest
import torch

import fastflow.ops  # noqa: F401  (declares every op)
from fastflow import BackendUnavailableError, UnknownBackendError
from fastflow.backends import BACKENDS, resolve_backend
from fastflow.ops._samples import SPECS
from fastflow.testing import (
    assert_close_conditioned,
    elementwise_jacobian_logabsdet,
    jacobian_logabsdet,
    tolerances,
)
from tests._backends import HAS_CUDA, INTERPRET, device_for, dtypes_for, float32_in_float32, run_table

# The backends this run exercises; triton and cuda carry their marks (the triton run is
# `TRITON_INTERPRET=1 pytest -m triton`).
_RUN = run_table()  # every registered backend that runs here (tests/_backends.py)


def _available(spec, backend):
    if backend not in _RUN or backend not in spec.backends:
        return False
    if spec.requires is None:
        return True
    return spec.requires in BACKENDS[backend].parameterizations


def _cases(with_options=False, with_inverse=False, custom_op_only=False):
    out = []
    for spec in SPECS.values():
        for backend, marks in _RUN.items():
            if not _available(spec, backend):
                continue
            for i, option in enumerate(spec.options if with_options else ({},)):
                for inverse in ((False, True) if with_inverse else (False,)):
                    label = "-".join([spec.name, backend] + ([f"o{i}"] if len(spec.options) > 1 and with_options
                                                             else []) + (["inverse"] if inverse else []))
                    out.append(pytest.param(spec, backend, option, inverse, marks=marks, id=label))
    return out


def _f64(spec, backend) -> bool:
    return BACKENDS[backend].decline_reason(spec.op, torch.device(device_for(backend)), torch.float64) is None


def _dtypes(spec, backend):
    dts = list(dtypes_for(backend))
    if _f64(spec, backend) and torch.float64 not in dts:
        dts.append(torch.float64)
    return dts


def _example(spec, shape, dtype, device, option, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return spec.example(shape, dtype, device, gen, **option)


def _to(tensors, dtype):
    return [t.to(dtype) if t.is_floating_point() else t for t in tensors]


def _inverse_inputs(spec, tensors, kwargs):
    """Inputs of the inverse: the first tensor replaced by the forward's outputs (the reference)."""
    with torch.no_grad():
        y = spec.fn(*_to(tensors, torch.float64), backend="reference", **kwargs)[0]
    return [y.to(tensors[0].dtype), *tensors[1:]]


def _inputs(spec, shape, dtype, device, option, inverse):
    """An example made in float64 (the inverse's from the reference's outputs), then rounded."""
    tensors, kwargs = _example(spec, shape, torch.float64, device, option)
    if inverse:
        tensors = _inverse_inputs(spec, tensors, kwargs)
    return _to(tensors, dtype), kwargs


def _call(spec, tensors, kwargs, inverse, backend):
    return spec.fn(*tensors, inverse=inverse, backend=backend, **kwargs)


def _grad_mask(spec):
    return [name in spec.grad_inputs for name in spec.inputs]


def _outputs_and_grads(spec, tensors, kwargs, inverse, backend, cotangents):
    leaves = [t.detach().clone().requires_grad_(m) for t, m in zip(tensors, _grad_mask(spec))]
    outs = _call(spec, leaves, kwargs, inverse, backend)
    wrt = [t for t in leaves if t.requires_grad]
    pairs = [(o, c.to(o.dtype)) for o, c in zip(outs, cotangents) if o.requires_grad]  # additive: a constant lad
    grads = torch.autograd.grad([o for o, _ in pairs], wrt, [c for _, c in pairs], allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]
    return [o.detach() for o in outs], list(grads)


def _cotangents(outs_like, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device) for o in outs_like]


# ------------------------------------------------------------------ the oracle


@pytest.mark.parametrize("spec,backend,option,inverse", _cases(with_options=True, with_inverse=True))
def test_matches_float64_reference(spec, backend, option, inverse):
    """Outputs, log-dets and the fused backward's gradients against the reference evaluated in
    float64 on the same (rounded) inputs."""
    device = device_for(backend)
    for dtype in _dtypes(spec, backend):
        tensors, kwargs = _inputs(spec, spec.shapes[0], dtype, device, option, inverse)
        with torch.no_grad():
            shapes = _call(spec, _to(tensors, torch.float64), kwargs, inverse, "reference")
        cot = _cotangents(shapes)
        ref = _outputs_and_grads(spec, _to(tensors, torch.float64), kwargs, inverse, "reference", cot)
        got = _outputs_and_grads(spec, tensors, kwargs, inverse, backend, cot)
        # float32 computed in float32 (as the backend declares: GPU kernels, the torch backend,
        # numba's LU data pass, a float32 GEMM) is held to float32 round-off times the map's
        # conditioning.
        f32 = dtype == torch.float32 and float32_in_float32(backend, spec.kernels)
        rtol, atol = tolerances(dtype, f32).values()
        y, lad = got[0]
        assert y.dtype == dtype and lad.dtype == dtype and y.shape == ref[0][0].shape and lad.shape == ref[0][1].shape
        amplification = (ref[0][1].abs().exp() if spec.logdet == "elementwise" and f32
                         else torch.zeros_like(ref[0][0]))
        assert_close_conditioned(y, ref[0][0], amplification, dtype, f"{spec.name} outputs ({dtype})", f32)
        # a per-sample log-det sums the event's terms: its rounding grows with the event size
        n_event = max(1, tensors[0][0].numel()) if spec.logdet == "sample" and tensors[0].dim() > 1 else 1
        factor = 10.0 if inverse and f32 else 1.0
        torch.testing.assert_close(lad.double(), ref[0][1], rtol=rtol * factor, atol=atol * factor * n_event,
                                   msg=lambda m: f"{spec.name} logabsdet ({dtype}): {m}")
        names = [n for n in spec.inputs if n in spec.grad_inputs]
        for name, g, r in zip(names, got[1], ref[1]):
            assert g.dtype == dtype and g.shape == r.shape, name
            # relative to the gradient's scale: raw-parameter gradients mix terms of every size
            scale = r.abs().max().clamp_min(1.0)
            torch.testing.assert_close(g.double() / scale, r / scale, rtol=rtol * factor, atol=atol * factor,
                                       msg=lambda m, name=name: f"{spec.name} grad {name} ({dtype}): {m}")


# ------------------------------------------------------------------ the maths


def _nonempty(spec):
    return [s for s in spec.shapes if 0 not in s]


def _precise(spec, backend):
    return torch.float64 if _f64(spec, backend) else torch.float32


@pytest.mark.parametrize("spec,backend,option,inverse", _cases(with_options=True))
def test_round_trip(spec, backend, option, inverse):
    device = device_for(backend)
    dtype = _precise(spec, backend)
    for shape in _nonempty(spec):
        tensors, kwargs = _example(spec, shape, dtype, device, option)
        y, lad = _call(spec, tensors, kwargs, False, backend)
        x2, lad2 = _call(spec, [y, *tensors[1:]], kwargs, True, backend)
        atol = 1e-9 if dtype == torch.float64 else 1e-4
        # a rounding of y comes back magnified by |dx/dy| (elementwise maps: exp(-lad))
        amplification = (-lad).exp() if spec.logdet == "elementwise" else torch.zeros_like(y)
        assert_close_conditioned(x2, tensors[0], amplification, dtype, f"{spec.name} round trip {shape}")
        torch.testing.assert_close(lad + lad2, torch.zeros_like(lad), rtol=0, atol=atol * max(1, y[0].numel()))


@pytest.mark.parametrize("spec,backend,option,inverse", _cases(with_inverse=True))
def test_logabsdet_matches_naive_jacobian(spec, backend, option, inverse):
    """The O(D) log-det against the slogdet of the autograd Jacobian (O(D^3))."""
    dtype = _precise(spec, backend)
    tensors, kwargs = _inputs(spec, spec.shapes[0], dtype, device_for(backend), option, inverse)
    _, lad = _call(spec, tensors, kwargs, inverse, backend)

    def fn(v):
        return _call(spec, [v, *tensors[1:]], kwargs, inverse, backend)[0]

    tol = 1e-9 if dtype == torch.float64 else 1e-4
    if spec.logdet == "elementwise":
        naive = elementwise_jacobian_logabsdet(fn, tensors[0])
        torch.testing.assert_close(lad.sum(), naive, rtol=tol, atol=tol)
    else:
        # one sample at a time: the other batch-shaped arguments sliced alike
        naive = torch.stack([jacobian_logabsdet(
            lambda v, i=i: _call(spec, [v, *(_sample(t, i, tensors[0]) for t in tensors[1:])], kwargs, inverse,
                                 backend)[0], tensors[0][i:i + 1])[0] for i in range(tensors[0].shape[0])])
        torch.testing.assert_close(lad, naive, rtol=tol, atol=tol)
    assert float(naive.abs().max()) > 0.05 or spec.name == "additive_coupling", "a trivial log-det tests nothing"


def _batch_shaped(t, x):
    """Whether ``t`` is a per-sample argument like ``x`` (the declared shapes keep the batch size
    distinct from the channel count, so LU's (C, C) factors never qualify)."""
    return t.is_floating_point() and t.dim() == x.dim() and t.shape[0] == x.shape[0]


def _sample(t, i, x):
    return t[i:i + 1] if _batch_shaped(t, x) else t


def _small(shape):
    return tuple(min(s, 3) for s in shape)


@pytest.mark.parametrize("spec,backend,option,inverse",
                         [c for c in _cases(with_options=True, with_inverse=True) if _f64(*c.values[:2])])
def test_gradcheck_float64(spec, backend, option, inverse):
    device = device_for(backend)
    mask = _grad_mask(spec)
    for shape in _nonempty(spec):
        tensors, kwargs = _example(spec, _small(shape), torch.float64, device, option)
        if inverse:
            tensors = _inverse_inputs(spec, tensors, kwargs)
        leaves = [t.detach().clone().requires_grad_(m) for t, m in zip(tensors, mask)]

        def fn(*diff, leaves=leaves, kwargs=kwargs):
            it = iter(diff)
            return _call(spec, [next(it) if m else t for t, m in zip(leaves, mask)], kwargs, inverse, backend)

        diff = [t for t in leaves if t.requires_grad]
        assert torch.autograd.gradcheck(fn, diff, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True), shape


@pytest.mark.parametrize("spec,backend,option,inverse", _cases(with_inverse=True, custom_op_only=True))
def test_opcheck(spec, backend, option, inverse):
    device = device_for(backend)
    dtype = _precise(spec, backend)
    tensors, kwargs = _example(spec, _small(spec.shapes[0]), torch.float64, device, option)
    if inverse:
        tensors = _inverse_inputs(spec, tensors, kwargs)
    tensors = [t.to(dtype).requires_grad_(m) if t.is_floating_point() else t
               for t, m in zip(tensors, _grad_mask(spec))]
    torch.library.opcheck(spec.fused().op, spec.op_args(tensors, kwargs, inverse, backend))


def _compile_cases():
    if INTERPRET:
        return []  # compile does not trace the interpreter; covered by the CPU run
    return [pytest.param(spec, option, dyn, id=f"{spec.name}-o{i}-{'dynamic' if dyn else 'static'}")
            for spec in SPECS.values() for i, option in enumerate(spec.options[:1]) for dyn in (False, True)]


@pytest.mark.parametrize("spec,option,dynamic", _compile_cases())
def test_torch_compile_fullgraph(spec, option, dynamic):
    """Forward and backward through ``torch.compile(fullgraph=True)`` with the default backend
    choice, the same values as eager; with dynamic shapes, at two batch sizes."""
    torch._dynamo.reset()
    mask = _grad_mask(spec)

    def f(*tensors):
        y, lad = spec.fn(*tensors, **kwargs)
        return (y**2).sum() + lad.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    shape0 = spec.shapes[0]
    for batch in ((shape0[0], shape0[0] + 3) if dynamic else (shape0[0],)):
        tensors, kwargs = _example(spec, (batch, *shape0[1:]), torch.float32, "cpu", option)
        leaves = [t.requires_grad_(m) if t.is_floating_point() else t for t, m in zip(tensors, mask)]
        got, want = compiled(*leaves), f(*leaves)
        torch.testing.assert_close(got, want)
        wrt = [t for t in leaves if t.requires_grad]
        for g, w in zip(torch.autograd.grad(got, wrt), torch.autograd.grad(want, wrt)):
            torch.testing.assert_close(g, w)


# ------------------------------------------------------------------ shapes


def _declared_shape(spec, out_decl, tensors):
    kind, name = out_decl.split(":")
    t = tensors[spec.inputs.index(name)]
    return tuple(t.shape) if kind == "like" else (t.shape[0],)


@pytest.mark.parametrize("spec,backend,option,inverse", _cases())
def test_odd_and_empty_shapes(spec, backend, option, inverse):
    """Every declared shape: outputs of the declared shapes, finite gradients of the inputs'
    shapes (zero where there is no data), log-det 0 for an empty event."""
    device = device_for(backend)
    for shape in spec.shapes:
        tensors, kwargs = _example(spec, shape, torch.float32, device, option)
        leaves = [t.requires_grad_(m) if t.is_floating_point() else t for t, m in zip(tensors, _grad_mask(spec))]
        outs = _call(spec, leaves, kwargs, False, backend)
        for o, decl in zip(outs, spec.outputs):
            assert tuple(o.shape) == _declared_shape(spec, decl, tensors), (shape, decl)
        wrt = [t for t in leaves if t.requires_grad]
        grads = torch.autograd.grad(outs[0].sum() + outs[1].sum(), wrt, allow_unused=True, materialize_grads=True)
        for g, t in zip(grads, wrt):
            g = torch.zeros_like(t) if g is None else g
            assert g.shape == t.shape and bool(torch.isfinite(g).all()), shape
        if tensors[0].numel() == 0 and spec.logdet == "sample" and tensors[0].shape[0] > 0:
            assert bool((outs[1] == 0).all()), "an empty event has log-det 0"


def _strided(t, x):
    """``t`` as a non-contiguous view (every other row of a buffer twice as long) when it is a
    per-sample argument like ``x``, else ``t``."""
    n = x.shape[0]
    if t is not x and not _batch_shaped(t, x) or n < 2:
        return t
    buf = torch.empty((2 * n, *t.shape[1:]), dtype=t.dtype, device=t.device)
    view = buf[::2]
    view.copy_(t)
    return view


@pytest.mark.parametrize("spec,backend,option,inverse", _cases(with_inverse=True))
def test_strided_inputs(spec, backend, option, inverse):
    """Non-contiguous inputs give the values (and gradients) of the same inputs made dense."""
    dtype = _precise(spec, backend)
    tensors, kwargs = _inputs(spec, spec.shapes[0], dtype, device_for(backend), option, inverse)
    strided = [_strided(t, tensors[0]) for t in tensors]
    assert not strided[0].is_contiguous()
    with torch.no_grad():
        cot = _cotangents(_call(spec, tensors, kwargs, inverse, backend))
    want = _outputs_and_grads(spec, tensors, kwargs, inverse, backend, cot)
    got = _outputs_and_grads(spec, strided, kwargs, inverse, backend, cot)
    tol = tolerances(dtype, True)
    for g, w in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(g, w, **tol)


# ------------------------------------------------------------------ bad input and dispatch


def _bad_cases():
    return [pytest.param(spec, bad, id=f"{spec.name}-{bad.label.replace(' ', '_')}")
            for spec in SPECS.values() for bad in spec.bad]


@pytest.mark.parametrize("spec,bad", _bad_cases())
def test_bad_input_raises_a_clear_error(spec, bad):
    tensors, kwargs = _example(spec, spec.shapes[0], torch.float32, "cpu", {})
    tensors, kwargs = bad.mutate(tensors, kwargs)
    with pytest.raises(bad.error, match=bad.match) as info:
        spec.fn(*tensors, **kwargs)
    message = str(info.value)
    assert "\n" not in message and spec.name in message, message


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS.values()])
def test_backend_forcing(spec, monkeypatch):
    monkeypatch.delenv("FASTFLOW_BACKEND", raising=False)
    tensors, kwargs = _example(spec, spec.shapes[0], torch.float32, "cpu", spec.options[0])
    chosen = resolve_backend(spec.op, tensors[0])
    assert chosen in spec.backends
    with pytest.raises(UnknownBackendError, match="not a fastflow backend"):
        spec.fn(*tensors, backend="fortran", **kwargs)
    if not HAS_CUDA:
        with pytest.raises(BackendUnavailableError, match="cuda"):
            spec.fn(*tensors, backend="cuda", **kwargs)
    half = [t.half() if t.is_floating_point() else t for t in tensors]
    with pytest.raises(BackendUnavailableError, match="numba.*float16"):
        spec.fn(*half, backend="numba", **kwargs)
    # FASTFLOW_BACKEND forces the default; an argument overrides it
    ref = spec.fn(*tensors, backend="reference", **kwargs)
    monkeypatch.setenv("FASTFLOW_BACKEND", "reference")
    for a, b in zip(spec.fn(*tensors, **kwargs), ref):
        assert torch.equal(a, b)
    monkeypatch.setenv("FASTFLOW_BACKEND", "numba")
    for a, b in zip(spec.fn(*tensors, **kwargs), ref):
        torch.testing.assert_close(a, b, **tolerances(torch.float32, True))
    monkeypatch.setenv("FASTFLOW_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTFLOW_BACKEND"):
        spec.fn(*tensors, **kwargs)


# ------------------------------------------------------------------ derivative modes
#
# Every way a PyTorch user differentiates, for every op on every backend, against the op's
# reference composite (its maths as plain torch ops) differentiated by plain autograd, one
# cotangent at a time: no functorch in the oracle. A transform that returned zeros, or missed the
# path through a derived tensor, fails here.


def _dm_case(spec, backend, option, inverse):
    dtype = _precise(spec, backend)
    tensors, kwargs = _inputs(spec, _small(spec.shapes[0]), dtype, device_for(backend), option, inverse)
    mask = _grad_mask(spec)
    wrt = [i for i, m in enumerate(mask) if m]
    return dtype, tensors, kwargs, wrt


def _op_of(spec, tensors, kwargs, inverse, backend, wrt):
    """``f(*diff) -> (outputs, logabsdet)`` of the public op, the differentiable inputs first."""
    def f(*diff):
        args = list(tensors)
        for i, d in zip(wrt, diff):
            args[i] = d
        return _call(spec, args, kwargs, inverse, backend)
    return f


def _oracle_of(spec, tensors, kwargs, inverse, wrt):
    """The same function through the registered composite in float64 (the reference maths)."""
    composite = spec.fused()._composite

    def f(*diff):
        args = [t.double() if t.is_floating_point() else t for t in tensors]
        for i, d in zip(wrt, diff):
            args[i] = d.double()
        return composite(*spec.op_args(args, kwargs, inverse, "reference"))
    return f


def _plain_jacobians(f, primals):
    """d(out_k)/d(primal_j) for every output k and primal j by reverse mode, one row at a time."""
    leaves = [p.detach().double().clone().requires_grad_() for p in primals]
    outs = f(*leaves)
    jac = []
    for o in outs:
        rows = [[] for _ in leaves]
        for e in range(o.numel()):
            if not o.requires_grad:
                g = [None] * len(leaves)
            else:
                g = torch.autograd.grad(o.reshape(-1)[e], leaves, retain_graph=True, allow_unused=True)
            for j, (gj, leaf) in enumerate(zip(g, leaves)):
                rows[j].append(torch.zeros_like(leaf) if gj is None else gj)
        jac.append([torch.stack(r).reshape(*o.shape, *leaf.shape) if r else torch.zeros(*o.shape, *leaf.shape,
                    dtype=torch.float64) for r, leaf in zip(rows, leaves)])
    return jac


def _dm_tol(dtype):
    return dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)


def _close(got, want, dtype, what):
    got = got.double().cpu()
    want = want.double().cpu()
    scale = float(want.abs().max().clamp_min(1.0))
    torch.testing.assert_close(got / scale, want / scale, **_dm_tol(dtype), msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("spec,backend,option,inverse", _cases(with_inverse=True))
def test_every_derivative_mode_matches_the_composite(spec, backend, option, inverse):
    """grad, vjp, jacrev, jacfwd, hessian, jvp, forward-mode dual tensors, plain double backward
    (create_graph=True), is_grads_batched and jacobian(vectorize=True), each against plain reverse
    mode through the reference composite."""
    import torch.autograd.forward_ad as fwAD

    dtype, tensors, kwargs, wrt = _dm_case(spec, backend, option, inverse)
    f = _op_of(spec, tensors, kwargs, inverse, backend, wrt)
    primals = tuple(tensors[i] for i in wrt)
    jac = _plain_jacobians(_oracle_of(spec, tensors, kwargs, inverse, wrt), primals)
    cot = _cotangents(f(*primals))
    argnums = tuple(range(len(primals)))
    # the oracle's vector-Jacobian product, per primal
    want_vjp = [sum((c.double().cpu().reshape(-1) @ jac[k][j].reshape(c.numel(), -1).cpu()).reshape(primals[j].shape)
                    for k, c in enumerate(cot)) for j in range(len(primals))]
    assert any(float(w.abs().max()) > 0 for w in want_vjp), "a zero gradient tests nothing"

    def scalar(*p):
        return sum((o * c.to(o.dtype)).sum() for o, c in zip(f(*p), cot))

    got = torch.func.grad(scalar, argnums=argnums)(*primals)
    for j, (g, w) in enumerate(zip(got, want_vjp)):
        _close(g, w, dtype, f"torch.func.grad wrt {spec.grad_inputs[j]}")
    _, vjp_fn = torch.func.vjp(f, *primals)
    for j, (g, w) in enumerate(zip(vjp_fn(tuple(c.to(dtype) for c in cot)), want_vjp)):
        _close(g, w, dtype, f"torch.func.vjp wrt {spec.grad_inputs[j]}")
    for name, transform in (("jacrev", torch.func.jacrev), ("jacfwd", torch.func.jacfwd)):
        got = transform(f, argnums=argnums)(*primals)
        for k in range(len(jac)):
            for j in range(len(primals)):
                _close(got[k][j], jac[k][j], dtype, f"torch.func.{name} d out{k} / d {spec.grad_inputs[j]}")
    # forward mode: jvp and dual tensors, against J @ t
    tangents = tuple(torch.randn_like(p) for p in primals)
    want_jvp = [sum((jac[k][j].reshape(jac[k][j].shape[:jac[k][j].dim() - t.dim()].numel(), -1).cpu()
                     @ t.double().cpu().reshape(-1)) for j, t in enumerate(tangents)) for k in range(len(jac))]
    _, got = torch.func.jvp(f, primals, tangents)
    for k, (g, w) in enumerate(zip(got, want_jvp)):
        _close(g.reshape(-1), w, dtype, f"torch.func.jvp out{k}")
    with fwAD.dual_level():
        outs = f(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        got = [fwAD.unpack_dual(o).tangent for o in outs]
    for k, (g, w) in enumerate(zip(got, want_jvp)):
        if g is None:  # an output that does not depend on any input (additive's log-det)
            assert float(w.abs().max()) == 0, f"forward_ad out{k}: no tangent"
            continue
        _close(g.reshape(-1), w, dtype, f"forward_ad out{k}")
    # the Hessian of the scalar in the first primal, against double backward of the composite
    oracle = _oracle_of(spec, tensors, kwargs, inverse, wrt)
    p0 = primals[0].detach().double().clone().requires_grad_()
    s = sum((o * c).sum() for o, c in zip(oracle(p0, *primals[1:]), cot))
    (g0,) = torch.autograd.grad(s, p0, create_graph=True)
    if g0.requires_grad:
        want_h = torch.stack([torch.autograd.grad(g0.reshape(-1)[e], p0, retain_graph=True, allow_unused=True,
                                                  materialize_grads=True)[0] for e in range(p0.numel())])
    else:  # a map linear in its first input
        want_h = torch.zeros(p0.numel(), *p0.shape, dtype=torch.float64)
    got_h = torch.func.hessian(lambda p: scalar(p, *primals[1:]))(primals[0])
    _close(got_h.reshape(want_h.shape), want_h, dtype, "torch.func.hessian")
    # plain double backward (autograd.grad with create_graph=True, then grad of the gradient)
    gen = torch.Generator().manual_seed(9)
    weights = [torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in primals]

    def double_backward(fn, ps):
        leaves = [p.detach().clone().requires_grad_() for p in ps]
        s = sum((o * c.to(o)).sum() for o, c in zip(fn(*leaves), cot))
        gs = torch.autograd.grad(s, leaves, create_graph=True, allow_unused=True, materialize_grads=True)
        total = sum((g * w.to(g)).sum() for g, w in zip(gs, weights))
        if not total.requires_grad:  # every gradient constant: a map linear in every input
            return gs, [torch.zeros_like(p) for p in leaves]
        return gs, torch.autograd.grad(total, leaves, allow_unused=True, materialize_grads=True)

    got_g, got_gg = double_backward(f, primals)
    want_g, want_gg = double_backward(oracle, [p.detach().double() for p in primals])
    for j in range(len(primals)):
        _close(got_g[j], want_g[j], dtype, f"create_graph gradient d / d {spec.grad_inputs[j]}")
        _close(got_gg[j], want_gg[j], dtype, f"double backward d / d {spec.grad_inputs[j]}")
    # batched gradients: the vmapped backward
    leaves = [p.detach().clone().requires_grad_() for p in primals]
    outs = f(*leaves)
    diff = [(k, o) for k, o in enumerate(outs) if o.requires_grad]
    k, o = diff[0]
    eye = torch.eye(o.numel(), dtype=o.dtype, device=o.device).reshape(o.numel(), *o.shape)
    got = torch.autograd.grad(o, leaves, eye, is_grads_batched=True, allow_unused=True, materialize_grads=True)
    for j, g in enumerate(got):
        _close(g.reshape(jac[k][j].shape), jac[k][j], dtype, f"is_grads_batched d out{k} / d {spec.grad_inputs[j]}")
    got = torch.autograd.functional.jacobian(f, primals, vectorize=True)
    for k in range(len(jac)):
        for j in range(len(primals)):
            _close(got[k][j], jac[k][j], dtype, f"jacobian(vectorize=True) d out{k} / d {spec.grad_inputs[j]}")


@pytest.mark.parametrize("spec,backend,option,inverse", _cases())
def test_vmap_of_every_transform(spec, backend, option, inverse):
    """vmap over a stack of two input sets of the op, and of grad, vjp, jacrev and jacfwd of it:
    each slice equal to the transform applied to that input set alone."""
    dtype, tensors, kwargs, wrt = _dm_case(spec, backend, option, inverse)
    other, _ = _inputs(spec, _small(spec.shapes[0]), dtype, device_for(backend), option, inverse)
    stacked = [torch.stack([a, b]) if i in wrt else a for i, (a, b) in enumerate(zip(tensors, other))]
    argnums = tuple(range(len(wrt)))

    def per_set(args):
        f = _op_of(spec, args, kwargs, inverse, backend, wrt)

        def scalar(*p):
            return sum(o.sum() + (o ** 2).sum() for o in f(*p))
        return f, scalar

    def transforms(args):
        f, scalar = per_set(args)
        prim = tuple(args[i] for i in wrt)
        return {
            "op": lambda *p: f(*p),
            "grad": lambda *p: torch.func.grad(scalar, argnums=argnums)(*p),
            "vjp": lambda *p: torch.func.vjp(f, *p)[1](tuple(torch.ones_like(o) for o in f(*p))),
            "jacrev": lambda *p: torch.func.jacrev(f, argnums=argnums)(*p),
            "jacfwd": lambda *p: torch.func.jacfwd(f, argnums=argnums)(*p),
        }, prim

    base, _ = transforms(tensors)
    for name in base:
        def batched(*p, name=name):
            return transforms(tensors)[0][name](*p)
        got = torch.func.vmap(batched)(*(stacked[i] for i in wrt))
        for slot, args in enumerate((tensors, [b if i in wrt else a for i, (a, b) in enumerate(zip(tensors, other))])):
            fns, prim = transforms(args)
            want = fns[name](*prim)
            flat_got = torch.utils._pytree.tree_leaves(got)
            flat_want = torch.utils._pytree.tree_leaves(want)
            assert len(flat_got) == len(flat_want), name
            for g, w in zip(flat_got, flat_want):
                _close(g[slot], w, dtype, f"vmap({name}) slice {slot}")


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.name) for s in SPECS.values()])
def test_inverse_takes_booleans_only(spec):
    """``inverse="False"``, ``"no"``, ``"0"``, ``[0]`` used to be truthy and silently computed the
    inverse map."""
    import numpy as np

    tensors, kwargs = _example(spec, spec.shapes[0], torch.float64, "cpu", spec.options[0])
    for bad in ("False", "no", "0", [0], 0, 1, None, torch.tensor(False)):
        with pytest.raises(TypeError, match=f"{spec.name}: inverse must be True or False"):
            spec.fn(*tensors, inverse=bad, **kwargs)
    for flag in (False, np.bool_(False)):
        torch.testing.assert_close(spec.fn(*tensors, inverse=flag, **kwargs), spec.fn(*tensors, **kwargs))
