"""The functional API: fused flow operations returning ``(outputs, logabsdet)``."""

from fastflow.ops._dispatch import HigherOrderError
from fastflow.ops.coupling import additive_coupling, affine_coupling, rescale
from fastflow.ops.lu import actnorm_conv1x1, lu_conv1x1, lu_linear
from fastflow.ops.rq_spline import rq_spline

__all__ = ["additive_coupling", "affine_coupling", "rescale", "actnorm_conv1x1", "lu_conv1x1", "lu_linear", "rq_spline",
           "HigherOrderError"]
