"""Drop-ins for the nflows-style spline functions (nflows and normflows share them)."""

from __future__ import annotations

import math
import numbers

import torch

from fastflow.integrations._patch import float_tensors


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def op_takes(inputs, uw, uh, ud, parameterization, **kw) -> bool:
    """Whether fastflow's spline op runs this call: float32/float64 tensors (a peer's half
    precision runs its own code), a non-empty input, and whatever the op's own contract says
    (:func:`fastflow.ops.rq_spline.rq_spline_accepts`, the public functions' checks as a
    predicate: no second copy of them here)."""
    if not (float_tensors(inputs, uw, uh, ud) and inputs.numel() > 0):
        return False
    from fastflow.ops.rq_spline import rq_spline_accepts

    return rq_spline_accepts(inputs, uw, uh, ud, parameterization=parameterization, **kw)


def make_unconstrained(original, integration):
    """``unconstrained_rational_quadratic_spline`` on fastflow where it is the same function
    (linear tails, a scalar tail bound, float32/float64, arguments the op takes: see
    ``op_takes``); anything else runs ``original``."""

    def unconstrained_rational_quadratic_spline(inputs, unnormalized_widths, unnormalized_heights,
                                                unnormalized_derivatives, inverse=False, tails="linear",
                                                tail_bound=1.0, min_bin_width=1e-3, min_bin_height=1e-3,
                                                min_derivative=1e-3, **kwargs):
        if (not kwargs and isinstance(tails, str) and tails == "linear" and _number(tail_bound)
                and 0 < tail_bound < math.inf
                and op_takes(inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives, "nflows",
                             tail_bound=tail_bound, min_bin_width=min_bin_width, min_bin_height=min_bin_height,
                             min_derivative=min_derivative)):
            from fastflow.ops.rq_spline import rq_spline_unchecked

            # the peers slice these from their conditioner's output: made contiguous once here, the
            # op's backward reuses them rather than copying them again
            w, h, d = (t.contiguous() for t in (unnormalized_widths, unnormalized_heights, unnormalized_derivatives))
            return rq_spline_unchecked(inputs, w, h, d, parameterization="nflows", inverse=bool(inverse),
                                       tail_bound=tail_bound, min_bin_width=min_bin_width,
                                       min_bin_height=min_bin_height, min_derivative=min_derivative,
                                       backend=integration.backend)
        return original(inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives,
                        inverse=inverse, tails=tails, tail_bound=tail_bound, min_bin_width=min_bin_width,
                        min_bin_height=min_bin_height, min_derivative=min_derivative, **kwargs)

    unconstrained_rational_quadratic_spline.__doc__ = original.__doc__
    unconstrained_rational_quadratic_spline.__wrapped__ = original
    return unconstrained_rational_quadratic_spline


def make_bounded(original, integration, domain_error=None):
    """``rational_quadratic_spline`` (K+1 slopes on a box) on fastflow for scalar bounds,
    float32/float64 and arguments the op takes (see ``op_takes``); anything else, or a forced
    backend without kernels for this parameterisation, runs ``original``. ``domain_error``
    (nflows: ``InputOutsideDomain``) is raised exactly where the original raises it."""

    def rational_quadratic_spline(inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives,
                                  inverse=False, left=0.0, right=1.0, bottom=0.0, top=1.0, min_bin_width=1e-3,
                                  min_bin_height=1e-3, min_derivative=1e-3, **kwargs):
        if (not kwargs and all(_number(v) and math.isfinite(v) for v in (left, right, bottom, top))
                and left < right and bottom < top and not integration.declines("nflows_bounded")
                and op_takes(inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives,
                             "nflows_bounded", box=(left, right, bottom, top), min_bin_width=min_bin_width,
                             min_bin_height=min_bin_height, min_derivative=min_derivative)):
            if domain_error is not None and (torch.min(inputs) < left or torch.max(inputs) > right):
                raise domain_error()  # nflows' own check (it tests the inverse's inputs against left/right too)
            from fastflow.ops.rq_spline import rq_spline_unchecked

            w, h, d = (t.contiguous() for t in (unnormalized_widths, unnormalized_heights, unnormalized_derivatives))
            return rq_spline_unchecked(inputs, w, h, d, parameterization="nflows_bounded", inverse=bool(inverse),
                                       box=(left, right, bottom, top), min_bin_width=min_bin_width,
                                       min_bin_height=min_bin_height, min_derivative=min_derivative,
                                       backend=integration.backend)
        return original(inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives,
                        inverse=inverse, left=left, right=right, bottom=bottom, top=top,
                        min_bin_width=min_bin_width, min_bin_height=min_bin_height,
                        min_derivative=min_derivative, **kwargs)

    rational_quadratic_spline.__doc__ = original.__doc__
    rational_quadratic_spline.__wrapped__ = original
    return rational_quadratic_spline


def module_targets(rq, modules, integration, domain_error=None) -> list:
    """The ``(module, attribute, drop-in)`` patch targets of an nflows-style library: in each of
    the modules named by ``modules`` that holds ``rq``'s (the library's ``rational_quadratic``
    module) own ``unconstrained_rational_quadratic_spline`` or ``rational_quadratic_spline``,
    that function replaced by its drop-in (``make_unconstrained``, ``make_bounded``)."""
    import importlib

    unconstrained = make_unconstrained(rq.unconstrained_rational_quadratic_spline, integration)
    bounded = make_bounded(rq.rational_quadratic_spline, integration, domain_error)
    out = []
    for name in modules:
        mod = importlib.import_module(name)
        for attr, new in (("unconstrained_rational_quadratic_spline", unconstrained),
                          ("rational_quadratic_spline", bounded)):
            if getattr(mod, attr, None) is new.__wrapped__:
                out.append((mod, attr, new))
    return out
