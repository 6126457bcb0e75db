"""``fastflow.integrations.normflows``: normflows' rational-quadratic splines on fastflow.

``accelerate()`` replaces ``normflows.utils.splines.unconstrained_rational_quadratic_spline``
(``tails="linear"`` with a scalar ``tail_bound``) by :func:`fastflow.ops.rq_spline` and
``rational_quadratic_spline`` (``tails=None``, scalar box) by
:func:`fastflow.ops.rq_spline.rq_spline_bounded`; normflows' NSF layers
(``CoupledRationalQuadraticSpline``, ``AutoregressiveRationalQuadraticSpline`` and their
wrappers) look them up there at call time, so models built before or after the call use them.
Circular tails and per-feature tail lists keep normflows' own wrapper, whose inner bounded
spline then runs on fastflow; tensor bounds, half precision and anything the fused op declines
(more than 1024 bins, a minimum bin size too large for the bins: normflows then raises its own
error) run normflows' own code.

Tested with normflows 1.7.x.
"""

from __future__ import annotations

from fastflow.integrations._patch import Integration
from fastflow.integrations._splines import make_bounded, make_unconstrained

__all__ = ["accelerate", "restore", "is_accelerated", "TESTED"]

TESTED = "normflows 1.7.x"


def _tested(version: str) -> bool:
    return version.split(".")[:2] == ["1", "7"]


def _targets():
    from normflows.utils import splines

    return [
        (splines, "unconstrained_rational_quadratic_spline",
         make_unconstrained(splines.unconstrained_rational_quadratic_spline, INTEGRATION)),
        (splines, "rational_quadratic_spline", make_bounded(splines.rational_quadratic_spline, INTEGRATION)),
    ]


INTEGRATION = Integration("normflows", "normflows", _tested, TESTED, _targets,
                          required=("nflows",), optional=("nflows_bounded",))


accelerate, restore, is_accelerated = INTEGRATION.public_functions(
    __name__, "Route normflows' rational-quadratic splines to fastflow's fused spline op.")
