"""The functional API: fused flow operations returning ``(outputs, logabsdet)``.

Importing this package registers the ``fastflow::`` custom ops, which is all a program exported
with ``torch.export`` needs to run (:func:`load_exported`).
"""

from fastflow.ops import circular as _circular
from fastflow.ops import coupling as _coupling
from fastflow.ops import lu as _lu
from fastflow.ops import polynomial as _polynomial
from fastflow.ops import rq_spline as _rq_spline
from fastflow.ops._autocast import register_autocast as _register_autocast
from fastflow.ops._dispatch import FusedOp as _FusedOp
from fastflow.ops._dispatch import HigherOrderError
from fastflow.ops._export import load_exported
from fastflow.ops.circular import rq_spline_circular
from fastflow.ops.coupling import additive_coupling, affine_coupling, rescale
from fastflow.ops.lu import actnorm_conv1x1, lu_conv1x1, lu_linear
from fastflow.ops.polynomial import bernstein, sos_polynomial
from fastflow.ops.rq_spline import rq_spline, rq_spline_bounded, rq_spline_zuko

__all__ = ["additive_coupling", "affine_coupling", "rescale", "actnorm_conv1x1", "lu_conv1x1", "lu_linear", "rq_spline",
           "rq_spline_bounded", "rq_spline_zuko", "rq_spline_circular", "bernstein", "sos_polynomial",
           "HigherOrderError", "load_exported"]

# Inside torch.autocast every fastflow op computes in float32 (ops/_autocast.py), also when a
# graph (an exported program) calls the custom op directly.
for _module in (_coupling, _lu, _rq_spline, _polynomial, _circular):
    for _value in list(vars(_module).values()):
        if isinstance(_value, _FusedOp):
            _register_autocast(_value)
