"""Model builders (RealNVP, NICE, Glow, MAF, IAF, NSF coupling/autoregressive) and the registry
``build(name, shape, context_features=None, **kwargs)``.

Every flow returned by :func:`build` carries ``flow.spec`` (name, shape, context_features and
the keyword arguments given), so a checkpoint rebuilds it with ``build(**spec)`` followed by
``load_state_dict``. Vector models take an event ``shape`` of ``(D,)``; given an image shape they
flatten it first. Glow takes ``(C, H, W)``.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

from fastflow.flows.distributions import BoxUniform, DiagonalNormal, StandardLogistic, StandardNormal
from fastflow.flows.flow import Flow
from fastflow.nn.autoregressive import MaskedAffineAutoregressive, MaskedAutoregressive, MaskedRQAutoregressive
from fastflow.nn.base import CircularWrap, CompositeTransform, InverseTransform, Reshape, Softclip
from fastflow.nn.coupling import AdditiveCoupling, AffineCoupling, Rescale, RQSplineCoupling
from fastflow.nn.laws import BernsteinLaw, CircularSplineLaw, SOSLaw
from fastflow.nn.glow import ActNorm, ActNormInvConv1x1, InvConv1x1, LULinear, MultiScale, Squeeze
from fastflow.nn.masks import alternating_mask, channel_mask, checkerboard_mask
from fastflow.nn.normalization import BatchNormFlow
from fastflow.nn.permutations import RandomPermutation, ReversePermutation

__all__ = ["build", "names", "register", "realnvp", "nice", "glow", "maf", "iaf", "nsf", "nsf_ar", "bpf", "sospf",
           "ncsf"]

_REGISTRY: dict[str, Callable] = {}


def register(name: str):
    """Decorator adding a builder ``f(shape, context_features, **kwargs) -> Flow`` to the registry."""

    def deco(fn):
        _REGISTRY[name] = fn
        return fn

    return deco


def names() -> list[str]:
    """The registered model names."""
    return sorted(_REGISTRY)


def build(name: str, shape, context_features: int | None = None, kwargs: dict | None = None, **extra) -> Flow:
    """Builds the registered model ``name`` for events of ``shape``.

    ``kwargs`` (a dict, as stored in ``flow.spec``) and keyword arguments are merged and passed
    to the builder. Unknown keyword arguments raise ``TypeError``.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown flow {name!r}; expected one of {names()}")
    shape = _check_shape(name, shape)
    if context_features is not None:
        context_features = _positive_int(name, "context_features", context_features)
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"build({name!r}): kwargs must be a dict, got {type(kwargs).__name__}")
    kw = dict(kwargs or {})
    kw.update(extra)
    _check_kwargs(name, kw)
    flow = _REGISTRY[name](shape, context_features, **kw)
    flow.spec = {"name": name, "shape": shape, "context_features": context_features, "kwargs": kw}
    flow.context_features = context_features
    return flow


def _positive_int(model: str, key: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"build({model!r}): {key} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"build({model!r}): {key} must be >= {minimum}, got {value!r}")
    return int(value)


def _check_shape(model: str, shape) -> tuple[int, ...]:
    items = (shape,) if isinstance(shape, numbers.Integral) and not isinstance(shape, bool) else shape
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(f"build({model!r}): shape must be a tuple of positive integers, got {shape!r}") from None
    if not items or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in items):
        raise ValueError(f"build({model!r}): shape must be a non-empty tuple of positive integers, got {shape!r}")
    return tuple(int(s) for s in items)


# Sizes that every builder taking them needs to be at least this (a flow of zero layers would be
# the identity, a conditioner of zero hidden units a constant): refused, not silently built.
_SIZE_MINIMUMS = {"num_layers": 1, "hidden_features": 1, "hidden_channels": 1, "num_blocks": 1, "num_bins": 2,
                  "levels": 1, "depth": 1}


def _check_kwargs(model: str, kw: dict) -> None:
    for key, minimum in _SIZE_MINIMUMS.items():
        if key in kw:
            _positive_int(model, key, kw[key], minimum)
    if "backend" in kw:
        from fastflow.backends import BACKENDS, BackendUnavailableError, check_backend_name

        name = check_backend_name(kw["backend"], f"build({model!r}, backend=...)")
        # A backend that cannot run in this process (no CUDA device, a missing package) is refused
        # now, with the registry's reason, not at the flow's first call.
        reason = BACKENDS[name].probe() if name is not None else None
        if reason:
            raise BackendUnavailableError(f"build({model!r}, backend={kw['backend']!r}): backend {name!r} "
                                          f"cannot run here: {reason}")


