"""The CUDA backend without (and with) a GPU: csrc/ compiles with nvcc; the kernels' per-element
maths, compiled by nvcc for the host, matches the reference; the launchers pass exactly the
arguments the extern "C" entry points declare; the loader finds sources, prefers a matching
fatbin and falls back to NVRTC; the backend declines cleanly without a GPU. With a GPU: the
cuda kernels against triton and the reference.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from fastflow import BackendUnavailableError
from fastflow.kernels.cuda import loader
from fastflow.kernels.reference import spline as ref_spline
from fastflow.ops import rq_spline
from tests._backends import HAS_CUDA

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "csrc"
SOURCES = sorted(CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: csrc/ cannot be compiled here")
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def test_sources_present():
    assert {p.name for p in SOURCES} >= {"rq_spline.cu", "coupling.cu"}
    assert (CSRC / loader.HEADER).is_file()


# ------------------------------------------------------------------ nvcc


@needs_nvcc
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(src, tmp_path):
    cmd = [NVCC, "-std=c++17", "-O3", "-ftz=true", "-Xptxas", "-v", "-Werror", "all-warnings", "-I", str(CSRC),
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=[sm_90,compute_90]",
           "-fatbin", "-o", str(tmp_path / (src.stem + ".fatbin")), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}{res.stderr}"
    entries = set(re.findall(r"Compiling entry function '(\w+)' for 'sm_90'", res.stderr + res.stdout))
    declared = {f"{m}_{s}" for m in _entry_macros(src) for s in ("f32", "f16", "bf16")}
    assert entries == declared


# ------------------------------------------------------------------ host build of the maths

_HARNESS = r"""
#include "rq_spline.cu"
#include "coupling.cu"
using fastflow::i64;
#define HOST_SPLINE(S, T)                                                                                     \
  extern "C" void h_rq_spline_fwd_##S(const T* x, const T* uw, const T* uh, const T* ud, T* out, T* lad, i64 n, \
                                      i64 K, float b, float mbw, float mbh, float md, int inv) {              \
    for (i64 i = 0; i < n; ++i) fastflow::spline::fwd_elem<T>(i, x, uw, uh, ud, out, lad, K, b, mbw, mbh, md, inv); \
  }                                                                                                           \
  extern "C" void h_rq_spline_bwd_##S(const T* go, const T* gl, const T* x, const T* uw, const T* uh,         \
                                      const T* ud, T* gx, T* guw, T* guh, T* gud, i64 n, i64 K, float b,      \
                                      float mbw, float mbh, float md, int inv) {                              \
    for (i64 i = 0; i < n; ++i)                                                                               \
      fastflow::spline::bwd_elem<T>(i, go, gl, x, uw, uh, ud, gx, guw, guh, gud, K, b, mbw, mbh, md, inv);    \
  }                                                                                                           \
  /* contiguous (B, F) rows; the GPU reduces each row's log s in a thread group, here in order */           \
  extern "C" void h_affine_fwd_##S(const T* x, const T* t, const T* h, T* out, T* lad, i64 B, i64 F, int kind, \
                                   float c, int inv) {                                                        \
    for (i64 b = 0; b < B; ++b) {                                                                             \
      float acc = 0.0f;                                                                                       \
      for (i64 e = 0; e < F; ++e)                                                                             \
        acc += fastflow::coupling::affine_elem(fastflow::load(x, b * F + e), fastflow::load(t, b * F + e),   \
                                               fastflow::load(h, b * F + e), kind, c, inv, out, b * F + e);  \
      fastflow::store(lad, b, inv ? -acc : acc);                                                              \
    }                                                                                                         \
  }                                                                                                           \
  extern "C" void h_affine_bwd_##S(const T* go, const T* gl, const T* x, const T* t, const T* h, T* gx, T* gh, \
                                   i64 B, i64 F, int kind, float c, int inv) {                                \
    for (i64 b = 0; b < B; ++b)                                                                               \
      for (i64 e = 0; e < F; ++e)                                                                             \
        fastflow::coupling::affine_bwd_elem(fastflow::load(go, b * F + e), fastflow::load(gl, b),            \
                                            fastflow::load(x, b * F + e), fastflow::load(t, b * F + e),       \
                                            fastflow::load(h, b * F + e), kind, c, inv, gx, gh, b * F + e);   \
  }
