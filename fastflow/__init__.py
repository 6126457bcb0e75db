"""fastflow: compiled-kernel normalizing flows for PyTorch."""

__version__ = "0.1.0"

from fastflow.backends import BackendUnavailableError, backend_status  # noqa: E402
from fastflow.ops import rq_spline  # noqa: E402
from fastflow.flows import Flow, build  # noqa: E402

__all__ = ["BackendUnavailableError", "backend_status", "rq_spline", "__version__"]
__all__ += ["Flow", "build"]