def _base(kind, shape, context_features=None):
    if kind == "normal":
        return StandardNormal(shape)
    if kind == "diag":
        return DiagonalNormal(shape)
    if kind == "logistic":
        return StandardLogistic(shape)
    if kind == "conditional":
        from fastflow.flows.distributions import ConditionalDiagonalNormal

        if not context_features:
            raise ValueError("base='conditional' needs context_features")
        return ConditionalDiagonalNormal(shape, context_features)
    raise ValueError(f"base={kind!r}: expected 'normal', 'diag', 'logistic' or 'conditional'")


def _flatten(shape):
    d = math.prod(shape)
    return ([Reshape(shape, (d,))] if len(shape) > 1 else []), d


def _mixer(kind, d, i):
    if kind == "reverse":
        return [ReversePermutation(d)]
    if kind == "random":
        return [RandomPermutation(d, seed=i)]
    if kind == "lu":
        return [RandomPermutation(d, seed=i), LULinear(d, identity_init=True)]
    if kind in (None, "none"):
        return []
    raise ValueError(f"permutation={kind!r}: expected 'reverse', 'random', 'lu' or 'none'")


def _vector_couplings(shape, context_features, num_layers, make, permutation, batch_norm, base):
    layers, d = _flatten(shape)
    if d < 2:
        raise ValueError(f"coupling flows need at least 2 features, got shape {shape}")
    for i in range(num_layers):
        if i > 0:
            layers += _mixer(permutation, d, i)
        layers.append(make(alternating_mask(d, i % 2)))
        if batch_norm and i < num_layers - 1:
            layers.append(BatchNormFlow(d))
    return Flow(CompositeTransform(layers), _base(base, (d,), context_features))


@register("nsf")
def nsf(shape, context_features=None, *, num_layers=5, hidden_features=128, num_blocks=2, num_bins=8,
        tail_bound=3.0, conditioner="resmlp", permutation="random", batch_norm=False, dropout=0.0,
        base="normal", backend=None) -> Flow:
    """Neural Spline Flow, coupling version (Durkan et al., 2019): RQ-spline couplings on
    alternating masks with random permutations between them and residual-MLP conditioners."""
    net = {"num_blocks": num_blocks} if conditioner == "resmlp" else {"num_layers": num_blocks}
    if dropout:
        net["dropout"] = dropout

    def make(mask):
        return RQSplineCoupling(mask, conditioner, context_features=context_features, num_bins=num_bins,
                                tail_bound=tail_bound, hidden_features=hidden_features, backend=backend, **net)

    return _vector_couplings(shape, context_features, num_layers, make, permutation, batch_norm, base)


@register("realnvp")
def realnvp(shape, context_features=None, *, num_layers=8, hidden_features=128, num_blocks=2, scale="softclamp",
            clamp=2.0, conditioner="mlp", permutation="none", batch_norm=False, base="normal") -> Flow:
    """RealNVP (Dinh et al., 2017): affine couplings on alternating masks (optionally with
    permutations and batch norm between them)."""
    net = {"num_blocks": num_blocks} if conditioner == "resmlp" else {"num_layers": num_blocks}

    def make(mask):
        return AffineCoupling(mask, conditioner, context_features=context_features, scale=scale, clamp=clamp,
                              hidden_features=hidden_features, **net)

    return _vector_couplings(shape, context_features, num_layers, make, permutation, batch_norm, base)


@register("nice")
def nice(shape, context_features=None, *, num_layers=4, hidden_features=128, num_blocks=4, permutation="none",
         base="logistic") -> Flow:
    """NICE (Dinh et al., 2015): additive couplings on alternating masks, a final diagonal
    scaling, and a standard logistic prior."""

    def make(mask):
        return AdditiveCoupling(mask, "mlp", context_features=context_features, hidden_features=hidden_features,
                                num_layers=num_blocks)

    flow = _vector_couplings(shape, context_features, num_layers, make, permutation, False, base)
    flow.transform.transforms.append(Rescale(flow.base.shape))
    return flow


def _autoregressive(shape, context_features, num_layers, make, permutation, batch_norm, base):
    layers, d = _flatten(shape)
    for i in range(num_layers):
        if i > 0:
            layers += _mixer(permutation, d, i)
        layers.append(make(d))
        if batch_norm and i < num_layers - 1:
            layers.append(BatchNormFlow(d))
    return Flow(CompositeTransform(layers), _base(base, (d,), context_features))