HOST_SPLINE(f32, float)
HOST_SPLINE(f16, fastflow::f16)
HOST_SPLINE(bf16, fastflow::bf16)
#define HOST_CONV(S, T)                                                                                         \
  extern "C" void h_to_##S(const float* x, T* y, i64 n) {                                                     \
    for (i64 i = 0; i < n; ++i) fastflow::store(y, i, x[i]);                                                  \
  }                                                                                                           \
  extern "C" void h_from_##S(const T* x, float* y, i64 n) {                                                   \
    for (i64 i = 0; i < n; ++i) y[i] = fastflow::load(x, i);                                                  \
  }
HOST_CONV(f16, fastflow::f16)
HOST_CONV(bf16, fastflow::bf16)
"""

_BOX = (-1.0, 1.0, -1.0, 1.0)  # tail_bound 1
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    """csrc/'s per-element device functions compiled for the host (they are __host__ __device__)."""
    if NVCC is None:
        pytest.skip("nvcc not on PATH: csrc/ cannot be compiled here")
    d = tmp_path_factory.mktemp("cuda_host")
    (d / "harness.cu").write_text(_HARNESS)
    cmd = [NVCC, "-std=c++17", "-O2", "-arch=sm_80", "-Xcompiler", "-fPIC", "-shared", "-I", str(CSRC),
           str(d / "harness.cu"), "-o", str(d / "libharness.so")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}{res.stderr}"
    return ctypes.CDLL(str(d / "libharness.so"))


def _p(t):
    return ctypes.c_void_p(t.data_ptr())


def _scal(n, k, tb, mbw, mbh, md, inv):
    c = ctypes
    return (c.c_longlong(n), c.c_longlong(k), c.c_float(tb), c.c_float(mbw), c.c_float(mbh), c.c_float(md),
            c.c_int(int(inv)))


def test_storage_conversions_match_torch(host_lib):
    # Every 16-bit pattern widens exactly; narrowing rounds as torch does (random float32 bits
    # plus the overflow/subnormal/NaN corners).
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    corners = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0, 65519.99, 65520.0, 6e-8, 2.9802322e-08,
               3e-8, 1e-45, 3.3895314e38, 3.4e38]
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    xs = torch.cat([bits.view(torch.float32), torch.tensor(corners)])
    for dtype, name in ((torch.float16, "f16"), (torch.bfloat16, "bf16")):
        src = patterns.view(dtype)
        wide = torch.empty(src.shape)
        getattr(host_lib, f"h_from_{name}")(_p(src), _p(wide), ctypes.c_longlong(src.numel()))
        assert torch.equal(wide.isnan(), src.float().isnan())
        ok = ~wide.isnan()
        assert torch.equal(wide[ok], src.float()[ok]), name
        narrow = torch.empty(xs.shape, dtype=dtype)
        getattr(host_lib, f"h_to_{name}")(_p(xs), _p(narrow), ctypes.c_longlong(xs.numel()))
        ref = xs.to(dtype)
        assert torch.equal(narrow.isnan(), ref.isnan())
        ok = ~ref.isnan()
        assert torch.equal(narrow.view(torch.int16)[ok], ref.view(torch.int16)[ok]), name


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("k", [2, 8, 23])
def test_host_spline_matches_reference(host_lib, k, inverse):
    # The kernels' own code (fwd_elem/bwd_elem) against the float64 reference on the same rounded
    # inputs; the float32 inverse is held to its conditioning like the triton kernels are.
    g = torch.Generator().manual_seed(k)
    n = 2**9 + 17
    x = torch.randn(n, dtype=torch.float64, generator=g) * 1.1
    uw, uh = (torch.randn(n, k, dtype=torch.float64, generator=g) * 1.5 for _ in range(2))
    ud = torch.randn(n, k - 1, dtype=torch.float64, generator=g) * 1.5
    if inverse:
        x = ref_spline.forward(x, uw, uh, ud, False, "nflows", _BOX, 1e-3, 1e-3, 1e-3)[0]
    go, gl = torch.randn(n, dtype=torch.float64, generator=g), torch.randn(n, dtype=torch.float64, generator=g)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = [v.to(dtype).contiguous() for v in (x, uw, uh, ud, go, gl)]
        d64 = [v.double() for v in t]
        ref = ref_spline.forward(*d64[:4], inverse, "nflows", _BOX, 1e-3, 1e-3, 1e-3)
        ref_g = ref_spline.backward(d64[4], d64[5], *d64[:4], inverse, "nflows", _BOX, 1e-3, 1e-3, 1e-3)
        out, lad = torch.empty_like(t[0]), torch.empty_like(t[0])
        fn = getattr(host_lib, f"h_rq_spline_fwd_{_SUFFIX[dtype]}")
        fn(*map(_p, t[:4]), _p(out), _p(lad), *_scal(n, k, 1.0, 1e-3, 1e-3, 1e-3, inverse))
        grads = [torch.empty_like(v) for v in t[:4]]
        fn = getattr(host_lib, f"h_rq_spline_bwd_{_SUFFIX[dtype]}")
        fn(*map(_p, t[4:]), *map(_p, t[:4]), *map(_p, grads), *_scal(n, k, 1.0, 1e-3, 1e-3, 1e-3, inverse))
        # float32 storage: float32 round-off, magnified by the inverse's slope |dx/dy| (and its
        # square for the gradients); half storage: its own rounding dominates.
        if dtype == torch.float32:
            amp = ref[1].exp() if inverse else torch.ones_like(ref[1])
            assert torch.all((out.double() - ref[0]).abs() <= 1e-5 + 1e-5 * amp)
            # The inverse's gradients carry the slope squared: on these inputs the triton kernel's
            # float32 gradients are off by 1e-2..4e-2 of their scale, this code by up to 1.5e-2.
            rtol, atol = (2e-2, 2e-2) if inverse else (1e-3, 1e-4)
        else:
            rtol, atol = (2e-2, 2e-2) if dtype == torch.float16 else (6e-2, 6e-2)
            torch.testing.assert_close(out.double(), ref[0], rtol=rtol, atol=atol)
        torch.testing.assert_close(lad.double(), ref[1], rtol=rtol, atol=atol)
        for name, got, r in zip(("x", "widths", "heights", "derivatives"), grads, ref_g):
            scale = r.abs().max().clamp_min(1.0)
            finite = torch.isfinite(got) | ~torch.isfinite(r.to(dtype))  # an overflow of the storage dtype
            assert finite.all(), name
            ok = torch.isfinite(got)
            torch.testing.assert_close(
                got.double()[ok] / scale, r[ok] / scale, rtol=rtol, atol=atol, msg=f"{name} {dtype}"
            )


