"""Drop-in flow layers: ``y, logabsdet = layer(x, context=None)``, ``x, logabsdet = layer.inverse(y, context=None)``."""

from fastflow.nn.autoregressive import (
    MADE,
    InverseAutoregressive,
    MaskedAffineAutoregressive,
    MaskedAutoregressive,
    MaskedLinear,
    MaskedRQAutoregressive,
)
from fastflow.nn.base import CircularWrap, CompositeTransform, InverseTransform, Reshape, Softclip, Transform
from fastflow.nn.conditioners import MLP, ConvNet, ConvResNet, ResidualMLP
from fastflow.nn.continuous import CNF, ODEVectorField
from fastflow.nn.coupling import AdditiveCoupling, AffineCoupling, Coupling, Rescale, RQSplineCoupling
from fastflow.nn.glow import ActNorm, ActNormInvConv1x1, InvConv1x1, LULinear, MultiScale, Squeeze
from fastflow.nn.laws import (AdditiveLaw, AffineLaw, BernsteinLaw, CircularSplineLaw, Law, SOSLaw, SplineLaw,
                              make_law)
from fastflow.nn.linear import CholeskyAffine
from fastflow.nn.masks import alternating_mask, channel_mask, checkerboard_mask, half_mask, random_mask
from fastflow.nn.mixture import MixtureLogisticCDF
from fastflow.nn.normalization import BatchNormFlow
from fastflow.nn.permutations import Permutation, RandomPermutation, ReversePermutation
from fastflow.nn.planar import PlanarFlow, RadialFlow
from fastflow.nn.residual import ConvergenceError, LipschitzMLP, LipSwish, ResidualBlock, SpectralNormLinear

__all__ = [
    "MADE", "MLP", "ActNorm", "ActNormInvConv1x1", "AdditiveCoupling", "AffineCoupling", "BatchNormFlow",
    "CholeskyAffine", "CompositeTransform", "ConvNet", "ConvResNet", "Coupling", "InvConv1x1", "InverseAutoregressive",
    "InverseTransform", "LULinear", "MaskedAffineAutoregressive", "MaskedLinear", "MaskedRQAutoregressive",
    "MixtureLogisticCDF", "MultiScale", "Permutation", "RQSplineCoupling", "RandomPermutation", "Rescale", "Reshape",
    "ResidualMLP", "Softclip", "CircularWrap",
    "ReversePermutation", "Squeeze", "Transform", "alternating_mask", "channel_mask", "checkerboard_mask",
    "half_mask", "random_mask",
    "CNF", "ConvergenceError", "LipSwish", "LipschitzMLP", "ODEVectorField", "PlanarFlow", "RadialFlow",
    "ResidualBlock", "SpectralNormLinear",
    "Law", "AffineLaw", "AdditiveLaw", "SplineLaw", "CircularSplineLaw", "BernsteinLaw", "SOSLaw", "make_law",
    "MaskedAutoregressive",
]
