"""ODE solves that ``torch.export`` can trace: the CNF's exported programs.

Eager CNF solves go through ``torchdiffeq`` (adopted: adjoint, every method, its step control).
Its adaptive loop decides in Python (``while t < t1``, asserts on tensor values), which an
exported program cannot do; this module re-states the same algorithms without host syncs, so
an exported CNF runs the solve eager runs:

- fixed grids (``euler``, ``midpoint``, ``rk4`` as torchdiffeq's 3/8-rule ``rk4``): torchdiffeq's
  grid (``ceil((t1 - t0) / h + 1)`` points, the last one moved onto ``t1``) unrolled, the grid
  computed here in the state's dtype as torchdiffeq computes it;
- ``dopri5``: torchdiffeq's step control (Hairer's initial step, the mixed RMS error norm over the
  state's parts, safety 0.9, growth at most 10, shrink at most 0.2 after a rejected step, the
  fourth-order interpolant to land on ``t1``) inside one ``while_loop``, time in float64 and
  stages in the state's dtype, as torchdiffeq does.

The state is flat (``torch.cat`` of its parts, as torchdiffeq's tuple wrapper makes it), and a
decreasing time span is integrated as ``-f(-t, y)`` over increasing time, as torchdiffeq does.
Where torchdiffeq raises (more than ``max_num_steps`` steps, a step underflowing, a non-finite
state), :func:`solve` returns NaN instead: a traced program cannot raise on data. The tests hold
both against ``torchdiffeq.odeint`` on the same field.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fastflow.nn._loop import while_loop

__all__ = ["solve", "TRACED_METHODS"]

TRACED_METHODS = ("euler", "midpoint", "rk4", "dopri5")

_NP = {torch.float16: np.float16, torch.bfloat16: np.float32, torch.float32: np.float32, torch.float64: np.float64}

# Dormand-Prince 5(4) (torchdiffeq's dopri5 tableau, the same fractions)
_ALPHA = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_BETA = (
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_C_ERROR = (35 / 384 - 1951 / 21600, 0.0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
            -2187 / 6784 - -12231 / 42400, 11 / 84 - 649 / 6300, -1.0 / 60.0)
_C_MID = (6025192743 / 30085553152 / 2, 0.0, 51252292925 / 65400821598 / 2, -2691868925 / 45128329728 / 2,
          187940372067 / 1594534317056 / 2, -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2)
_SAFETY, _IFACTOR, _DFACTOR, _ORDER = 0.9, 10.0, 0.2, 5


def _combine(y0, ks, coeffs, dt):
    """``y0 + sum_j k_j (c_j dt)`` (torchdiffeq's ``torch.sum(k * (dt * c), -1)``, as a stack)."""
    k = torch.stack(ks, dim=-1)
    c = torch.tensor(coeffs[:len(ks)], dtype=y0.dtype, device=y0.device)
    return y0 + torch.sum(k * (dt * c), dim=-1)


def _fixed(f, y, t0, t1, method, step_size):
    dtype = _NP[y.dtype]
    start, end = dtype(t0), dtype(t1)
    n = int(math.ceil(float((end - start) / dtype(step_size) + dtype(1))))
    grid = np.arange(0, n, dtype=dtype) * dtype(step_size) + start
    grid[-1] = end
    for a, b in zip(grid[:-1], grid[1:]):
        ta, tb = float(a), float(b)
        dt = float(dtype(b - a))
        f0 = f(ta, y)
        if method == "euler":
            dy = dt * f0
        elif method == "midpoint":
            half = float(dtype(0.5) * dtype(dt))
            dy = dt * f(float(dtype(ta) + dtype(half)), y + f0 * half)
        else:  # torchdiffeq's rk4: the 3/8 rule
            k1 = f0
            k2 = f(float(dtype(ta) + dtype(dt) * dtype(1 / 3)), y + dt * k1 * (1 / 3))
            k3 = f(float(dtype(ta) + dtype(dt) * dtype(2 / 3)), y + dt * (k2 - k1 * (1 / 3)))
            k4 = f(tb, y + dt * (k1 - k2 + k3))
            dy = (k1 + 3 * (k2 + k3) + k4) * dt * 0.125
        y = y + dy
    return y


def _dopri5(f, y0, t0, t1, rtol, atol, max_num_steps, norm):
    dev, ydt = y0.device, y0.dtype

    def T(v):  # a float64 scalar (torchdiffeq keeps time in float64)
        return torch.full((), v, dtype=torch.float64, device=dev)

    def ft(t):  # the field sees time in the state's dtype
        return t.to(ydt)

    t_start, t_end = T(t0), T(t1)
    f0 = f(ft(t_start), y0)
    # Hairer's initial step (torchdiffeq's _select_initial_step, order 4)
    scale = atol + torch.abs(y0) * rtol
    d0, d1 = norm(y0 / scale).abs(), norm(f0 / scale).abs()
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1).abs()
    f1 = f(ft(t_start + h0), y0 + h0 * f0)
    d2 = torch.abs(norm((f1 - f0) / scale) / h0)
    h1 = torch.where((d1 <= 1e-15) & (d2 <= 1e-15), torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3),
                     (0.01 / torch.maximum(d1, d2)) ** (1.0 / float(_ORDER)))
    dt = torch.minimum(100 * h0, h1.abs()).to(torch.float64)

    def unfinished(it, y, fy, ta, tb, dt, c0, c1, c2, c3, c4, failed):
        return (tb < t_end) & (it < max_num_steps) & ~failed

    def step(it, y, fy, ta, tb, dt, c0, c1, c2, c3, c4, failed):
        dt = torch.where(torch.isfinite(dt), dt, torch.zeros_like(dt)).clamp(min=0.0)
        t_next = tb + dt
        failed = ~(t_next > tb) | ~torch.isfinite(y).all()
        s0, sdt, s1 = tb.to(ydt), dt.to(ydt), t_next.to(ydt)
        ks = [fy]
        yi = y
        for alpha, beta in zip(_ALPHA, _BETA):
            ti = s1 if alpha == 1.0 else s0 + alpha * sdt
            yi = _combine(y, ks, beta, sdt)
            ks.append(f(ti, yi))
        y1 = yi  # dopri5's solution weights are its last stage's (FSAL)
        err = torch.sum(torch.stack(ks, -1) * (sdt * torch.tensor(_C_ERROR, dtype=ydt, device=dev)), dim=-1)
        ratio = norm(err / (atol + rtol * torch.maximum(y.abs(), y1.abs()))).abs()
        accept = (ratio <= 1) | (dt <= 0)
        # the interpolant through the step (torchdiffeq's _interp_fit with the dopri5 midpoint)
        y_mid = _combine(y, ks, _C_MID, sdt.to(ydt))
        fa, fb = ks[0], ks[-1]
        a = 2 * sdt * (fb - fa) - 8 * (y1 + y) + 16 * y_mid
        b = sdt * (5 * fa - 3 * fb) + 18 * y + 14 * y1 - 32 * y_mid
        c = sdt * (fb - 4 * fa) - 11 * y - 5 * y1 + 16 * y_mid
        coeffs = (y, sdt * fa, c, b, a)
        # the next step (torchdiffeq's _optimal_step_size)
        r = ratio.to(torch.float64)
        dfactor = torch.where(r < 1, torch.ones_like(r), torch.full_like(r, _DFACTOR))
        factor = torch.minimum(torch.full_like(r, _IFACTOR),
                               torch.maximum(_SAFETY / r ** (1.0 / _ORDER), dfactor))
        dt_next = torch.where(r == 0, dt * _IFACTOR, dt * factor).clamp(min=0.0)
        keep = accept & ~failed
        new_c = tuple(torch.where(keep, n, o) for n, o in zip(coeffs, (c0, c1, c2, c3, c4)))
        return (it + 1, torch.where(keep, y1, y), torch.where(keep, fb, fy), tb.clone(), torch.where(keep, t_next, tb),
                dt_next, *new_c, failed)

    zero = torch.zeros((), dtype=torch.int64, device=dev)
    carry = (zero, y0, f0, t_start, t_start, dt, y0, torch.zeros_like(y0), torch.zeros_like(y0),
             torch.zeros_like(y0), torch.zeros_like(y0), torch.zeros((), dtype=torch.bool, device=dev))
    _, _, _, ta, tb, _, c0, c1, c2, c3, c4, failed = while_loop(unfinished, step, carry)
    x = ((t_end - ta) / (tb - ta)).to(ydt)
    out = c0 + x * c1
    power = x
    for coeff in (c2, c3, c4):
        power = power * x
        out = out + power * coeff
    ok = (tb >= t_end) & ~failed
    return torch.where(ok, out, torch.full_like(out, math.nan))