@register("maf")
def maf(shape, context_features=None, *, num_layers=5, hidden_features=128, num_blocks=2, scale="softclamp",
        permutation="reverse", batch_norm=False, base="normal") -> Flow:
    """Masked Autoregressive Flow (Papamakarios et al., 2017): MADE-parameterised affine layers
    with order reversals (and optionally batch norm) between them. Fast density, D-pass sampling."""

    def make(d):
        return MaskedAffineAutoregressive(d, hidden_features, num_blocks, context_features, scale=scale)

    return _autoregressive(shape, context_features, num_layers, make, permutation, batch_norm, base)


@register("iaf")
def iaf(shape, context_features=None, *, num_layers=5, hidden_features=128, num_blocks=2, scale="softclamp",
        permutation="reverse", base="normal") -> Flow:
    """Inverse Autoregressive Flow (Kingma et al., 2016): inverted MAF layers. Fast sampling
    (and ``sample_and_log_prob``, for the reverse KL), D-pass density."""

    def make(d):
        return InverseTransform(MaskedAffineAutoregressive(d, hidden_features, num_blocks, context_features,
                                                           scale=scale))

    return _autoregressive(shape, context_features, num_layers, make, permutation, False, base)


@register("nsf-ar")
def nsf_ar(shape, context_features=None, *, num_layers=5, hidden_features=128, num_blocks=2, num_bins=8,
           tail_bound=3.0, permutation="reverse", batch_norm=False, base="normal", backend=None) -> Flow:
    """Neural Spline Flow, autoregressive version: MADE-parameterised RQ splines."""

    def make(d):
        return MaskedRQAutoregressive(d, hidden_features, num_blocks, context_features, num_bins=num_bins,
                                      tail_bound=tail_bound, backend=backend)

    return _autoregressive(shape, context_features, num_layers, make, permutation, batch_norm, base)


@register("bpf")
def bpf(shape, context_features=None, *, num_layers=3, hidden_features=64, num_blocks=2, degree=16, bound=5.0,
        permutation="reverse", batch_norm=False, base="normal", backend=None) -> Flow:
    """Bernstein polynomial flow (zuko's ``BPF``: Sick et al. 2020; Arpogaus et al. 2022):
    MADE-parameterised Bernstein polynomial laws (``degree + 1`` coefficients per feature, the
    identity outside ``[-bound, bound]``: standardise the data first), order reversals between
    layers. zuko's defaults: 3 layers, two hidden layers of 64."""

    def make(d):
        return MaskedAutoregressive(d, BernsteinLaw(degree, bound, backend), hidden_features, num_blocks,
                                    context_features)

    return _autoregressive(shape, context_features, num_layers, make, permutation, batch_norm, base)


@register("sospf")
def sospf(shape, context_features=None, *, num_layers=3, hidden_features=64, num_blocks=2, degree=4, polynomials=3,
          slope=1e-3, clip=11.0, permutation="reverse", base="normal", backend=None) -> Flow:
    """Sum-of-squares polynomial flow (zuko's ``SOSPF``: Jaini et al. 2019): MADE-parameterised
    sum-of-squares polynomial laws plus a shift, with order reversals and, as zuko, a
    :class:`~fastflow.nn.Softclip` to ``(-clip, clip)`` between layers (stacked polynomials
    otherwise leave any range). zuko's defaults: 3 layers of degree 4 with 3 polynomials.

    As zuko's, the flow is not onto the latent line: past the first Softclip every layer sees
    ``(-clip, clip)``, so the latent image is a bounded interval and the density integrates to
    the base distribution's mass over it (close to 1 once trained, below 1 in general)."""
    layers, d = _flatten(shape)
    for i in range(num_layers):
        if i > 0:
            layers += [Softclip(clip)] + _mixer(permutation, d, i)
        layers.append(MaskedAutoregressive(d, SOSLaw(polynomials, degree, 10.0, slope, backend), hidden_features,
                                           num_blocks, context_features))
    return Flow(CompositeTransform(layers), _base(base, (d,), context_features))


