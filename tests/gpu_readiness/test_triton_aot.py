"""Ahead-of-time compile of every Triton specialisation the launchers request, for sm_80 and sm_90.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs Triton's real code
generator and ``ptxas`` without a GPU: typing and constexpr errors, unsupported ops and
register/spill problems that the interpreter (maths only) cannot see fail here. The
specialisations come from the kernel modules' own ``specializations()``, built from the same
``*_spec`` functions the launchers launch with (checked below against what a launch passes to
the JIT). K and the coupling width are constexprs, so the set is not the infinite product:
it is every storage dtype x flag at representative sizes plus every tile shape the launch
heuristics produce, deduplicated (see each ``specializations()`` docstring).

Compiles run in two worker processes (~2 minutes on 2 cores for both targets). Not run under
``TRITON_INTERPRET=1`` (the kernels are then interpreter objects).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import re

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                                reason="compiles need the real triton JIT, not the interpreter")
triton = pytest.importorskip("triton")

MODULES = ("spline", "coupling", "lu", "bernstein")
TARGETS = (80, 90)


def _specs(module: str):
    import importlib

    return importlib.import_module(f"fastflow.kernels.triton.{module}").specializations()


def _compile_one(module: str, index: int, cc: int):
    """In a worker: compile one spec, return (label, registers, stack bytes) or (label, error)."""
    from fastflow.kernels.triton._aot import compile_spec, cubin_tool

    spec = _specs(module)[index]
    try:
        kernel = compile_spec(spec, cc)
        usage = cubin_tool(kernel.asm["cubin"], "-res-usage")
        m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
        return spec.label, int(m[1]), int(m[2]), None
    except Exception as exc:  # reported by the test, with the spec's label
        return spec.label, None, None, f"{type(exc).__name__}: {str(exc)[:2000]}"


@pytest.fixture(scope="module")
def pool():
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 3.6 fuses by default
    with cf.ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1), mp_context=mp.get_context("spawn")) as ex:
        yield ex


@pytest.mark.parametrize("cc", TARGETS)
@pytest.mark.parametrize("module", MODULES)
def test_every_specialisation_compiles(pool, module, cc):
    specs = _specs(module)
    assert specs, f"{module}.specializations() is empty"
    assert len({s.key() for s in specs}) == len(specs), "specializations() must be deduplicated"
    results = list(pool.map(_compile_one, [module] * len(specs), range(len(specs)), [cc] * len(specs)))
    failures = [f"{label}: {err}" for label, _, _, err in results if err]
    assert not failures, f"{len(failures)} of {len(specs)} {module} specialisations fail for sm_{cc}:\n" + "\n".join(
        failures)
    if module == "spline":
        # The spline kernels' register problem (issue 18: 255 registers, up to 10 KB of spills):
        # no float32/16-bit spline specialisation may spill (float64 on sm_80 keeps 8 B of stack
        # at K=64: allowed up to 64 B).
        spilled = [f"{label}: {stack} B stack" for label, _, stack, _ in results
                   if stack and ("fp64" not in label or stack > 64)]
        assert not spilled, "\n".join(spilled)


# ---------------------------------------------------------------- the launch uses the spec


class _Launched(Exception):
    pass


def _capture(monkeypatch):
    """Make JITFunction.run record its arguments instead of launching (no GPU here)."""
    from triton.runtime.jit import JITFunction

    calls = []

    def run(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, kwargs))

    monkeypatch.setattr(JITFunction, "run", run)
    return calls


def _jit_types(args):
    """What the JIT's specialisation makes of each positional argument: (type, divisible)."""
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    out = []
    for a in args:
        ty, key = native_specialize_impl(CUDABackend, a, False, True, True)[:2]
        out.append((ty, key == "D"))
    return out


def _assert_matches(spec, kernel, args, kwargs):
    assert kernel is spec.kernel
    assert kwargs == spec.launch_kwargs()
    cx = dict(spec.constexprs)
    runtime = [(a, t) for a, t in spec.signature if a not in spec.meta]
    assert len(runtime) == len(args)
    for (name, ty), (jit_ty, div), value in zip(runtime, _jit_types(args), args):
        if ty == "constexpr":  # an integer argument the JIT specialises to the constant 1
            assert (jit_ty, value) == ("constexpr", cx[name]), name
        elif ty == "fp64":  # annotated float64 scalars: the JIT takes the annotation
            assert isinstance(value, float), name
        else:
            assert jit_ty == ty, f"{name}: launch passes {jit_ty}, spec says {ty}"
            assert div == (name in spec.divisible), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("k", [3, 8, 64])
def test_spline_launch_uses_its_spec(monkeypatch, k, dtype):
    from fastflow.kernels.triton import spline

    calls = _capture(monkeypatch)
    n = 4096
    x, uw, uh, ud = torch.zeros(n, dtype=dtype), torch.zeros(n, k, dtype=dtype), torch.zeros(n, k, dtype=dtype), \
        torch.zeros(n, k - 1, dtype=dtype)
    for inverse in (False, True):
        spline.fwd(x, uw, uh, ud, inverse, 2.5, 1e-3, 1e-3, 1e-3)
        spline.bwd(x, x, x, uw, uh, ud, inverse, 2.5, 1e-3, 1e-3, 1e-3)
        (kf, af, kwf), (kb, ab, kwb) = calls[-2:]
        _assert_matches(spline.launch_spec(k, dtype, inverse, False), kf, af, kwf)
        _assert_matches(spline.launch_spec(k, dtype, inverse, True), kb, ab, kwb)


