"""``fastflow.integrations.sbi``: every sbi density estimator on fastflow's fused ops where it has one.

sbi builds its flow density estimators from nflows (``nsf``, ``maf_rqs``, ``maf``, ``made``)
and zuko (``zuko_*``); ``mdn`` is its own. ``accelerate()`` is one call holding a share of both peer
integrations, :mod:`fastflow.integrations.nflows` and :mod:`fastflow.integrations.zuko`,
released together by the handle's ``close()`` (or the end of a ``with`` block, or
``restore()``): estimators built before or after the call use the fused ops where their law has
one, and are sbi's own code, unchanged, everywhere else. :data:`ESTIMATORS` says which estimator
gets which fused op (the docs' table is checked against it).

Tested with sbi 0.27.x (on nflows 0.14 and zuko 1.6.x).
"""

from __future__ import annotations

from typing import NamedTuple

from fastflow.integrations._patch import Integration

__all__ = ["accelerate", "restore", "is_accelerated", "ESTIMATORS", "Estimator", "law_table", "TESTED"]

TESTED = "sbi 0.27.x"


class Estimator(NamedTuple):
    """One sbi density estimator: the peer that builds it, its transform, the fastflow op its
    law runs on when accelerated (None: the peer's own code) and why."""

    peer: str
    transform: str
    op: str | None
    note: str


#: ``density_estimator=`` name -> what ``accelerate()`` does to it.
ESTIMATORS: dict[str, Estimator] = {
    "nsf": Estimator("nflows", "PiecewiseRationalQuadraticCouplingTransform (linear tails)", "rq_spline",
                     "the spline; the residual conditioner and LULinear stay nflows' own"),
    "maf_rqs": Estimator("nflows", "MaskedPiecewiseRationalQuadraticAutoregressiveTransform (linear tails)",
                         "rq_spline", "the spline; MADE stays nflows' own"),
    "maf": Estimator("nflows", "MaskedAffineAutoregressiveTransform", None, "affine law"),
    "made": Estimator("nflows", "MixtureOfGaussiansMADE", None, "a Gaussian mixture (not a flow)"),
    "mdn": Estimator("sbi", "MixtureDensityEstimator", None, "a Gaussian mixture (not a flow)"),
    "zuko_nsf": Estimator("zuko", "MonotonicRQSTransform", "rq_spline_zuko",
                          "the spline, and its knots computed only if read"),
    "zuko_ncsf": Estimator("zuko", "CircularShiftTransform + MonotonicRQSTransform", "rq_spline_zuko",
                           "the spline, and its knots computed only if read; the circular shift stays zuko's own"),
    "zuko_maf": Estimator("zuko", "MonotonicAffineTransform", None, "affine law"),
    "zuko_nice": Estimator("zuko", "MonotonicAffineTransform (coupling)", None, "affine law"),
    "zuko_sospf": Estimator("zuko", "SOSPolynomialTransform", "sos_polynomial",
                            "the law (forward, log-det and inverse); the soft clip stays zuko's own"),
    "zuko_bpf": Estimator("zuko", "BoundedBernsteinTransform", "bernstein", "the law (forward, log-det and inverse)"),
    "zuko_naf": Estimator("zuko", "MonotonicTransform (MNN, bisection inverse)", None, "neural law"),
    "zuko_unaf": Estimator("zuko", "UnconstrainedMonotonicTransform (UMNN, integrated)", None, "neural law"),
    "zuko_gf": Estimator("zuko", "GaussianizationTransform", None, "Gaussianization law"),
}


def law_table() -> str:
    """:data:`ESTIMATORS` as the markdown table of the docs (``docs/content/integrations.md``)."""
    lines = ["| estimator | peer | transform | when accelerated |", "|---|---|---|---|"]
    for name, e in ESTIMATORS.items():
        cell = f"`{e.op}`: {e.note}" if e.op else f"not accelerated: {e.note}, no fused law yet (the peer's own code)"
        lines.append(f"| `{name}` | {e.peer} | {e.transform} | {cell} |")
    return "\n".join(lines)


def _tested(version: str) -> bool:
    return version.split(".")[:2] == ["0", "27"]


def _delegates():
    from fastflow.integrations import nflows, zuko

    return [nflows.INTEGRATION, zuko.INTEGRATION]


INTEGRATION = Integration("sbi", "sbi", _tested, TESTED, list, required=("nflows", "zuko"),
                          optional=("nflows_bounded",), delegates=_delegates)


accelerate, restore, is_accelerated = INTEGRATION.public_functions(
    __name__, "Accelerate every sbi density estimator that has a fused law (see :data:`ESTIMATORS`): one handle "
              "holding the nflows and zuko integrations.",
    force_more="; the nflows and zuko integrations then also patch untested versions of theirs",
    closes="turns both off",
    restore_doc="Turn this integration off now, releasing the nflows and zuko shares its handles hold (handles "
                "opened on ``fastflow.integrations.nflows``/``.zuko`` directly stay open).")
