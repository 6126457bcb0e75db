"""fastflow: compiled-kernel normalizing flows for PyTorch."""

__version__ = "0.1.0"

from fastflow.backends import BackendUnavailableError, UnknownBackendError, backend_status  # noqa: E402
from fastflow.ops import (  # noqa: E402
    HigherOrderError,
    actnorm_conv1x1,
    additive_coupling,
    affine_coupling,
    bernstein,
    sos_polynomial,
    lu_conv1x1,
    lu_linear,
    rescale,
    rq_spline,
    rq_spline_bounded,
    rq_spline_zuko,
)

# The models load on first use (``fastflow.build``...), so that ``import fastflow.ops`` -- all an
# exported program needs -- does not import the model classes.
_LAZY = {"Flow": "fastflow.flows", "build": "fastflow.flows", "compile": "fastflow.flows",
         "CompiledFlow": "fastflow.flows"}
_SUBPACKAGES = ("bench", "cli", "data", "flows", "integrations", "kernels", "nn", "testing")


def __getattr__(name):
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"fastflow.{name}")
    else:
        raise AttributeError(f"module 'fastflow' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBPACKAGES))

__all__ = [
    "__version__",
    "BackendUnavailableError",
    "UnknownBackendError",
    "HigherOrderError",
    "backend_status",
    "rq_spline",
    "rq_spline_bounded",
    "rq_spline_zuko",
    "bernstein",
    "sos_polynomial",
    "affine_coupling",
    "additive_coupling",
    "rescale",
    "lu_linear",
    "lu_conv1x1",
    "actnorm_conv1x1",
    "Flow",
    "CompiledFlow",
    "build",
    "compile",
]
