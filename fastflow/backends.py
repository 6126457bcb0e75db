"""Backend registry: which kernel family runs an op, and why the others decline.

Five backends, tried in this order when ``backend=None``:

- ``triton``: fused GPU kernels for CUDA tensors (and CPU tensors when ``TRITON_INTERPRET=1``,
  which is how they are tested without a GPU); float32/float16/bfloat16, computed in float32, and
  float64 computed in float64 for the spline and coupling ops.
- ``cuda``: hand-written CUDA C++ kernels from ``csrc/``, loaded through CuPy.
- ``numba``: fused parallel CPU kernels; float32/float64, computed in float64.
- ``torch``: the LU maps' tuned plain-PyTorch launchers (any device and dtype).
- ``reference``: pure torch, any device and floating dtype; the oracle and the last resort.

``backend="name"`` (or the ``FASTFLOW_BACKEND`` environment variable) forces one and raises
:class:`BackendUnavailableError` with the reason when it cannot run the op on those tensors.

Routes (``ROUTES``) send some ``backend=None`` calls past the order to :data:`COMPOSITE`: the
op's maths as plain differentiable torch ops in the inputs' dtype, called outside the custom op
(the coupling laws at small or nothing-to-fuse sizes, where a kernel launch costs more than
fusing saves).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from fastflow.kernels._facts import FLOATS as _F
from fastflow.kernels._facts import Backend, interpreting

__all__ = [
    "BACKENDS",
    "ROUTES",
    "SMALL_CPU_ELEMS",
    "routed_backend",
    "BackendUnavailableError",
    "UnknownBackendError",
    "backend_status",
    "check_backend_name",
    "add_backend",
    "resolve_backend",
    "get_kernel",
]

ENV_VAR = "FASTFLOW_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run the requested op on the given tensors."""


class UnknownBackendError(ValueError):
    """A backend name (argument or ``FASTFLOW_BACKEND``) that is not a fastflow backend."""


def _declared(package: str) -> Backend:
    """The ``BACKEND`` a kernel package declares (its own facts), bound to that package."""
    backend = importlib.import_module(package).BACKEND
    if not isinstance(backend, Backend):
        raise TypeError(f"{package}.BACKEND is a {type(backend).__name__}, not a fastflow Backend")
    if backend.kernels_package != package:
        backend = dataclasses.replace(backend, package=package)
    return backend


# The registry, in the default order (backend=None tries them first to last): one entry per
# backend, its folder under fastflow/kernels/; everything else about a backend is its own
# declaration there. triton before cuda on a GPU: the resource/roofline model (``fastflow bench
# gpu-model``, benchmarks/results/gpu-model_*.json, "model_gpu_backend_order") predicts the spline
# kernels of both memory-bound at float32 K=8 (no spills, >= 50% occupancy), so neither is
# predicted >10% faster and triton, which also takes float64, leads; a device run may overturn it.
_ORDER = ("triton", "cuda", "numba", "torch", "reference")
BACKENDS: dict[str, Backend] = {name: _declared(f"fastflow.kernels.{name}") for name in _ORDER}


def add_backend(package: str, *, before: str | None = None) -> Backend:
    """Register the backend that ``package`` declares (``package.BACKEND``, kernel modules in
    ``package``): a backend outside fastflow (a plugin, a test) in one line. It goes into the
    default order before ``before`` (None: last) and runs every op its ``ops`` name."""
    global _ORDER
    backend = _declared(package)
    if backend.name in BACKENDS:
        raise ValueError(f"add_backend: a backend named {backend.name!r} is registered already")
    order = list(_ORDER)
    order.insert(order.index(before) if before is not None else len(order), backend.name)
    BACKENDS[backend.name] = backend
    _ORDER = tuple(order)
    _RESOLVED.clear()
    return backend


# --------------------------------------------------------------------------------------------
# Routes: size rules that send a call elsewhere than the default order when backend=None (and
# FASTFLOW_BACKEND is unset), for eager CPU float32/float64 inputs. Half precision keeps the
# fused op's float32 compute; empty inputs keep the op's defined empty results.
# --------------------------------------------------------------------------------------------

