"""``fastflow.integrations.glasflow``: glasflow's rational-quadratic splines on fastflow's fused op.

glasflow vendors nflows as ``glasflow.nflows`` (a fork: the same spline functions, masked
assignment through ``apply_spline_at_mask``), so ``fastflow.integrations.nflows`` does not reach
it. ``accelerate()`` replaces ``unconstrained_rational_quadratic_spline`` (linear tails) by
:func:`fastflow.ops.rq_spline` and ``rational_quadratic_spline`` (``tails=None``, e.g.
``CouplingNSF(distribution="uniform")``: K+1 slopes on a box) by
:func:`fastflow.ops.rq_spline.rq_spline_bounded` in every ``glasflow.nflows`` module that holds
them (``glasflow.nflows.transforms.splines``, ``.splines.rational_quadratic``,
``.autoregressive``), so glasflow's ``CouplingNSF``, ``MaskedPiecewiseRationalQuadraticAutoregressiveFlow``
and every ``glasflow.nflows`` spline transform use it, in models built before or after the call.
Everything else (``RealNVP``'s affine and additive couplings, the other autoregressive flows)
is glasflow's own code, unchanged; so is any call the fused op declines (see
``fastflow.integrations.nflows``), and the bounded spline raises glasflow's
``InputOutsideDomain`` where glasflow does.

With ``GLASFLOW_USE_NFLOWS=true`` glasflow imports the installed nflows in place of its fork
(``glasflow.nflows`` *is* ``nflows``): ``accelerate()`` then holds a share of
``fastflow.integrations.nflows``' patch instead (nflows 0.14), released with this handle.

Tested with glasflow 0.4.x (both modes).
"""

from __future__ import annotations

import sys

from fastflow.integrations._patch import Integration
from fastflow.integrations._splines import module_targets

__all__ = ["accelerate", "restore", "is_accelerated", "uses_nflows", "TESTED"]

TESTED = "glasflow 0.4.x"
_MODULES = ("glasflow.nflows.transforms.splines.rational_quadratic", "glasflow.nflows.transforms.splines",
            "glasflow.nflows.transforms.autoregressive")


def _tested(version: str) -> bool:
    return version.split(".")[:2] == ["0", "4"]


def uses_nflows() -> bool:
    """Whether glasflow runs on the installed nflows (``GLASFLOW_USE_NFLOWS``) rather than its
    vendored fork (imports glasflow)."""
    import glasflow

    return bool(getattr(glasflow, "USE_NFLOWS", False)) or sys.modules.get("glasflow.nflows") is sys.modules.get(
        "nflows", False)


def _targets():
    if uses_nflows():
        return []  # glasflow.nflows is nflows: the nflows integration (a delegate) patches it
    from glasflow.nflows.transforms.base import InputOutsideDomain
    from glasflow.nflows.transforms.splines import rational_quadratic as rq

    return module_targets(rq, _MODULES, INTEGRATION, InputOutsideDomain)


def _delegates():
    if not uses_nflows():
        return []
    from fastflow.integrations import nflows

    return [nflows.INTEGRATION]


INTEGRATION = Integration("glasflow", "glasflow", _tested, TESTED, _targets,
                          required=("nflows",), optional=("nflows_bounded",), delegates=_delegates)


accelerate, restore, is_accelerated = INTEGRATION.public_functions(
    __name__, "Route glasflow's rational-quadratic splines to fastflow's fused spline op.")
