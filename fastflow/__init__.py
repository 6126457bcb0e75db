"""fastflow: compiled-kernel normalizing flows for PyTorch."""

__version__ = "0.1.0"

from fastflow.backends import BackendUnavailableError, UnknownBackendError, backend_status  # noqa: E402
from fastflow.ops import (  # noqa: E402
    HigherOrderError,
    actnorm_conv1x1,
    additive_coupling,
    affine_coupling,
    lu_conv1x1,
    lu_linear,
    rescale,
    rq_spline,
)
from fastflow.flows import CompiledFlow, Flow, build, compile  # noqa: E402

__all__ = [
    "__version__",
    "BackendUnavailableError",
    "UnknownBackendError",
    "HigherOrderError",
    "backend_status",
    "rq_spline",
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