def test_host_spline_tails_and_nan(host_lib):
    x = torch.tensor([-3.0, 3.0, float("nan"), 1.0, -1.0, 0.25])
    n, k = x.numel(), 5
    uw, uh, ud = torch.randn(n, k), torch.randn(n, k), torch.randn(n, k - 1)
    uh[5, 1] = float("nan")
    out, lad = torch.empty(n), torch.empty(n)
    host_lib.h_rq_spline_fwd_f32(*map(_p, (x, uw, uh, ud, out, lad)), *_scal(n, k, 1.0, 1e-3, 1e-3, 1e-3, False))
    assert out[0] == -3.0 and out[1] == 3.0 and lad[0] == 0 and lad[1] == 0
    assert out[2].isnan() and lad[2].isnan()
    torch.testing.assert_close(out[3:5], x[3:5])  # the bounds map to themselves
    assert out[5].isnan() and torch.isfinite(out[:5][~x[:5].isnan()]).all()


@pytest.mark.parametrize("scale", ["exp", "softclamp", "sigmoid"])
@pytest.mark.parametrize("inverse", [False, True])
def test_host_affine_coupling_matches_reference(host_lib, scale, inverse):
    from fastflow.kernels.reference.coupling import affine_coupling_reference, affine_coupling_reference_backward

    g = torch.Generator().manual_seed(1)
    b, f = 7, 2**6 + 17
    x, t, h = (torch.randn(b, f, dtype=torch.float64, generator=g) * 2 for _ in range(3))
    h[0, :4] = torch.tensor([30.0, -30.0, 90.0, -90.0])  # saturated scales
    go, gl = torch.randn(b, f, dtype=torch.float64, generator=g), torch.randn(b, dtype=torch.float64, generator=g)
    kind = {"exp": 0, "softclamp": 1, "sigmoid": 2}[scale]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        v = [a.to(dtype).contiguous() for a in (x, t, h, go, gl)]
        d = [a.double() for a in v]
        ref = affine_coupling_reference(*d[:3], scale, 2.0, inverse)
        ref_g = affine_coupling_reference_backward(d[3], d[4], *d[:3], scale, 2.0, inverse)
        out, lad = torch.empty_like(v[0]), torch.empty(b, dtype=dtype)
        getattr(host_lib, f"h_affine_fwd_{_SUFFIX[dtype]}")(
            *map(_p, v[:3]), _p(out), _p(lad), ctypes.c_longlong(b), ctypes.c_longlong(f), ctypes.c_int(kind),
            ctypes.c_float(2.0), ctypes.c_int(int(inverse)))
        gx, gh = torch.empty_like(v[0]), torch.empty_like(v[0])
        getattr(host_lib, f"h_affine_bwd_{_SUFFIX[dtype]}")(
            _p(v[3]), _p(v[4]), *map(_p, v[:3]), _p(gx), _p(gh), ctypes.c_longlong(b), ctypes.c_longlong(f),
            ctypes.c_int(kind), ctypes.c_float(2.0), ctypes.c_int(int(inverse)))
        rtol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
        # Compare where the reference is representable in the storage dtype (exp(90) is not).
        for name, got, r in (("out", out, ref[0]), ("lad", lad, ref[1]), ("gx", gx, ref_g[0]), ("gh", gh, ref_g[1])):
            ok = torch.isfinite(r.to(dtype))
            assert torch.equal(torch.isfinite(got), ok), name
            scale_ = r[ok].abs().max().clamp_min(1.0) if dtype != torch.float32 else 1.0
            torch.testing.assert_close(got.double()[ok] / scale_, r[ok] / scale_, rtol=rtol, atol=rtol, msg=name)


