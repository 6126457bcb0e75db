"""Finding, loading and launching the CUDA C++ kernels of ``csrc/``.

Where the kernels come from, per op and per device architecture (compute capability ``cc``):

1. An ahead-of-time **fatbin** shipped in this folder (``setup.py`` builds it when
   ``FASTFLOW_CUDA_ARCHS`` is set), named ``<op>.<digest>.<archs>[.ptx<arch>].fatbin``, e.g.
   ``rq_spline.0123456789abcdef.80-90.ptx90.fatbin``: the name says which SASS architectures it
   holds, which PTX (if any) the driver can JIT for newer GPUs, and the digest of the source it
   was built from. It is used when it runs on the device (SASS of the same major and a minor
   <= the device's, or PTX of an arch <= the device's) and, when the sources are at hand, when
   its digest matches them -- so an edited checkout never runs a stale binary. Set
   ``FASTFLOW_CUDA_FATBIN=0`` to ignore fatbins.
2. Otherwise the **source**, compiled at run time by NVRTC through ``cupy.RawModule``. CuPy
   caches the binary on disk (``~/.cupy/kernel_cache`` or ``CUPY_CACHE_DIR``) keyed on the
   source text, options, NVRTC version and device arch, so each arch compiles once. Local
   ``#include "..."`` lines are pasted in first, so that the key covers the shared header.

Sources are looked for inside the installed package (``fastflow/csrc``, where a wheel ships
them) and then in the repository checkout (``<repo>/csrc``, which is what an editable install
sees). Launches go onto PyTorch's current stream of the tensors' device, with raw
``data_ptr()`` pointers: no copies, no CuPy arrays.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "BLOCK",
    "Fatbin",
    "Plan",
    "find_fatbins",
    "find_source_dir",
    "fatbin_name",
    "launch",
    "plan",
    "source_digest",
    "source_text",
]

BLOCK = 256  # threads per block; FF_BLOCK in csrc/fastflow.cuh (the kernels' __launch_bounds__)
_MAX_GRID = 2**31 - 1  # the kernels loop grid-stride, so a capped grid still covers every element

HEADER = "fastflow.cuh"
_PKG_DIR = Path(__file__).resolve().parent  # fastflow/kernels/cuda
_PACKAGE = _PKG_DIR.parents[1]  # fastflow/
SOURCE_DIRS = (_PACKAGE / "csrc", _PACKAGE.parent / "csrc")
FATBIN_DIR = _PKG_DIR

# NVRTC options; CuPy adds the target arch and -ftz=true (setup.py's nvcc build passes -ftz=true
# too, so the two paths compute the same arithmetic). No fast-math: expf/logf/division stay
# IEEE-accurate as in the Triton kernels.
NVRTC_OPTIONS = ("-std=c++17",)

_DTYPE_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

_FATBIN_RE = re.compile(
    r"^(?P<op>[a-z0-9_]+)\.(?P<digest>[0-9a-f]{16})\.(?P<archs>[0-9]+(?:-[0-9]+)*)(?:\.ptx(?P<ptx>[0-9]+))?\.fatbin$"
)
_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def find_source_dir(op: str, dirs=None) -> Path | None:
    """The first of ``dirs`` (default: package, then checkout) holding ``<op>.cu`` and the header."""
    for d in SOURCE_DIRS if dirs is None else dirs:
        d = Path(d)
        if (d / f"{op}.cu").is_file() and (d / HEADER).is_file():
            return d
    return None


def source_text(op: str, directory: Path) -> str:
    """``<op>.cu`` with its local ``#include "..."`` files pasted in (each once)."""
    directory = Path(directory)
    seen: set[str] = set()

    def expand(name: str) -> str:
        text = (directory / name).read_text()

        def sub(m: re.Match) -> str:
            inc = m.group(1)
            if inc in seen:
                return f"// {inc}: already included"
            seen.add(inc)
            if not (directory / inc).is_file():
                raise FileNotFoundError(f"{directory / name} includes {inc!r}, not found in {directory}")
            return f"// ---- begin {inc}\n{expand(inc)}\n// ---- end {inc}"

        return _INCLUDE_RE.sub(sub, text)

    return expand(f"{op}.cu")


