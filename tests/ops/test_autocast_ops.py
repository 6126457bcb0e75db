"""Every public op under ``torch.autocast`` and on 16-bit storage (issue 28).

Inside an autocast region the ops compute in float32 whatever dtypes a conditioner hands them and
return float32 (``fastflow/ops/_autocast.py``), so the oracle is exact: the same op on the upcast
inputs, on the same backend, bit for bit; the gradients reaching bfloat16 leaves are that op's
float32 gradients rounded once to bfloat16 (the backward of the cast). Outside autocast mixed
dtypes stay the existing one-line error. On 16-bit storage (no autocast) each backend either
computes in float32 and rounds once to the storage dtype (within one unit in the last place of
the float64 reference's result), or declines with the registry's reason; ``backend=None`` picks
one that takes it.
"""

from __future__ import annotations

import pytest
import torch

import fastflow.ops  # noqa: F401  (declares every op)
from fastflow import BackendUnavailableError
from fastflow.backends import BACKENDS
from fastflow.ops._samples import SPECS
from tests._backends import run_table

LOW = (torch.bfloat16, torch.float16)
# CPU autocast: the backends that take CPU tensors (GPU ones only through Triton's interpreter)
_RUN = {n: marks for n, marks in run_table().items()
        if "cpu" in BACKENDS[n].devices or "any" in BACKENDS[n].devices or BACKENDS[n].cpu_when is not None}
DEVICE = "cpu"  # CPU autocast (bfloat16); CUDA autocast is the GPU suite's (benchmarks/gpu_suite.py)


def _runs(spec, backend):
    if backend is None:
        return True
    if backend not in _RUN or backend not in spec.backends:
        return False
    return spec.requires is None or spec.requires in BACKENDS[backend].parameterizations


# Defects these tests found, fixed with them: eager LU ops under autocast ran their GEMMs in
# bfloat16 (FusedOp.__call__ now runs an op's body with autocast off); the torch backend's coupling
# kernels computed 16-bit storage in 16 bits (kernels/torch/coupling.py now computes in float32).
_KNOWN = {"autocast": {}, "storage": {}}


def _cases(backends=(None, *_RUN), known=None, dtypes=None):
    out = []
    for spec in SPECS.values():
        for backend in backends:
            if not _runs(spec, backend):
                continue
            for dtype in dtypes or (None,):
                key = (spec.name, backend) + ((dtype,) if dtypes else ())
                marks = list(_RUN.get(backend, ()))
                if known and key in _KNOWN[known]:
                    marks.append(_KNOWN[known][key])
                label = f"{spec.name}-{backend or 'default'}" + (f"-{str(dtype)[6:]}" if dtypes else "")
                out.append(pytest.param(spec, backend, *((dtype,) if dtypes else ()), marks=marks, id=label))
    return out


def _example(spec, option=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return spec.example(spec.shapes[0], torch.float32, torch.device(DEVICE), g, **(option or spec.options[0]))


def _cast(tensors, dtype, skip_first=False):
    return [t.to(dtype) if t.is_floating_point() and not (skip_first and i == 0) else t for i, t in enumerate(tensors)]


def _grad_mask(spec, tensors):
    return [name in spec.grad_inputs and t.is_floating_point() for name, t in zip(spec.inputs, tensors)]


def _weights(out, lad, seed=3):
    # random cotangents, so every output element and log-det entry matters to the gradient
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=g), torch.randn(lad.shape, generator=g)