# ------------------------------------------------------------------ launch ABI


def _entry_macros(src: Path) -> list[str]:
    return re.findall(r"\b(\w+)_##S\(", src.read_text())


def _signature(kernel: str) -> list[str]:
    """Kinds of the parameters of extern "C" kernel ``<name>_S``: ptr, i64, f32 or i32."""
    for src in SOURCES:
        text = src.read_text().replace("\\\n", " ")
        m = re.search(rf"\b{kernel}_##S\(([^)]*)\)", text)
        if m:
            kinds = []
            for param in m.group(1).split(","):
                param = param.strip()
                if "*" in param:
                    kinds.append("ptr")
                elif re.match(r"(fastflow::i64|FF_I64|i64)\s", param):
                    kinds.append("i64")
                elif param.startswith("float "):
                    kinds.append("f32")
                elif param.startswith("int "):
                    kinds.append("i32")
                else:
                    raise AssertionError(f"unclassified parameter {param!r} of {kernel}")
            return kinds
    raise AssertionError(f"no entry point {kernel}_S in csrc/")


_KIND = {np.uint64: "ptr", np.int64: "i64", np.float32: "f32", np.int32: "i32"}


@pytest.fixture
def recorded(monkeypatch):
    """The adapters' launches, recorded instead of run (CPU tensors stand in for CUDA ones)."""
    from fastflow.kernels.cuda import coupling, spline

    calls = []

    def fake_launch(op, name, device, n, args, grid=None):
        calls.append((op, name, n, args, grid))

    monkeypatch.setattr(spline, "launch", fake_launch)
    monkeypatch.setattr(coupling, "launch", fake_launch)
    return calls


