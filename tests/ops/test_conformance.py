"""The conformance suite: every op declared in ``fastflow.ops._spec.SPECS`` on every backend that
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
from fastflow.backends import BACKENDS, get_kernel, resolve_backend
from fastflow.ops._spec import SPECS
from fastflow.testing import (
    assert_close_conditioned,
    elementwise_jacobian_logabsdet,
    jacobian_logabsdet,
    tolerances,
)
from tests._backends import HAS_CUDA, INTERPRET, device_for, dtypes_for

# The backends this run exercises; triton and cuda carry their marks (the triton run is
# `TRITON_INTERPRET=1 pytest -m triton`).
_RUN = {"reference": (), "numba": (), "torch": ()}
if HAS_CUDA or INTERPRET:
    _RUN["triton"] = (pytest.mark.triton,)
if HAS_CUDA:
    _RUN["cuda"] = (pytest.mark.gpu,)
F32_COMPUTE = ("triton", "cuda")  # GPU kernels compute float32 in float32


def _available(spec, backend):
    if backend not in _RUN or backend not in spec.backends:
        return False
    if spec.requires is None:
        return True
    return spec.requires in getattr(get_kernel(spec.op, backend), "PARAMETERIZATIONS", ("nflows",))


def _cases(with_options=False, with_inverse=False, custom_op_only=False):
    out = []
    for spec in SPECS.values():
        for backend, marks in _RUN.items():
            if not _available(spec, backend) or (custom_op_only and backend in spec.outside_op):
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
        # float32 computed in float32 (GPU kernels; the torch backend and every LU data pass, a
        # float32 GEMM) is held to float32 round-off times the map's conditioning.
        f32 = dtype == torch.float32 and (backend in F32_COMPUTE + ("torch",) or spec.kernels == "lu")
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
