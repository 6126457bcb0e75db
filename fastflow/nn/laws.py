"""Elementwise laws: the bijection a coupling or autoregressive layer applies to each element.

A law maps ``x`` and ``P`` raw parameters per element (from the conditioner) to ``y`` and the
per-sample log-determinant, through one fused op of :mod:`fastflow.ops`. The layer structure
(which elements, which conditioner) is separate: :class:`~fastflow.nn.coupling.Coupling` and
:class:`~fastflow.nn.autoregressive.MaskedAutoregressive` take any law, so a new law works in
both without a new layer class.

The protocol (duck-typed; subclass :class:`Law` for the defaults):

- ``params_per_element``: ``P``;
- ``law(x, params, inverse) -> (y, logabsdet)`` with ``x (B, ...)``, ``params (B, ..., P)`` (any
  strides: the layers pass views of the conditioner output), ``y`` of ``x.shape`` and
  ``logabsdet (B,)`` summed over the non-batch dims;
- ``bind(hidden_features)``: called once by the layer after its conditioner is built, with the
  conditioner's width (or None), for laws that scale their raw parameters by it.
"""

from __future__ import annotations

import math

from fastflow.ops.circular import rq_spline_circular
from fastflow.ops.coupling import SCALES, additive_coupling, affine_coupling
from fastflow.ops.polynomial import MAX_PARAMS, MAX_SOS_DEGREE, bernstein, sos_polynomial
from fastflow.ops.rq_spline import MAX_BINS, rq_spline

__all__ = ["Law", "AffineLaw", "AdditiveLaw", "SplineLaw", "CircularSplineLaw", "BernsteinLaw", "SOSLaw",
           "make_law"]


class Law:
    """Base of the elementwise laws (see the module docstring for the protocol)."""

    params_per_element: int = 1
    # Whether the conditioner's output layer may start at zero (a fresh layer then starts at the
    # law's zero-parameter map). False for a law whose parameters enter symmetrically, which an
    # all-zero start would keep equal forever.
    zero_init: bool = True

    def bind(self, hidden_features: int | None) -> None:
        """The conditioner's width, for laws that normalise their raw parameters by it."""

    def __call__(self, x, params, inverse: bool):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class AffineLaw(Law):
    """``y = s(h) * x + t`` (RealNVP, Dinh et al. 2017; Glow, Kingma & Dhariwal 2018); parameters
    ``(t, h)`` per element; op :func:`fastflow.ops.affine_coupling`.

    Args:
        scale: ``"exp"``, ``"softclamp"`` (``exp(clamp * tanh(h / clamp))``) or ``"sigmoid"``
            (``sigmoid(h + 2)``).
        clamp: the soft clamp's bound.
        backend: forces the op's backend (None: the fastest available).
    """

    params_per_element = 2

    def __init__(self, scale: str = "softclamp", clamp: float = 2.0, backend: str | None = None):
        if scale not in SCALES:
            raise ValueError(f"AffineLaw: scale={scale!r}, expected one of {', '.join(map(repr, SCALES))}")
        self.scale, self.clamp, self.backend = scale, float(clamp), backend

    def __call__(self, x, params, inverse):
        return affine_coupling(x, params[..., 0], params[..., 1], scale=self.scale, clamp=self.clamp,
                               inverse=inverse, backend=self.backend)


class AdditiveLaw(Law):
    """``y = x + t``, volume preserving (NICE, Dinh et al. 2015); op :func:`fastflow.ops.additive_coupling`."""

    params_per_element = 1

    def __init__(self, backend: str | None = None):
        self.backend = backend

    def __call__(self, x, params, inverse):
        return additive_coupling(x, params[..., 0], inverse=inverse, backend=self.backend)