@pytest.mark.parametrize("inputs_low", [False, True], ids=["conditioner-low", "all-low"])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("spec,backend", _cases(known="autocast"))
def test_autocast_equals_float32_op_on_upcast_inputs(spec, backend, inverse, inputs_low):
    for option in spec.options:
        tensors, kw = _example(spec, option)
        # a conditioner under autocast hands the op bfloat16 parameters next to float32 data
        low = _cast(tensors, torch.bfloat16, skip_first=not inputs_low)
        need = _grad_mask(spec, low)
        leaves = [t.detach().requires_grad_(n) for t, n in zip(low, need)]
        with torch.autocast(DEVICE, torch.bfloat16):
            out, lad = spec.fn(*leaves, inverse=inverse, backend=backend, **kw)
        assert out.dtype == torch.float32 and lad.dtype == torch.float32
        up = [t.detach().float().requires_grad_(n) if t.is_floating_point() else t for t, n in zip(low, need)]
        ref, ref_lad = spec.fn(*up, inverse=inverse, backend=backend, **kw)
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(lad, ref_lad, rtol=0, atol=0, equal_nan=True)

        w_out, w_lad = _weights(out, lad)
        grads = torch.autograd.grad((out * w_out).sum() + (lad * w_lad).sum(), [t for t, n in zip(leaves, need) if n])
        ref_grads = torch.autograd.grad((ref * w_out).sum() + (ref_lad * w_lad).sum(),
                                        [t for t, n in zip(up, need) if n])
        assert grads, f"{spec.name}: no gradient inputs"
        for g, r, leaf in zip(grads, ref_grads, [t for t, n in zip(leaves, need) if n]):
            assert g.dtype == leaf.dtype  # bfloat16 leaves get bfloat16 gradients
            # the backward of the float32 cast rounds the float32 gradient once
            torch.testing.assert_close(g, r.to(leaf.dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("spec,backend", _cases(backends=(None, "reference", "numba")))
def test_autocast_kernel_of_the_custom_op(spec, backend):
    """A graph that calls ``fastflow::<op>`` directly (an exported program) gets the same float32
    cast from the op's registered autocast kernel."""
    if backend is None:
        backend = "reference"
    tensors, kw = _example(spec)
    low = _cast(tensors, torch.bfloat16, skip_first=True)
    op = spec.fused().op
    with torch.autocast(DEVICE, torch.bfloat16):
        out = op(*spec.op_args(low, kw, False, backend))
    ref = op(*spec.op_args([t.float() if t.is_floating_point() else t for t in low], kw, False, backend))
    for o, r in zip(out, ref):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o, r, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_mixed_dtypes_outside_autocast_still_raise(spec):
    tensors, kw = _example(spec)
    mixed = _cast(tensors, torch.bfloat16, skip_first=True)
    with pytest.raises(TypeError, match="cast them to one dtype"):
        spec.fn(*mixed, **kw)
    # an autocast region for another device type does not apply to CPU tensors
    if torch.cuda.is_available():
        with torch.autocast("cuda", torch.float16), pytest.raises(TypeError, match="cast them to one dtype"):
            spec.fn(*mixed, **kw)


def _assert_float32_compute_rounded_once(out, ref, dtype, what):
    """``out`` (dtype ``dtype``) is the float64 ``ref`` rounded to ``dtype`` up to one unit in the
    last place: float32 compute adds ~1e-7 relative, far below a 16-bit ulp (2^-8 bfloat16, 2^-11
    float16); a kernel that computed in 16 bits would be off by several ulps."""
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}, expected the storage dtype {dtype}"
    ref = ref.double()
    mant = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    exponent = torch.floor(torch.log2(ref.abs().clamp_min(torch.finfo(dtype).tiny)))
    ulp = torch.pow(2.0, exponent - mant)
    err = (out.double() - ref).abs()
    # 1e-5 absolute: float32 round-off of the O(1..10) intermediates of a value that cancels to ~0
    bad = ~((err <= ulp + 1e-5) | (out.double().isnan() & ref.isnan()))
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements beyond one {dtype} ulp of the float64 reference, "
                           f"worst {float((err / ulp)[bad].max()):.1f} ulp")


@pytest.mark.parametrize("spec,backend,dtype", _cases(known="storage", dtypes=LOW))
def test_16bit_storage_computes_in_float32_or_declines(spec, backend, dtype):
    tensors, kw = _example(spec)
    low = _cast(tensors, dtype)
    if backend is not None and BACKENDS[backend].decline_reason(spec.op, torch.device(DEVICE), dtype):
        with pytest.raises(BackendUnavailableError, match="takes dtypes"):
            spec.fn(*low, backend=backend, **kw)
        return
    for inverse in (False, True):
        out, lad = spec.fn(*low, inverse=inverse, backend=backend, **kw)
        ref, ref_lad = spec.fn(*_cast(low, torch.float64), inverse=inverse, backend="reference", **kw)
        label = f"{spec.name} {backend} {dtype} inverse={inverse}"
        _assert_float32_compute_rounded_once(out, ref, dtype, label + " outputs")
        _assert_float32_compute_rounded_once(lad, ref_lad, dtype, label + " logabsdet")