def source_digest(text: str) -> str:
    """16 hex digits identifying a source text (its sha256 prefix): the digest in fatbin names."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Fatbins
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fatbin:
    """An ahead-of-time fatbin of one op: its SASS archs and optional PTX arch (``cc`` as 80, 90...)."""

    path: Path
    op: str
    digest: str
    archs: tuple[int, ...]
    ptx: int | None

    def runs_on(self, cc: int) -> bool:
        """Whether the driver can run this fatbin on a device of compute capability ``cc``.

        SASS runs on devices of its major version with an equal or higher minor; PTX is JIT-compiled
        by the driver for any device of an equal or higher arch.
        """
        major, minor = divmod(cc, 10)
        if any(a // 10 == major and a % 10 <= minor for a in self.archs):
            return True
        return self.ptx is not None and self.ptx <= cc

    def has_sass_for(self, cc: int) -> bool:
        major, minor = divmod(cc, 10)
        return any(a // 10 == major and a % 10 <= minor for a in self.archs)


def fatbin_name(op: str, digest: str, archs, ptx: int | None) -> str:
    """The file name setup.py gives a fatbin (and :func:`find_fatbins` parses)."""
    name = f"{op}.{digest}.{'-'.join(str(a) for a in sorted(set(int(a) for a in archs)))}"
    if ptx is not None:
        name += f".ptx{int(ptx)}"
    return name + ".fatbin"


def find_fatbins(op: str, directory: Path | None = None) -> list[Fatbin]:
    """The fatbins of ``op`` in ``directory`` (default: this package folder)."""
    directory = Path(FATBIN_DIR if directory is None else directory)
    found = []
    if directory.is_dir():
        for p in sorted(directory.glob(f"{op}.*.fatbin")):
            m = _FATBIN_RE.match(p.name)
            if m and m.group("op") == op:
                archs = tuple(int(a) for a in m.group("archs").split("-"))
                ptx = int(m.group("ptx")) if m.group("ptx") else None
                found.append(Fatbin(p, op, m.group("digest"), archs, ptx))
    return found


def _fatbins_enabled() -> bool:
    return os.environ.get("FASTFLOW_CUDA_FATBIN", "1").strip().lower() not in ("0", "false", "no", "off")


@dataclass(frozen=True)
class Plan:
    """How :func:`module` gets ``op``'s kernels for one arch: ``kind`` is "fatbin" or "nvrtc"."""

    kind: str
    op: str
    cc: int
    path: Path | None = None  # the fatbin
    source: str | None = None  # the source text (also present for a fatbin plan, as a fallback)
    reason: str = ""  # why this plan (for messages and `fastflow info`)


def plan(op: str, cc: int, *, fatbin_dir: Path | None = None, source_dirs=None) -> Plan:
    """Decide where ``op``'s kernels for a device of compute capability ``cc`` come from.

    Raises:
        FileNotFoundError: neither a usable fatbin nor the sources were found.
    """
    src_dir = find_source_dir(op, source_dirs)
    text = source_text(op, src_dir) if src_dir is not None else None
    digest = source_digest(text) if text is not None else None
    notes = []
    if _fatbins_enabled():
        fatbins = find_fatbins(op, fatbin_dir)
        usable = []
        for fb in fatbins:
            if digest is not None and fb.digest != digest:
                notes.append(f"{fb.path.name} was built from other sources than {src_dir} (stale)")
            elif not fb.runs_on(cc):
                notes.append(f"{fb.path.name} holds no code for sm_{cc}")
            else:
                usable.append(fb)
        if usable:
            # Prefer native SASS over PTX the driver would have to JIT.
            best = sorted(usable, key=lambda fb: not fb.has_sass_for(cc))[0]
            return Plan("fatbin", op, cc, path=best.path, source=text, reason=f"ahead-of-time {best.path.name}")
    else:
        notes.append("fatbins disabled by FASTFLOW_CUDA_FATBIN=0")
    if text is not None:
        why = "; ".join(notes) if notes else "no ahead-of-time fatbin"
        return Plan("nvrtc", op, cc, source=text, reason=f"NVRTC from {src_dir / (op + '.cu')} ({why})")
    where = ", ".join(str(d) for d in (SOURCE_DIRS if source_dirs is None else source_dirs))
    raise FileNotFoundError(
        f"fastflow cuda backend: no kernels for {op!r} on sm_{cc}: no usable fatbin in "
        f"{fatbin_dir or FATBIN_DIR}{' (' + '; '.join(notes) + ')' if notes else ''} and no sources "
        f"({op}.cu + {HEADER}) in {where}"
    )