def solve(f, y0, t0, t1, method, *, step_size=None, rtol=None, atol=None, max_num_steps=None, parts=None):
    """``y(t1)`` for ``dy/dt = f(t, y)``, ``y(t0) = y0`` (a flat tensor), as ``torchdiffeq.odeint``
    with ``method`` gives it. ``f(t, y)`` gets ``t`` as a Python float (fixed grids) or a 0-dim
    tensor in ``y0``'s dtype (dopri5). ``parts``: the lengths of the state's parts, for the mixed
    RMS norm (default: one part)."""
    if method not in TRACED_METHODS:
        raise ValueError(f"method={method!r}: the traced solver has {TRACED_METHODS}")
    if t1 < t0:  # torchdiffeq integrates -f(-t, y) over increasing time
        def g(t, y):
            return -f(-t, y)
        return solve(g, y0, -t0, -t1, method, step_size=step_size, rtol=rtol, atol=atol,
                     max_num_steps=max_num_steps, parts=parts)
    if method != "dopri5":
        return _fixed(f, y0, t0, t1, method, step_size)
    sizes = list(parts) if parts else None

    def norm(v):
        pieces = torch.split(v, sizes) if sizes else (v,)
        out = None
        for p in pieces:
            r = p.abs().pow(2).mean().sqrt()
            out = r if out is None else torch.maximum(out, r)
        return out

    rt = torch.tensor(rtol, dtype=torch.float64, device=y0.device)
    at = torch.tensor(atol, dtype=torch.float64, device=y0.device)
    return _dopri5(f, y0, t0, t1, rt, at, max_num_steps, norm)
