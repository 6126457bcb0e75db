"""Drop-ins for the nflows-style spline functions (nflows and normflows share them)."""

from __future__ import annotations

import numbers

import torch

from fastflow.integrations._patch import float_tensors


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def make_unconstrained(original, integration):
    """``unconstrained_rational_quadratic_spline`` on fastflow where it is the same function
    (linear tails, a scalar tail bound, float32/float64); anything else runs ``original``."""

    def unconstrained_rational_quadratic_spline(inputs, unnormalized_widths, unnormalized_heights,
                                                unnormalized_derivatives, inverse=False, tails="linear",
                                                tail_bound=1.0, min_bin_width=1e-3, min_bin_height=1e-3,
                                                min_derivative=1e-3, **kwargs):
        if (not kwargs and isinstance(tails, str) and tails == "linear" and _number(tail_bound) and tail_bound > 0
                and float_tensors(inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives)
                and unnormalized_widths.shape[-1] >= 2 and inputs.numel() > 0):
            from fastflow.ops.rq_spline import rq_spline

            # the peers slice these from their conditioner's output: made contiguous once here, the
            # op's backward reuses them rather than copying them again
            w, h, d = (t.contiguous() for t in (unnormalized_widths, unnormalized_heights, unnormalized_derivatives))
            return rq_spline(inputs, w, h, d, inverse=bool(inverse), tail_bound=float(tail_bound),
                             min_bin_width=min_bin_width, min_bin_height=min_bin_height, min_derivative=min_derivative,
                             backend=integration.backend)
        return original(inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives,
                        inverse=inverse, tails=tails, tail_bound=tail_bound, min_bin_width=min_bin_width,
                        min_bin_height=min_bin_height, min_derivative=min_derivative, **kwargs)

    unconstrained_rational_quadratic_spline.__doc__ = original.__doc__
    unconstrained_rational_quadratic_spline.__wrapped__ = original
    return unconstrained_rational_quadratic_spline


def make_bounded(original, integration, domain_error=None):
    """``rational_quadratic_spline`` (K+1 slopes on a box) on fastflow for scalar bounds and
    float32/float64; ``domain_error`` (nflows: ``InputOutsideDomain``) is raised exactly where the
    original raises it."""

    def rational_quadratic_spline(inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives,
                                  inverse=False, left=0.0, right=1.0, bottom=0.0, top=1.0, min_bin_width=1e-3,
                                  min_bin_height=1e-3, min_derivative=1e-3, **kwargs):
        if (not kwargs and all(_number(v) for v in (left, right, bottom, top))
                and float_tensors(inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives)
                and unnormalized_widths.shape[-1] >= 2 and inputs.numel() > 0
                and left < right and bottom < top):
            if domain_error is not None and (torch.min(inputs) < left or torch.max(inputs) > right):
                raise domain_error()  # nflows' own check (it tests the inverse's inputs against left/right too)
            from fastflow.ops.rq_spline import rq_spline_bounded

            w, h, d = (t.contiguous() for t in (unnormalized_widths, unnormalized_heights, unnormalized_derivatives))
            return rq_spline_bounded(inputs, w, h, d, inverse=bool(inverse), left=float(left), right=float(right),
                                     bottom=float(bottom), top=float(top), min_bin_width=min_bin_width,
                                     min_bin_height=min_bin_height, min_derivative=min_derivative,
                                     backend=integration.backend)
        return original(inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives,
                        inverse=inverse, left=left, right=right, bottom=bottom, top=top,
                        min_bin_width=min_bin_width, min_bin_height=min_bin_height,
                        min_derivative=min_derivative, **kwargs)

    rational_quadratic_spline.__doc__ = original.__doc__
    rational_quadratic_spline.__wrapped__ = original
    return rational_quadratic_spline