# Below this many elements, calling a fused coupling kernel from Python (argument checks, strided
# views, the numba dispatcher) costs more than PyTorch's own elementwise ops save by not being
# fused; the crossover is measured by `fastflow bench coupling --sizes 128,512,2048,8192`.
SMALL_CPU_ELEMS = 131072

#: What a route sends a call to: not a backend but the op's composite (its maths in plain torch
#: ops, in the inputs' dtype), called outside the custom op and differentiated by autograd.
COMPOSITE = "composite"


@dataclass(frozen=True)
class Route:
    """``backend=None`` sends ``op`` to ``backend`` (:data:`COMPOSITE`) for eager CPU
    float32/float64 inputs with at most ``max_elements()`` elements (None: any size), for
    ``reason``."""

    op: str
    backend: str
    max_elements: Callable[[], int | None]
    reason: str

    def describe(self) -> str:
        n = self.max_elements()
        size = "at any size" if n is None else f"of at most {n} elements"
        return f"{self.op}: eager CPU float32/float64 inputs {size} run as plain torch ops ({self.reason})"


ROUTES: tuple[Route, ...] = (
    Route("affine_coupling", COMPOSITE, lambda: SMALL_CPU_ELEMS,
          "a kernel launch from Python costs more than fusing saves there"),
    Route("additive_coupling", COMPOSITE, lambda: None,
          "one elementwise pass with nothing to fuse: PyTorch's own kernel was faster at every size measured"),
    Route("rescale", COMPOSITE, lambda: None,
          "one elementwise pass with nothing to fuse: PyTorch's own kernel was faster at every size measured"),
)


def routed_backend(op: str, x: torch.Tensor, eager: Callable[[], bool]) -> str | None:
    """The backend a route sends this call to (``backend=None``), or None for the default order.
    ``eager()``: whether the caller's inputs are ordinary eager tensors (no compile, tracing or
    transforms); asked last, as it is the costliest test."""
    if os.environ.get(ENV_VAR) or not (x.is_cpu and x.dtype in _F):
        return None
    if torch.compiler.is_compiling():
        # Under torch.compile/export every route's plain torch ops are traced: inductor fuses
        # them with the model around them (no opaque kernel call), at any size, and no size test
        # puts a guard on the batch dimension
        return next((r.backend for r in ROUTES if r.op == op), None)
    if x.numel() == 0:
        return None
    for r in ROUTES:
        if r.op == op:
            n = r.max_elements()
            if eager() and (n is None or x.numel() <= n):
                return r.backend
            return None
    return None


def get_kernel(op: str, backend: str):
    """The kernel module of ``backend`` for ``op`` (imported on first call, so that ``import
    fastflow`` never compiles or imports numba/triton/cupy)."""
    return BACKENDS[backend].kernel(op)


def check_backend_name(backend, source: str = "the backend argument") -> str | None:
    """``backend`` normalised (stripped, lower case), or None; raises for anything that is not
    ``None`` or the name of a fastflow backend."""
    if backend is None:
        return None
    if not isinstance(backend, str):
        raise TypeError(f"backend must be None or one of {sorted(BACKENDS)} (a string), got "
                        f"{type(backend).__name__} {backend!r} (from {source})")
    name = backend.strip().lower()
    if name not in BACKENDS:
        raise UnknownBackendError(f"backend={backend!r} is not a fastflow backend; expected one of "
                                  f"{sorted(BACKENDS)} (from {source})")
    return name


def env_backend() -> str | None:
    """The backend ``FASTFLOW_BACKEND`` forces (None when unset or empty), checked."""
    return check_backend_name(os.environ.get(ENV_VAR) or None, ENV_VAR)


def _resolve(op: str, device: torch.device, dtype: torch.dtype, backend: str | None) -> str:
    if backend is not None:
        requested = check_backend_name(backend)
    else:
        requested = env_backend()
    if requested is not None:
        reason = BACKENDS[requested].decline_reason(op, device, dtype)
        if reason:
            raise BackendUnavailableError(f"{op}: forced backend {requested!r} cannot run: {reason}")
        return requested
    for name in _ORDER:
        b = BACKENDS[name]
        if (b.default_ops is None or op in b.default_ops) and b.decline_reason(op, device, dtype) is None:
            return name
    raise BackendUnavailableError(f"{op}: no backend can run on device {device} with dtype {dtype}")


