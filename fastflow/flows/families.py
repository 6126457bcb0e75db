"""Builders of the residual, continuous, planar and radial families, registered in ``build()``:
``"resflow"``, ``"cnf"``, ``"planar"``, ``"radial"`` (vector models; image shapes are flattened).

- ``resflow``: Residual Flow (Chen et al., 2019) / i-ResNet (Behrmann et al., 2019): ActNorm and
  a :class:`~fastflow.nn.residual.ResidualBlock` per layer. In training mode the log-det is the
  unbiased Russian-roulette estimate (the loss is then an unbiased estimate of the NLL); in
  eval mode it is exact for ``D <= 64`` and a 20-term power series beyond.
- ``cnf``: FFJORD (Grathwohl et al., 2019): one :class:`~fastflow.nn.continuous.CNF`; trains by
  maximum likelihood through the ODE (Hutchinson trace) or by flow matching
  (:meth:`~fastflow.flows.continuous.ContinuousFlow.flow_matching_loss`); eval log-densities use
  the exact trace for ``D <= 64``.
- ``planar`` / ``radial`` (Rezende & Mohamed, 2015): ``num_layers`` layers for variational
  inference (reverse KL via ``sample_and_log_prob``); ``log_prob`` of data inverts each layer
  numerically (planar: bisection; radial: closed-form root), or refuses with ``inverse="refuse"``.
"""

from __future__ import annotations

import numbers

from fastflow.flows.continuous import ContinuousFlow
from fastflow.flows.flow import Flow
from fastflow.flows.models import _base, _flatten, register
from fastflow.nn.base import CompositeTransform
from fastflow.nn.continuous import CNF
from fastflow.nn.glow import ActNorm
from fastflow.nn.planar import PlanarFlow, RadialFlow
from fastflow.nn.residual import ResidualBlock

__all__ = ["resflow", "cnf", "planar", "radial"]


def _count(model, key, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"build({model!r}): {key} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"build({model!r}): {key} must be >= 1, got {value!r}")
    return int(value)


@register("resflow")
def resflow(shape, context_features=None, *, num_layers=4, hidden_features=64, num_hidden=2, coeff=0.97,
            n_power_iterations=1, estimator="roulette", eval_estimator="auto", n_terms=10, eval_terms=20,
            n_exact_terms=2, geom_p=0.5, probe="gaussian", gradient="neumann", actnorm=True, atol=1e-6,
            rtol=1e-5, max_iter=200, base="normal") -> Flow:
    """Residual Flow: ``num_layers`` x (ActNorm, ``y = x + g(x)`` with ``Lip(g) <= coeff^(num_hidden+1)``).

    Args mirror :class:`~fastflow.nn.residual.ResidualBlock`; ``actnorm=False`` drops the ActNorms.
    """
    num_layers = _count("resflow", "num_layers", num_layers)
    _count("resflow", "hidden_features", hidden_features)
    _count("resflow", "num_hidden", num_hidden)
    layers, d = _flatten(shape)
    for _ in range(num_layers):
        if actnorm:
            layers.append(ActNorm(d))
        layers.append(ResidualBlock(d, hidden_features, num_hidden, context_features, coeff, n_power_iterations,
                                    estimator, eval_estimator, n_terms, eval_terms, n_exact_terms, geom_p, probe,
                                    gradient, atol=atol, rtol=rtol, max_iter=max_iter))
    return Flow(CompositeTransform(layers), _base(base, (d,), context_features))


@register("cnf")
def cnf(shape, context_features=None, *, hidden_features=64, num_layers=3, activation="tanh", method="dopri5",
        rtol=1e-5, atol=1e-5, step_size=0.05, adjoint=False, trace="hutchinson", eval_trace="auto",
        probe="rademacher", t1=1.0, sigma_min=1e-4, base="normal", max_num_steps=1000) -> ContinuousFlow:
    """FFJORD continuous flow with an MLP vector field of ``num_layers`` hidden layers; see
    :class:`~fastflow.nn.continuous.CNF` for the solver and trace options and
    :class:`~fastflow.flows.continuous.ContinuousFlow` for ``sigma_min``."""
    _count("cnf", "num_layers", num_layers)
    _count("cnf", "hidden_features", hidden_features)
    layers, d = _flatten(shape)
    layers.append(CNF(d, hidden_features, num_layers, context_features, activation, method, rtol, atol, step_size,
                      adjoint, trace, eval_trace, probe, t1=t1, max_num_steps=max_num_steps))
    return ContinuousFlow(CompositeTransform(layers), _base(base, (d,), context_features), sigma_min=sigma_min)


def _vi(model, cls, shape, context_features, num_layers, inverse, base):
    num_layers = _count(model, "num_layers", num_layers)
    if context_features is not None:
        raise ValueError(f"build({model!r}): {model} flows are unconditional; context_features must be None")
    layers, d = _flatten(shape)
    layers += [cls(d, inverse=inverse) for _ in range(num_layers)]
    return Flow(CompositeTransform(layers), _base(base, (d,)))


@register("planar")
def planar(shape, context_features=None, *, num_layers=8, inverse="numerical", base="normal") -> Flow:
    """``num_layers`` planar layers (Rezende & Mohamed, 2015), closed form noise -> data."""
    return _vi("planar", PlanarFlow, shape, context_features, num_layers, inverse, base)


@register("radial")
def radial(shape, context_features=None, *, num_layers=8, inverse="numerical", base="normal") -> Flow:
    """``num_layers`` radial layers (Rezende & Mohamed, 2015), closed form noise -> data."""
    return _vi("radial", RadialFlow, shape, context_features, num_layers, inverse, base)
