"""zuko's polynomial laws on fastflow's fused ops, for :mod:`fastflow.integrations.zuko`.

- ``zuko.transforms.BoundedBernsteinTransform`` (zuko's ``BPF``, sbi's ``zuko_bpf``):
  :func:`fastflow.ops.bernstein`. Its constructor is zuko's own, plus a note of the raw ``theta``
  and ``bound`` it was given (a table keyed by the object, dropped with it: zuko keeps the raw
  values only while they require grad).
- ``zuko.transforms.SOSPolynomialTransform`` (``SOSPF``, ``zuko_sospf``):
  :func:`fastflow.ops.sos_polynomial`, from the raw ``a``, ``bound`` and ``slope`` zuko keeps on
  the object.

``__call__``, ``log_abs_det_jacobian`` and ``call_and_ladj`` give zuko's numbers (float64 to
rounding) without zuko's per-call autograd (its log-det differentiates the map inside the call,
which also keeps zuko's Bernstein flow out of ``torch.compile``). ``inv`` is the fused inverse,
solved to the float64 resolution: zuko bisects on ``[-bound, bound]`` to ``eps = 1e-6``, so
sampling moves by zuko's own bisection error (and for SOS, where zuko clamps beyond
``f(+-bound)``, ours is the inverse). A transform whose values were changed since it was built,
a subclass, another ``eps``, half precision, mixed devices or shapes the op refuses run zuko's own
code, as does a forced backend without the op's kernels and, with none forced, a device where
only the reference (the oracle) has the law.
"""

from __future__ import annotations

import math
import weakref

import torch

from fastflow.integrations._patch import aligned

__all__ = ["targets"]

# id(transform) -> (weakref to it, its theta as zuko's constructor set it, the raw theta, bound)
# (single dict operations, atomic under the GIL, as the spline's table in zuko.py)
_BERNSTEIN: dict = {}
_EPS = 1e-6  # zuko's default eps, the one fastflow's Bernstein op is built for


def _remember(t, theta, bound) -> None:
    key = id(t)

    def forget(ref, key=key):
        entry = _BERNSTEIN.get(key)
        if entry is not None and entry[0] is ref:
            _BERNSTEIN.pop(key, None)

    _BERNSTEIN[key] = (weakref.ref(t, forget), t.__dict__.get("theta"), theta, bound)


def _runs(op: str, integration, v) -> bool:
    """Whether fastflow has a fast path for ``op`` at ``v``: the forced backend's kernels, or
    with none forced a compiled backend for ``v``'s device (the reference is the oracle, not
    faster than zuko's own code: a GPU without a Triton kernel for the law keeps zuko's)."""
    from fastflow.backends import BACKENDS, resolve_backend

    name = integration.backend
    if name is not None:
        return op in BACKENDS[name].ops
    return resolve_backend(op, v) != "reference"


def _bernstein(t, v, inverse, integration):
    """(values, log-det) of the Bernstein transform ``t`` at ``v`` by fastflow, or None."""
    from zuko.transforms import BoundedBernsteinTransform

    entry = _BERNSTEIN.get(id(t))
    if entry is None or entry[0]() is not t or type(t) is not BoundedBernsteinTransform:
        return None
    _, theta_set, theta, bound = entry
    if t.__dict__.get("theta") is not theta_set or t.bound != bound or t.eps != _EPS:
        return None
    if type(bound) not in (float, int) or not 0.0 < bound < math.inf:
        return None
    got = aligned(v, (theta,), 1)
    if got is None:
        return None
    v, (theta,) = got
    if not 2 <= theta.shape[-1] <= 507 or not _runs("bernstein", integration, v):
        return None
    from fastflow.ops import bernstein

    return bernstein(v, theta, inverse=inverse, bound=float(bound), backend=integration.backend)


def _sos(t, v, inverse, integration):
    """(values, log-det) of the SOS transform ``t`` at ``v`` by fastflow, or None."""
    from zuko.transforms import SOSPolynomialTransform

    if type(t) is not SOSPolynomialTransform:
        return None
    d = t.__dict__
    a, bound, slope = d.get("a"), d.get("bound"), d.get("slope")
    if not (isinstance(a, torch.Tensor) and type(bound) in (float, int) and type(slope) in (float, int)
            and 0.0 < bound < math.inf and 0.0 < slope < math.inf and "g" not in d):
        return None
    got = aligned(v, (a,), 2)
    if got is None:
        return None
    v, (a,) = got
    from fastflow.ops import sos_polynomial
    from fastflow.ops.polynomial import MAX_SOS_DEGREE

    if a.shape[-1] - 1 > MAX_SOS_DEGREE or not _runs("sos_polynomial", integration, v):
        return None
    return sos_polynomial(v, a, inverse=inverse, bound=float(bound), slope=float(slope),
                          backend=integration.backend)


def _methods(cls, evaluate, integration):
    """The patched ``_call``, ``_inverse``, ``log_abs_det_jacobian`` and ``call_and_ladj`` of
    ``cls``: ``evaluate(t, v, inverse, integration)``, else zuko's own (looked up on ``cls``)."""
    orig = {name: getattr(cls, name) for name in ("_call", "_inverse", "log_abs_det_jacobian", "call_and_ladj")}

    def _call(self, x):
        r = evaluate(self, x, False, integration)
        return orig["_call"](self, x) if r is None else r[0]

    def _inverse(self, y):
        r = evaluate(self, y, True, integration)
        return orig["_inverse"](self, y) if r is None else r[0]

    def log_abs_det_jacobian(self, x, y):
        r = evaluate(self, x, False, integration)
        return orig["log_abs_det_jacobian"](self, x, y) if r is None else r[1]

    def call_and_ladj(self, x):
        r = evaluate(self, x, False, integration)
        return orig["call_and_ladj"](self, x) if r is None else r

    out = []
    for f in (_call, _inverse, log_abs_det_jacobian, call_and_ladj):
        f.__qualname__ = f"{cls.__name__}.{f.__name__}"
        f.__doc__ = getattr(orig[f.__name__], "__doc__", None)
        f.__wrapped__ = orig[f.__name__]
        out.append((cls, f.__name__, f))
    return out


def targets(integration) -> list:
    """``(owner, attribute, replacement)`` for both laws' classes."""
    from zuko.transforms import BoundedBernsteinTransform, SOSPolynomialTransform

    init = BoundedBernsteinTransform.__init__

    def __init__(self, theta, bound=5.0, **kwargs):
        init(self, theta, bound=bound, **kwargs)
        _remember(self, theta, bound)

    __init__.__qualname__ = "BoundedBernsteinTransform.__init__"
    __init__.__doc__ = init.__doc__
    __init__.__wrapped__ = init
    return ([(BoundedBernsteinTransform, "__init__", __init__)]
            + _methods(BoundedBernsteinTransform, _bernstein, integration)
            + _methods(SOSPolynomialTransform, _sos, integration))