class SplineLaw(Law):
    """Rational-quadratic spline with linear tails (Neural Spline Flows, Durkan et al. 2019);
    ``3K - 1`` parameters per element (``K`` widths, ``K`` heights, ``K - 1`` interior slopes);
    op :func:`fastflow.ops.rq_spline`.

    The raw widths and heights are divided by ``sqrt(hidden_features)`` of the conditioner (as
    nflows does), and the slopes offset so that a zero conditioner output gives slope 1
    everywhere: a fresh layer is the identity.
    """

    def __init__(self, num_bins: int = 8, tail_bound: float = 3.0, min_bin_width: float = 1e-3,
                 min_bin_height: float = 1e-3, min_derivative: float = 1e-3, backend: str | None = None):
        self.num_bins = int(num_bins)
        if self.num_bins < 2:
            raise ValueError(f"SplineLaw: num_bins must be >= 2, got {num_bins!r}")
        self.params_per_element = 3 * self.num_bins - 1
        self.spline_kwargs = dict(tail_bound=float(tail_bound), min_bin_width=min_bin_width,
                                  min_bin_height=min_bin_height, min_derivative=min_derivative, backend=backend)
        self._wh_scale = 1.0
        self._d_offset = math.log(math.expm1(1.0 - min_derivative))

    def bind(self, hidden_features):
        self._wh_scale = 1.0 / math.sqrt(hidden_features) if hidden_features else 1.0

    def split(self, params):
        """``(B, ..., 3K-1)`` raw outputs -> the op's unnormalised widths, heights, derivatives."""
        k = self.num_bins
        uw = params[..., :k] * self._wh_scale
        uh = params[..., k : 2 * k] * self._wh_scale
        ud = params[..., 2 * k :] + self._d_offset
        return uw, uh, ud

    def __call__(self, x, params, inverse):
        y, lad = rq_spline(x, *self.split(params), inverse=inverse, **self.spline_kwargs)
        return y, lad.flatten(1).sum(dim=1)


class CircularSplineLaw(Law):
    """Circular rational-quadratic spline on angles (Rezende et al. 2020; zuko's ``NCSF`` layer):
    ``3K - 1`` raw parameters per element in zuko's parameterisation (``K`` widths, ``K`` heights,
    ``K - 1`` interior slopes, used as the conditioner gives them); op
    :func:`fastflow.ops.rq_spline_circular`. Inputs are angles (any real is taken modulo
    ``2 pi``), outputs lie in ``[-pi, pi]``. A zero conditioner output gives the identity spline
    after zuko's rotation by ``pi``.

    Args:
        num_bins: ``K`` (``>= 2``).
        slope: the minimum slope, in ``(0, 1)``.
        backend: forces the op's backend (None: the fastest available).
    """

    def __init__(self, num_bins: int = 8, slope: float = 1e-3, backend: str | None = None):
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or not 2 <= num_bins <= MAX_BINS:
            raise ValueError(f"CircularSplineLaw: num_bins must be an integer in 2..{MAX_BINS}, got {num_bins!r}")
        if not isinstance(slope, (int, float)) or not 0.0 < float(slope) < 1.0:
            raise ValueError(f"CircularSplineLaw: slope must be in (0, 1), got {slope!r}")
        self.num_bins, self.slope, self.backend = num_bins, float(slope), backend
        self.params_per_element = 3 * num_bins - 1

    def __call__(self, x, params, inverse):
        k = self.num_bins
        y, lad = rq_spline_circular(x, params[..., :k], params[..., k : 2 * k], params[..., 2 * k :],
                                    inverse=inverse, slope=self.slope, backend=self.backend)
        return y, lad.flatten(1).sum(dim=1)