# --------------------------------------------------------------------------------------------
# Modules and launches (need CuPy and a GPU)
# --------------------------------------------------------------------------------------------

_lock = threading.Lock()
_modules: dict[tuple[str, int], object] = {}
_functions: dict[tuple[str, int, str], object] = {}


def _cc(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


def module(op: str, device_index: int):
    """The ``cupy.RawModule`` of ``op`` for the architecture of CUDA device ``device_index``."""
    import cupy

    cc = _cc(device_index)
    key = (op, cc)
    with _lock:
        mod = _modules.get(key)
        if mod is not None:
            return mod
        p = plan(op, cc)
        mod = None
        with cupy.cuda.Device(device_index):
            if p.kind == "fatbin":
                try:
                    mod = cupy.RawModule(path=str(p.path))
                    mod.compile()  # load now, so that a driver refusing it shows here
                except Exception as exc:
                    if p.source is None:
                        raise RuntimeError(f"fastflow cuda backend: cannot load {p.path}: {exc}") from exc
                    warnings.warn(
                        f"fastflow: cannot load {p.path.name} ({type(exc).__name__}: {exc}); "
                        f"compiling {op}.cu with NVRTC instead",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    mod = None
            if mod is None:
                mod = cupy.RawModule(code=p.source, options=NVRTC_OPTIONS)
                mod.compile()  # compile (or fetch from CuPy's disk cache) now, errors included
        _modules[key] = mod
        return mod


def function(op: str, name: str, device_index: int):
    """Kernel ``name`` of ``op``'s module, for device ``device_index`` (cached)."""
    key = (op, _cc(device_index), name)
    fn = _functions.get(key)
    if fn is None:
        fn = module(op, device_index).get_function(name)
        _functions[key] = fn
    return fn


def dtype_suffix(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_SUFFIX[dtype]
    except KeyError:
        raise TypeError(f"fastflow cuda kernels take float32/float16/bfloat16, got {dtype}") from None


class _StreamHandle:
    """A CUDA stream protocol shim, so that CuPy can wrap PyTorch's stream by its handle."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


@functools.lru_cache(maxsize=64)
def _cupy_stream(device_index: int, ptr: int):
    import cupy

    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:  # CuPy >= 14
        return from_external(_StreamHandle(ptr))
    return cupy.cuda.ExternalStream(ptr, device_index)


def ptr(t: torch.Tensor) -> np.uint64:
    """A tensor's device address as a kernel pointer argument."""
    return np.uint64(t.data_ptr())


def launch(op: str, name: str, device: torch.device, n: int, args: tuple, grid: int | None = None) -> None:
    """Launch kernel ``name`` of ``op`` on PyTorch's current stream of ``device``.

    ``grid`` defaults to one thread per element of ``n`` (capped; the kernels are grid-stride).
    ``args`` must already be typed: :func:`ptr` for pointers, ``np.int64``/``np.float32``/
    ``np.int32`` for scalars, matching the extern "C" signature.
    """
    if device.type != "cuda":
        raise ValueError(f"fastflow cuda kernel {name}: tensors must be on a CUDA device, got {device}")
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    if grid is None:
        grid = (n + BLOCK - 1) // BLOCK
    grid = max(1, min(int(grid), _MAX_GRID))
    fn = function(op, name, index)
    stream = _cupy_stream(index, torch.cuda.current_stream(index).cuda_stream)
    with cupy.cuda.Device(index), stream:
        fn((grid,), (BLOCK,), args)