def _check_abi(calls):
    assert calls
    for op, name, n, args, grid in calls:
        kernel, suffix = name.rsplit("_", 1)
        assert suffix in ("f32", "f16", "bf16")
        assert [_KIND[type(a)] for a in args] == _signature(kernel), name
        assert (CSRC / f"{op}.cu").is_file() and kernel in _entry_macros(CSRC / f"{op}.cu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_spline_launch_arguments_match_the_kernels(recorded, dtype):
    from fastflow.kernels.cuda import spline

    n, k = 37, 6
    x, uw, uh, ud = torch.zeros(n, dtype=dtype), torch.zeros(n, k, dtype=dtype), torch.zeros(n, k, dtype=dtype), \
        torch.zeros(n, k - 1, dtype=dtype)
    out, lad = spline.fwd(x, uw, uh, ud, True, 2.0, 1e-3, 1e-3, 1e-3)
    assert out.shape == x.shape and lad.shape == x.shape and out.dtype == dtype
    g = spline.bwd(x, x, x, uw, uh, ud, False, 2.0, 1e-3, 1e-3, 1e-3)
    assert [t.shape for t in g] == [x.shape, uw.shape, uh.shape, ud.shape]
    _check_abi(recorded)
    fwd_args = recorded[0][3]
    assert fwd_args[0] == x.data_ptr() and fwd_args[4] == out.data_ptr() and int(fwd_args[6]) == n
    assert int(fwd_args[7]) == k and float(fwd_args[8]) == 2.0 and int(fwd_args[-1]) == 1
    with pytest.raises(ValueError, match="uw must be contiguous"):
        spline.fwd(x, uw.t().contiguous().t(), uh, ud, False, 1.0, 1e-3, 1e-3, 1e-3)


def test_coupling_launch_arguments_match_the_kernels(recorded):
    from fastflow.kernels.cuda import coupling

    full = torch.zeros(5, 8, 2, 3)
    x = full[:, :4].reshape(5, 4, 6)  # a channel half: strided rows
    h = full[:, 4:].reshape(5, 4, 6)
    coupling.affine_fwd(x, x, h, "softclamp", 2.0, False)
    coupling.affine_bwd(x, torch.zeros(5), x, x, h, "sigmoid", 2.0, True)
    coupling.additive_fwd(x, h, True)
    _check_abi(recorded)
    args = recorded[0][3]
    assert [int(a) for a in args[1:4]] == list(x.stride()) and args[8] == h.data_ptr()
    assert int(args[-4]) == 1  # softclamp
    assert int(args[-1]) in (32, loader.BLOCK)
    with pytest.raises(ValueError, match="unknown scale"):
        coupling.affine_fwd(x, x, h, "tanh", 2.0, False)


# ------------------------------------------------------------------ loader


def test_sources_found_and_header_inlined():
    d = loader.find_source_dir("rq_spline")
    assert d is not None and (d / "rq_spline.cu").is_file()
    text = loader.source_text("rq_spline", d)
    assert '#include "fastflow.cuh"' not in text and "struct bf16" in text and "rq_spline_fwd_" in text
    assert loader.find_source_dir("rq_spline", [d.parent / "nowhere"]) is None


def _fake_fatbin(directory: Path, op: str, digest: str, archs, ptx):
    p = directory / loader.fatbin_name(op, digest, archs, ptx)
    p.write_bytes(b"\x00")
    return p


def test_plan_prefers_a_matching_fatbin(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTFLOW_CUDA_FATBIN", raising=False)
    src = loader.find_source_dir("rq_spline")
    digest = loader.source_digest(loader.source_text("rq_spline", src))
    assert loader.plan("rq_spline", 90, fatbin_dir=tmp_path).kind == "nvrtc"  # none built
    fb = _fake_fatbin(tmp_path, "rq_spline", digest, [80, 90], 90)
    assert loader.find_fatbins("rq_spline", tmp_path)[0].archs == (80, 90)
    for cc in (80, 86, 89, 90, 100, 120):  # SASS 8.x runs on 8.6/8.9; PTX 9.0 is JIT-compiled for newer
        p = loader.plan("rq_spline", cc, fatbin_dir=tmp_path)
        assert p.kind == "fatbin" and p.path == fb and p.source is not None, cc
    p = loader.plan("rq_spline", 75, fatbin_dir=tmp_path)
    assert p.kind == "nvrtc" and "no code for sm_75" in p.reason
    monkeypatch.setenv("FASTFLOW_CUDA_FATBIN", "0")
    assert loader.plan("rq_spline", 90, fatbin_dir=tmp_path).kind == "nvrtc"


def test_plan_rejects_stale_and_sass_only_mismatch(tmp_path):
    _fake_fatbin(tmp_path, "rq_spline", "0" * 16, [80, 90], 90)  # built from other sources
    p = loader.plan("rq_spline", 90, fatbin_dir=tmp_path)
    assert p.kind == "nvrtc" and "stale" in p.reason
    src = loader.find_source_dir("rq_spline")
    digest = loader.source_digest(loader.source_text("rq_spline", src))
    _fake_fatbin(tmp_path, "rq_spline", digest, [90], None)  # SASS only: no sm_100 code
    assert loader.plan("rq_spline", 100, fatbin_dir=tmp_path).kind == "nvrtc"
    assert loader.plan("rq_spline", 90, fatbin_dir=tmp_path).kind == "fatbin"


def test_plan_without_sources(tmp_path):
    nowhere = [tmp_path / "no-csrc"]
    with pytest.raises(FileNotFoundError, match="no kernels for 'rq_spline'"):
        loader.plan("rq_spline", 90, fatbin_dir=tmp_path, source_dirs=nowhere)
    fb = _fake_fatbin(tmp_path, "rq_spline", "f" * 16, [90], 90)  # an installed fatbin, sources gone
    p = loader.plan("rq_spline", 90, fatbin_dir=tmp_path, source_dirs=nowhere)
    assert p.kind == "fatbin" and p.path == fb and p.source is None


@pytest.mark.skipif(HAS_CUDA, reason="checks how the backend declines without a GPU; this machine has one")
def test_cuda_backend_declines_without_gpu():
    x, uw, uh, ud = torch.randn(10), torch.randn(10, 4), torch.randn(10, 4), torch.randn(10, 3)
    with pytest.raises(BackendUnavailableError, match="forced backend 'cuda' cannot run: no CUDA device"):
        rq_spline(x, uw, uh, ud, backend="cuda")
    from fastflow.backends import BACKENDS, resolve_backend

    assert "rq_spline" in BACKENDS["cuda"].ops
    assert resolve_backend("rq_spline", x) != "cuda"


# ------------------------------------------------------------------ on a GPU


def _spline_inputs(n, k, dtype, device="cuda", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 1.1
    uw, uh, ud = torch.randn(n, k, generator=g) * 1.5, torch.randn(n, k, generator=g) * 1.5, \
        torch.randn(n, k - 1, generator=g) * 1.5
    return [t.to(device=device, dtype=dtype) for t in (x, uw, uh, ud)]


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("k", [2, 8, 64, 257])
def test_cuda_matches_triton(dtype, inverse, k):
    n = 2**14 + 17
    x, uw, uh, ud = _spline_inputs(n, k, dtype)
    if inverse:
        x = rq_spline(x.float(), uw.float(), uh.float(), ud.float(), backend="triton")[0].to(dtype)
    leaves = {}
    res = {}
    for backend in ("cuda", "triton"):
        leaves[backend] = [t.clone().requires_grad_(True) for t in (x, uw, uh, ud)]
        out, lad = rq_spline(*leaves[backend], inverse=inverse, backend=backend)
        g = torch.autograd.grad((out, lad), leaves[backend], (torch.ones_like(out), torch.ones_like(lad)))
        res[backend] = (out, lad, *g)
    # Both compute in float32 from the same inputs: they differ by float32 round-off (summation
    # order of the knots), magnified on steep bins of the inverse.
    tol = {torch.float32: 2e-3 if inverse else 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for name, a, b in zip(("out", "lad", "gx", "guw", "guh", "gud"), res["cuda"], res["triton"]):
        assert a.dtype == dtype
        scale = b.float().abs().max().clamp_min(1.0)
        torch.testing.assert_close(a.float() / scale, b.float() / scale, rtol=tol, atol=tol, msg=name)


@needs_gpu
@pytest.mark.gpu
def test_cuda_nvrtc_and_fatbin_paths(monkeypatch):
    # Whatever the plan, the module loads and runs; forcing NVRTC gives the same numbers.
    x, uw, uh, ud = _spline_inputs(1000, 8, torch.float32)
    a = rq_spline(x, uw, uh, ud, backend="cuda")
    loader._modules.clear()
    loader._functions.clear()
    monkeypatch.setenv("FASTFLOW_CUDA_FATBIN", "0")
    b = rq_spline(x, uw, uh, ud, backend="cuda")
    loader._modules.clear()
    loader._functions.clear()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_gpu
@pytest.mark.gpu
def test_cuda_runs_on_the_current_stream():
    x, uw, uh, ud = _spline_inputs(2**16, 8, torch.float32)
    ref = rq_spline(x, uw, uh, ud, backend="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        got = rq_spline(x, uw, uh, ud, backend="cuda")
    s.synchronize()
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("scale", ["exp", "softclamp", "sigmoid"])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("f", [6, 4099])  # a warp per row, and a block per row
def test_cuda_affine_coupling_matches_reference(scale, inverse, f):
    from fastflow.ops.coupling import affine_coupling

    full = torch.randn(33, 2 * f, device="cuda")
    x, h = full[:, :f], full[:, f:]  # strided halves
    t = torch.randn(33, f, device="cuda")
    leaves = {b: [v.clone().requires_grad_(True) for v in (x, t, h)] for b in ("cuda", "reference")}
    res = {}
    for backend, (xl, tl, hl) in leaves.items():
        out, lad = affine_coupling(xl, tl, hl, scale=scale, inverse=inverse, backend=backend)
        g = torch.autograd.grad((out.sum() + lad.sum()), (xl, tl, hl))
        res[backend] = (out, lad, *g)
    for name, a, b in zip(("out", "lad", "gx", "gt", "gh"), res["cuda"], res["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(b.abs().max())), msg=name)