@register("ncsf")
def ncsf(shape, context_features=None, *, num_layers=3, hidden_features=64, num_blocks=2, num_bins=8, slope=1e-3,
         permutation="reverse", backend=None) -> Flow:
    """Neural circular spline flow (zuko's ``NCSF``; Rezende et al. 2020): a density on the torus
    ``[-pi, pi)^D`` of angles. MADE-parameterised circular spline laws with order reversals, and a
    uniform base on ``[-pi - 1e-5, pi + 1e-5]^D`` as zuko's. Inputs are first wrapped onto
    ``[-pi, pi)`` (:class:`~fastflow.nn.CircularWrap`: ``log_prob`` of an angle equals that of the
    same angle plus a turn; zuko's conditioners see the raw value) and samples lie in
    ``[-pi, pi)``. As zuko's, the conditioners take the angles as numbers, so the density of one
    feature given the others may jump where a conditioning angle crosses ``+-pi``. zuko's
    defaults: 3 layers, two hidden layers of 64, 8 bins.

    Only permutations keep the torus (``permutation``: ``"reverse"``, ``"random"`` or ``"none"``).
    """
    if permutation not in ("reverse", "random", "none", None):
        raise ValueError(f"ncsf: permutation={permutation!r}; a circular flow takes 'reverse', 'random' or 'none' "
                         "(a linear mixer would leave the torus)")
    layers, d = _flatten(shape)
    layers.append(CircularWrap())  # any turn of an angle: [-pi, pi), what the conditioners see
    for i in range(num_layers):
        if i > 0:
            layers += _mixer(permutation, d, i)
        layers.append(MaskedAutoregressive(d, CircularSplineLaw(num_bins, slope, backend), hidden_features, num_blocks,
                                           context_features))
    return Flow(CompositeTransform(layers), BoxUniform((d,), -math.pi - 1e-5, math.pi + 1e-5))


@register("glow")
def glow(shape, context_features=None, *, levels=2, depth=4, hidden_channels=64, coupling="affine",
         scale="sigmoid", clamp=2.0, conditioner="cnn", fused=True, base="normal") -> Flow:
    """Glow (Kingma & Dhariwal, 2018), multi-scale: per level a squeeze, then ``depth`` steps of
    ActNorm, invertible 1x1 convolution (LU) and an affine (or additive) coupling on a channel
    mask, then half the channels factored out (not after the last level).

    Args:
        shape: ``(C, H, W)``; ``H`` and ``W`` must be divisible by ``2 ** levels``.
        fused: use the fused ActNorm + 1x1 convolution op for the first two parts of a step.
    """
    if len(shape) != 3:
        raise ValueError(f"glow needs an image shape (C, H, W), got {shape}")
    c, h, w = shape
    if h % (2**levels) or w % (2**levels):
        raise ValueError(f"glow: H and W must be divisible by 2**levels={2**levels}, got {shape}")
    level_modules, level_shapes = [], []
    for lvl in range(levels):
        c, h, w = 4 * c, h // 2, w // 2
        steps = [Squeeze()]
        for k in range(depth):
            steps += [ActNormInvConv1x1(c)] if fused else [ActNorm(c), InvConv1x1(c)]
            mask = channel_mask(c, h, w, flip=bool(k % 2))
            if coupling == "affine":
                steps.append(AffineCoupling(mask, conditioner, context_features=context_features, scale=scale,
                                            clamp=clamp, hidden_channels=hidden_channels))
            elif coupling == "additive":
                steps.append(AdditiveCoupling(mask, conditioner, context_features=context_features,
                                              hidden_channels=hidden_channels))
            else:
                raise ValueError(f"glow: coupling={coupling!r}, expected 'affine' or 'additive'")
        level_modules.append(CompositeTransform(steps))
        level_shapes.append((c, h, w))
        if lvl < levels - 1:
            c = c // 2
    return Flow(MultiScale(level_modules, level_shapes), _base(base, (math.prod(shape),), context_features))


@register("realnvp-image")
def realnvp_image(shape, context_features=None, *, levels=2, hidden_channels=64, num_blocks=2, scale="softclamp",
                  clamp=2.0, base="normal") -> Flow:
    """Multi-scale RealNVP for images (Dinh et al., 2017): per level three checkerboard
    couplings, a squeeze and three channel-wise couplings, then half the channels factored out;
    the last level has four checkerboard couplings. Conditioners are convolutional ResNets."""
    if len(shape) != 3:
        raise ValueError(f"realnvp-image needs an image shape (C, H, W), got {shape}")
    c, h, w = shape
    if h % (2 ** (levels - 1)) or w % (2 ** (levels - 1)):
        raise ValueError(f"realnvp-image: H and W must be divisible by 2**(levels-1), got {shape}")

    def coupling(mask):
        return AffineCoupling(mask, "resnet", context_features=context_features, scale=scale, clamp=clamp,
                              hidden_channels=hidden_channels, num_blocks=num_blocks)

    mods, shapes = [], []
    for lvl in range(levels):
        last = lvl == levels - 1
        steps = [coupling(checkerboard_mask(c, h, w, k % 2)) for k in range(4 if last else 3)]
        if not last:
            steps.append(Squeeze())
            c, h, w = 4 * c, h // 2, w // 2
            steps += [coupling(channel_mask(c, h, w, flip=bool(k % 2))) for k in range(3)]
        mods.append(CompositeTransform(steps))
        shapes.append((c, h, w))
        if not last:
            c = c // 2
    return Flow(MultiScale(mods, shapes), _base(base, (math.prod(shape),), context_features))