@torch.compiler.assume_constant_result
def _resolve_constant(op: str, device_str: str, dtype_str: str, backend: str | None) -> str:
    # torch.compile evaluates this once while tracing and bakes the answer into the graph
    # (the device and dtype are static there), so backend choice never breaks the graph.
    return _resolve(op, torch.device(device_str), getattr(torch, dtype_str), backend)


def resolve_backend(op: str, tensor: torch.Tensor, backend: str | None = None, *,
                    parameterization: str | None = None, caller: str | None = None,
                    routed: Callable[[], bool] | None = None) -> str:
    """Name of the backend that runs ``op`` on tensors like ``tensor``.

    With ``routed`` (``routed() -> bool``: whether the caller's inputs are ordinary eager tensors)
    and ``backend=None``, a route may answer first: :data:`COMPOSITE` (see ``ROUTES``).

    With a spline ``parameterization``: the backend ``backend=None`` picks when it declares that
    prologue (``Backend.parameterizations``), else the reference (on any device); a forced
    backend (argument or ``FASTFLOW_BACKEND``) without it raises, naming ``caller``.

    Raises:
        BackendUnavailableError: a forced backend cannot run here (the message says why).
        ValueError: an unknown backend name.
    """
    if routed is not None and backend is None:
        name = routed_backend(op, tensor, routed)
        if name is not None:
            return name
    if torch.compiler.is_compiling():
        name = _resolve_constant(op, str(tensor.device), str(tensor.dtype).replace("torch.", ""), backend)
    else:
        # Resolution walks the order and runs probes (microseconds of Python per call); its
        # answer depends only on these, so a successful one is remembered. Errors are never cached.
        key = (op, tensor.device, tensor.dtype, backend, os.environ.get(ENV_VAR), os.environ.get("TRITON_INTERPRET"))
        try:
            name = _RESOLVED[key]
        except (KeyError, TypeError):  # TypeError: an unhashable backend argument, refused below
            name = _resolve(op, tensor.device, tensor.dtype, backend)
            if len(_RESOLVED) > 4096:
                _RESOLVED.clear()
            _RESOLVED[key] = name
    if parameterization is None or _has_parameterization(name, parameterization):
        return name
    having = [n for n in _ORDER if parameterization in BACKENDS[n].parameterizations]
    if not having:
        raise BackendUnavailableError(f"{caller or op}: no backend has kernels for the {parameterization!r} spline "
                                      "parameterization (a table row without a prologue)")
    if backend is not None or env_backend() is not None:
        raise BackendUnavailableError(
            f"{caller or op}: backend {name!r} has no kernels for the {parameterization!r} spline parameterization; "
            f"use backend=None or one of {having}")
    return "reference"


@torch.compiler.assume_constant_result
def _has_parameterization(backend: str, parameterization: str) -> bool:
    # a declared fact: constant while torch.compile traces (no graph break)
    return parameterization in BACKENDS[backend].parameterizations


_RESOLVED: dict = {}


def clear_resolution_cache() -> None:
    """Forget remembered resolutions (after a probe's answer may have changed, e.g. in tests)."""
    _RESOLVED.clear()


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception:
        return None


def backend_status() -> dict:
    """Everything ``fastflow info`` prints: versions, devices, and per backend/op availability."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    status = {
        "versions": {m: _version(m) for m in ("fastflow", "torch", "numpy", "numba", "triton", "cupy")},
        "devices": devices,
        "triton_interpret": interpreting(),
        "backends": {},
        "order": list(_ORDER),
        "routes": [r.describe() for r in ROUTES],
    }
    for name in _ORDER:
        b = BACKENDS[name]
        probe = b.probe()
        status["backends"][name] = {
            "description": b.description,
            "available": probe is None,
            "reason": probe,
            "devices": list(b.devices),
            "dtypes": [str(d).replace("torch.", "") for d in b.dtypes],
            "ops": sorted(b.ops),
            "notes": dict(sorted(b.notes.items())),
            "default_for": sorted(b.ops) if b.default_ops is None else sorted(b.default_ops),
        }
    return status
