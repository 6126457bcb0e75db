"""``fastflow.integrations.nflows``: nflows' rational-quadratic splines on fastflow's fused op.

``accelerate()`` replaces ``unconstrained_rational_quadratic_spline`` (linear tails: every NSF
transform with ``tails="linear"``) by :func:`fastflow.ops.rq_spline` and
``rational_quadratic_spline`` (``tails=None``: K+1 slopes on ``[left, right] x [bottom, top]``) by
:func:`fastflow.ops.rq_spline.rq_spline_bounded`, in every nflows module that holds them
(``nflows.transforms.splines``, ``.splines.rational_quadratic``, ``.autoregressive``), so
``PiecewiseRationalQuadraticCouplingTransform``, ``MaskedPiecewiseRationalQuadraticAutoregressiveTransform``
and ``PiecewiseRationalQuadraticCDF`` use it, in models built before or after the call. Other
arguments (other tails, tensor bounds, half precision) and anything the fused op declines (more
than 1024 bins, a minimum bin size too large for the bins: nflows then raises its own error) run
nflows' own code, as do bounded splines under a forced backend without their kernels
(``cuda``); the bounded spline still raises nflows' ``InputOutsideDomain`` where nflows does.
Unlike nflows, sampling never raises the negative-discriminant ``AssertionError`` (a
rounding-negative discriminant is 0).

Tested with nflows 0.14.
"""

from __future__ import annotations

from fastflow.integrations._patch import Integration
from fastflow.integrations._splines import module_targets

__all__ = ["accelerate", "restore", "is_accelerated", "TESTED"]

TESTED = "nflows 0.14"
_MODULES = ("nflows.transforms.splines.rational_quadratic", "nflows.transforms.splines",
            "nflows.transforms.autoregressive")


def _tested(version: str) -> bool:
    return version == "0.14" or version.startswith("0.14.")


def _targets():
    from nflows.transforms.base import InputOutsideDomain
    from nflows.transforms.splines import rational_quadratic as rq

    return module_targets(rq, _MODULES, INTEGRATION, InputOutsideDomain)


INTEGRATION = Integration("nflows", "nflows", _tested, TESTED, _targets,
                          required=("nflows",), optional=("nflows_bounded",))


accelerate, restore, is_accelerated = INTEGRATION.public_functions(
    __name__, "Route nflows' rational-quadratic splines to fastflow's fused spline op.")
