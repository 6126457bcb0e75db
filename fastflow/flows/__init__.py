"""Composed flow models, base distributions, ``Flow`` and the model registry ``build``."""

from fastflow.flows.continuous import OBJECTIVES, ContinuousFlow, training_loss
from fastflow.flows.distributions import (
    BoxUniform,
    ConditionalDiagonalNormal,
    DiagonalNormal,
    Distribution,
    StandardLogistic,
    StandardNormal,
)
from fastflow.flows.families import cnf, planar, radial, resflow  # registers the four builders
from fastflow.flows.flow import Flow
from fastflow.flows.models import (bpf, build, glow, iaf, maf, names, ncsf, nice, nsf, nsf_ar, realnvp,
                                   realnvp_image, register, sospf)
from fastflow.flows.compiled import CompiledFlow, compile, eager_parts
from fastflow.flows.training import adam, ml_loss, ml_step, reverse_kl_loss, reverse_kl_step
from fastflow.nn.base import CompositeTransform

__all__ = [
    "OBJECTIVES", "BoxUniform", "CompiledFlow", "CompositeTransform", "ConditionalDiagonalNormal", "ContinuousFlow",
    "DiagonalNormal", "Distribution", "Flow", "StandardLogistic",
    "StandardNormal", "adam", "build", "compile", "eager_parts", "glow", "iaf", "maf", "ml_loss", "ml_step",
    "bpf", "names", "ncsf", "nice", "nsf", "nsf_ar", "sospf",
    "realnvp", "realnvp_image", "register", "reverse_kl_loss", "reverse_kl_step",
    "cnf", "planar", "radial", "resflow", "training_loss",
]
