"""The functional API: fused flow operations returning ``(outputs, logabsdet)``."""

from fastflow.ops.rq_spline import rq_spline

__all__ = ["rq_spline"]