class BernsteinLaw(Law):
    """Bernstein polynomial law (Bernstein-Polynomial Normalizing Flows; zuko's ``BPF``):
    ``degree + 1`` raw coefficients per element, as zuko's ``BPF(degree=...)`` (the polynomial
    itself has degree ``degree + 5``: two fixed steps at each end make the slope 1 and the
    curvature 0 there); op :func:`fastflow.ops.bernstein`. A zero conditioner output gives equal
    steps, the identity: a fresh layer is the identity.

    Args:
        degree: zuko's ``degree`` (``>= 1``).
        bound: the polynomial acts on ``[-bound, bound]``, the identity (slope 1) outside.
        backend: forces the op's backend (None: the fastest available).
    """

    def __init__(self, degree: int = 16, bound: float = 5.0, backend: str | None = None):
        if isinstance(degree, bool) or not isinstance(degree, int) or not 1 <= degree <= MAX_PARAMS - 1:
            raise ValueError(f"BernsteinLaw: degree must be an integer in 1..{MAX_PARAMS - 1}, got {degree!r}")
        if not isinstance(bound, (int, float)) or not 0 < float(bound) < float("inf"):
            raise ValueError(f"BernsteinLaw: bound must be a finite positive number, got {bound!r}")
        self.degree = degree
        self.bound = float(bound)
        self.backend = backend
        self.params_per_element = degree + 1

    def __call__(self, x, params, inverse):
        y, lad = bernstein(x, params, inverse=inverse, bound=self.bound, backend=self.backend)
        return y, lad.flatten(1).sum(dim=1)


class SOSLaw(Law):
    """Sum-of-squares polynomial law plus a shift (zuko's ``SOSPF`` layer: its
    ``SOSPolynomialTransform`` then an additive constant): ``K (L + 1) + 1`` parameters per
    element, the coefficients ``a (K, L + 1)`` then the shift; op
    :func:`fastflow.ops.sos_polynomial`. A zero conditioner output gives ``y = (1 + slope) x``,
    but the conditioner does not start at zero (``zero_init = False``: see the attribute).

    Args:
        polynomials: ``K``; degree: ``L`` (zuko's defaults 3 and 4).
        bound: the polynomials' argument scale (zuko's 10); slope: the minimum slope.
        backend: forces the op's backend (None: the fastest available).
    """

    # The K polynomials enter symmetrically (a mean of squares): from an all-zero output layer they
    # would get equal gradients and stay equal, K collapsing to 1. The conditioner starts at
    # PyTorch's default initialisation instead, as zuko's does.
    zero_init = False

    def __init__(self, polynomials: int = 3, degree: int = 4, bound: float = 10.0, slope: float = 1e-3,
                 backend: str | None = None):
        for name, v, lo, hi in (("polynomials", polynomials, 1, 4096), ("degree", degree, 0, MAX_SOS_DEGREE)):
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"SOSLaw: {name} must be an integer in {lo}..{hi}, got {v!r}")
        self.polynomials, self.degree = polynomials, degree
        self.bound, self.slope, self.backend = float(bound), float(slope), backend
        self.params_per_element = polynomials * (degree + 1) + 1

    def __call__(self, x, params, inverse):
        a = params[..., :-1].unflatten(-1, (self.polynomials, self.degree + 1))
        shift = params[..., -1]
        kw = dict(bound=self.bound, slope=self.slope, backend=self.backend)
        if inverse:
            y, lad = sos_polynomial(x - shift, a, inverse=True, **kw)
        else:
            y, lad = sos_polynomial(x, a, **kw)
            y = y + shift
        return y, lad.flatten(1).sum(dim=1)


_LAWS = {"affine": AffineLaw, "additive": AdditiveLaw, "spline": SplineLaw, "circular": CircularSplineLaw,
         "bernstein": BernsteinLaw, "sos": SOSLaw}


def make_law(law, **kwargs) -> Law:
    """A law object from a law, or a name (``"affine"``, ``"additive"``, ``"spline"``,
    ``"circular"``, ``"bernstein"``, ``"sos"``) and its arguments."""
    if isinstance(law, str):
        if law not in _LAWS:
            raise ValueError(f"unknown law {law!r}; expected one of {sorted(_LAWS)} or a Law object")
        return _LAWS[law](**kwargs)
    if kwargs:
        raise TypeError(f"law arguments {sorted(kwargs)} given with a ready law object {law!r}")
    if not callable(law) or not isinstance(getattr(law, "params_per_element", None), int):
        raise TypeError(f"law must be a name or an object with params_per_element and __call__, got {law!r}")
    return law
