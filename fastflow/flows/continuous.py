"""``ContinuousFlow`` (a :class:`Flow` around one :class:`~fastflow.nn.continuous.CNF`) and the
objective switch ``training_loss(flow, x, objective, context)`` that ``fastflow fit`` calls.

Objectives (:data:`OBJECTIVES`):

- ``"nll"``: the mean negative log-likelihood ``-log p(x)`` through the ODE (every flow);
- ``"flow-matching"``: conditional flow matching (Lipman et al., 2023) of the CNF's vector
  field; no ODE solve during training, the density is then evaluated exactly through the ODE by
  ``log_prob`` (only for flows that have ``flow_matching_loss``, i.e. ``build("cnf", ...)``).
"""

from __future__ import annotations

import numbers

import torch

from fastflow.flows.flow import Flow
from fastflow.nn.continuous import CNF

__all__ = ["ContinuousFlow", "OBJECTIVES", "training_loss"]

OBJECTIVES = ("nll", "flow-matching")


class ContinuousFlow(Flow):
    """A flow whose transform ends in a :class:`CNF` (possibly after a ``Reshape``), with the
    extra objective :meth:`flow_matching_loss`.

    Args:
        transform, base: as :class:`Flow`.
        sigma_min: the width of the conditional probability path at ``t = 1`` (Lipman et al.).
    """

    def __init__(self, transform, base, sigma_min: float = 1e-4):
        super().__init__(transform, base)
        if isinstance(sigma_min, bool) or not isinstance(sigma_min, numbers.Real) or not 0 <= sigma_min < 1:
            raise ValueError(f"ContinuousFlow: sigma_min must be a number in [0, 1), got {sigma_min!r}")
        self.sigma_min = float(sigma_min)
        cnfs = [m for m in self.transform.modules() if isinstance(m, CNF)]
        if len(cnfs) != 1:
            raise ValueError(f"ContinuousFlow needs exactly one CNF in its transform, found {len(cnfs)}")
        self.cnf = cnfs[0]

    def flow_matching_loss(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar conditional-flow-matching loss of the batch ``x`` ``(B, *shape)``: noise ``x0`` from the
        base, ``t ~ U(0, 1)``, the OT path ``x_t = (1 - (1 - sigma_min) t) x0 + t x1`` and the
        squared error of the vector field against ``x1 - (1 - sigma_min) x0`` (summed over features,
        averaged over the batch)."""
        if x.dim() < 2:
            raise ValueError(f"flow_matching_loss: x must be a batch (B, *shape), got shape {tuple(x.shape)}")
        x1 = x.reshape(x.shape[0], -1)
        x0 = self.base.sample(x.shape[0], context=context).reshape(x.shape[0], -1).to(x1.dtype)
        return self.cnf.flow_matching_loss(x1, x0, context, sigma_min=self.sigma_min)

    def sample(self, n: int, context: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` samples (shapes as :meth:`Flow.sample`); the ODE is solved without the trace."""
        with self.cnf.without_trace():
            return super().sample_and_log_prob(n, context)[0]

    def training_loss(self, x: torch.Tensor, objective: str = "nll", context: torch.Tensor | None = None):
        """The scalar loss of ``objective`` (``"nll"`` or ``"flow-matching"``) on the batch ``x``."""
        return training_loss(self, x, objective, context)


def training_loss(flow: Flow, x: torch.Tensor, objective: str = "nll",
                  context: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar training loss of ``flow`` on the batch ``x`` ``(B, *shape)``.

    Args:
        objective: ``"nll"`` (mean negative log-likelihood, any flow) or ``"flow-matching"``
            (conditional flow matching; flows built by ``build("cnf", ...)``).

    Raises:
        ValueError: unknown objective, or ``"flow-matching"`` for a flow without a vector field.
    """
    if objective == "nll":
        return flow.forward_kl(x, context)
    if objective == "flow-matching":
        if not hasattr(flow, "flow_matching_loss"):
            name = (getattr(flow, "spec", None) or {}).get("name", type(flow).__name__)
            raise ValueError(f"objective='flow-matching' needs a continuous flow (model 'cnf'), got {name!r}")
        return flow.flow_matching_loss(x, context)
    raise ValueError(f"objective={objective!r}: expected one of {OBJECTIVES}")