@pytest.mark.parametrize("parameterization", ["nflows", "nflows_bounded", "zuko"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("k", [3, 8])
def test_spline_parameterizations_launch_their_spec(monkeypatch, k, dtype, parameterization):
    # The launcher interface (forward/backward with a parameterisation and its box) launches the
    # specialisation launch_spec names for it, and specializations() compiles that prologue.
    from fastflow.kernels.triton import spline

    calls = _capture(monkeypatch)
    n = 4096
    nd = k + 1 if parameterization == "nflows_bounded" else k - 1
    x, uw, uh, ud = (torch.zeros(*s, dtype=dtype) for s in ((n,), (n, k), (n, k), (n, nd)))
    box = (-2.5, 3.0, -1.75, 2.25)
    for inverse in (False, True):
        spline.forward(x, uw, uh, ud, inverse, parameterization, box, 1e-3, 1e-3, 1e-3)
        spline.backward(x, x, x, uw, uh, ud, inverse, parameterization, box, 1e-3, 1e-3, 1e-3)
        (kf, af, kwf), (kb, ab, kwb) = calls[-2:]
        _assert_matches(spline.launch_spec(k, dtype, inverse, False, parameterization), kf, af, kwf)
        _assert_matches(spline.launch_spec(k, dtype, inverse, True, parameterization), kb, ab, kwb)
        assert kwf["KIND"] == spline.KINDS[parameterization]
        # the box travels as the kernels' trailing float64 scalars
        assert tuple(af[-4:]) == box and tuple(ab[-4:]) == box
    keys = {s.key() for s in spline.specializations()}
    for backward in (False, True):
        for inverse in (False, True):
            for kk in (8, 64):
                assert spline.launch_spec(kk, dtype, inverse, backward, parameterization).key() in keys


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coupling_launch_uses_its_spec(monkeypatch, dtype):
    from fastflow.kernels.triton import coupling

    calls = _capture(monkeypatch)
    full = torch.zeros(64, 6, 32, 32, dtype=dtype)
    x, h = full[:, :3].reshape(64, 3, 1024), full[:, 3:].reshape(64, 3, 1024)  # channel halves: strided
    for kind in ("exp", "softclamp", "sigmoid"):
        coupling.affine_fwd(x, h, h, kind, 2.0, False)
        kernel, args, kwargs = calls[-1]
        _assert_matches(coupling.coupling_spec("affine_fwd", dtype, 64, 3, 1024,
                                               (x.stride(), h.stride(), h.stride()), kind, False), kernel, args, kwargs)
    g, gl = torch.zeros(64, 3, 1024, dtype=dtype), torch.zeros(64, dtype=dtype)
    coupling.affine_bwd(g, gl, x, h, h, "exp", 2.0, True)
    kernel, args, kwargs = calls[-1]
    spec = coupling.coupling_spec("affine_bwd", dtype, 64, 3, 1024,
                                  (g.stride(), gl.stride(0), x.stride(), h.stride(), h.stride()), "exp", True)
    _assert_matches(spec, kernel, args, kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n_raw", [2, 17, 60])
def test_bernstein_launch_uses_its_spec(monkeypatch, n_raw, dtype):
    from fastflow.kernels.triton import bernstein

    calls = _capture(monkeypatch)
    n = 4096
    x, theta = torch.zeros(n, dtype=dtype), torch.zeros(n, n_raw, dtype=dtype)
    keys = {s.key() for s in bernstein.specializations()}
    for inverse in (False, True):
        bernstein.forward(x, theta, inverse, 5.0)
        bernstein.backward(x, x, x, theta, inverse, 5.0)
        (kf, af, kwf), (kb, ab, kwb) = calls[-2:]
        _assert_matches(bernstein.launch_spec(n_raw, dtype, inverse, False, n), kf, af, kwf)
        _assert_matches(bernstein.launch_spec(n_raw, dtype, inverse, True, n), kb, ab, kwb)
        if dtype != torch.bfloat16 or n_raw == 17:  # the ahead-of-time compile covers this launch
            for backward in (False, True):
                assert bernstein.launch_spec(n_raw, dtype, inverse, backward, 2**20).key() in keys


def test_lu_launch_uses_its_spec(monkeypatch):
    from fastflow.kernels.triton import lu

    calls = _capture(monkeypatch)
    c = 24
    x3, a = torch.zeros(8, c, 256), torch.zeros(c, c)
    lu.apply(x3, a, None, transpose=True)
    kernel, args, kwargs = calls[-1]
    _assert_matches(lu.lu_spec("apply", c, torch.float32, False, dict(NTOT=8 * 256, C=c, HW=256, stride_ao=1,
                                                                    stride_ak=c)), kernel, args, kwargs)
