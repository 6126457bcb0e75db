"""``fastflow.integrations.zuko``: zuko's spline transforms on fastflow's fused spline op.

``accelerate()`` patches ``zuko.transforms.MonotonicRQSTransform`` (used by ``zuko.flows.NSF``
and, composed with a circular shift, ``NCSF``) so that it keeps its raw parameters and evaluates
``__call__``, ``inv``, ``log_abs_det_jacobian`` and ``call_and_ladj`` with
:func:`fastflow.ops.rq_spline.rq_spline_zuko` (the same function: soft-bounded raw values,
softmax, exp slopes, identity outside ``[-bound, bound]``) instead of its chain of softmax,
cumsum, gather and where kernels. Its attributes ``horizontal``, ``vertical`` and
``derivatives`` are still there, computed by zuko's own formulas when first read. Inputs that
the op does not take (half precision, mixed devices) go through zuko's own code.

Tested with zuko 1.6.x.
"""

from __future__ import annotations

import math

import torch

from fastflow.integrations._patch import Integration, float_tensors

__all__ = ["accelerate", "restore", "is_accelerated", "TESTED"]

TESTED = "zuko 1.6.x"
_LAZY = ("horizontal", "vertical", "derivatives")


def _tested(version: str) -> bool:
    return version.split(".")[:2] == ["1", "6"]


def _spline(v, w, h, d, inverse, bound, slope):
    """zuko's spline of ``v`` by fastflow's fused op: (values, log-det).

    zuko's parameters are views into its conditioner's output (``unpack`` splits the last dim),
    which the op copies into contiguous arrays; made contiguous here, once, the op's backward
    reuses them instead of copying them again. Where the arguments are what the op takes (the
    checks of :func:`fastflow.ops.rq_spline.rq_spline_zuko`, done here on what zuko passes),
    the op is called without its public wrapper's argument checks (tens of microseconds per
    call, several calls per step); anything else goes through ``rq_spline_zuko`` itself."""
    from fastflow.ops.rq_spline import _MAX_BINS, _param_backend, _rq_spline_op, rq_spline_zuko

    k = w.shape[-1]
    lead = v.shape
    b, s = bound, slope
    if (type(b) in (float, int) and type(s) in (float, int) and 0.0 < b < math.inf and 0.0 < s < 1.0
            and 2 <= k <= _MAX_BINS and h.shape[-1] == k and d.shape[-1] == k - 1
            and w.shape[:-1] == lead and h.shape[:-1] == lead and d.shape[:-1] == lead):
        name = _param_backend("rq_spline_zuko", v, INTEGRATION.backend, "zuko")
        b, s = float(b), float(s)
        w, h, d = w.contiguous(), h.contiguous(), d.contiguous()
        return _rq_spline_op(v, w, h, d, bool(inverse), b, 0.0, 0.0, s, name, "zuko", -b, b, -b, b)
    return rq_spline_zuko(v, w, h, d, inverse=inverse, bound=float(bound), slope=float(slope),
                          backend=INTEGRATION.backend)


def _targets():
    from zuko.transforms import MonotonicRQSTransform as M

    orig = {name: M.__dict__[name] for name in ("__init__", "_call", "_inverse", "log_abs_det_jacobian",
                                                "call_and_ladj", "bins")}
    base_init = M.__mro__[1].__init__  # torch.distributions.Transform

    def __init__(self, widths, heights, derivatives, bound=5.0, slope=1e-3, **kwargs):
        base_init(self, **kwargs)
        self._fastflow = (widths, heights, derivatives, bound, slope)

    def __getattr__(self, name):
        # only reached when normal lookup fails: zuko's knots of a transform built accelerated
        state = self.__dict__.get("_fastflow")
        if state is None or name not in _LAZY:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        ref = M.__new__(M)
        orig["__init__"](ref, *state)
        for n in _LAZY:
            self.__dict__[n] = ref.__dict__[n]
        return self.__dict__[name]

    def evaluate(self, v, inverse):
        """(values, log-det) by fastflow, or None where zuko's own code must run."""
        state = self.__dict__.get("_fastflow")
        if state is None or "horizontal" in self.__dict__:
            return None
        w, h, d, bound, slope = state
        if not (isinstance(v, torch.Tensor) and float_tensors(w, h, d) and w.shape[-1] >= 2):
            return None
        if v.dtype != w.dtype:
            dtype = torch.promote_types(v.dtype, w.dtype)
            if dtype not in (torch.float32, torch.float64) or v.device != w.device:
                return None
            v, w, h, d = v.to(dtype), w.to(dtype), h.to(dtype), d.to(dtype)
        elif v.device != w.device:
            return None
        lead = v.shape
        if w.shape[:-1] != lead or h.shape[:-1] != lead or d.shape[:-1] != lead:
            shape = torch.broadcast_shapes(lead, w.shape[:-1], h.shape[:-1], d.shape[:-1])
            if v.shape != shape:
                v = v.expand(shape)
        return _spline(v, w, h, d, inverse, bound, slope)

    def _call(self, x):
        r = evaluate(self, x, False)
        return orig["_call"](self, x) if r is None else r[0]

    def _inverse(self, y):
        r = evaluate(self, y, True)
        return orig["_inverse"](self, y) if r is None else r[0]

    def log_abs_det_jacobian(self, x, y):
        r = evaluate(self, x, False)
        return orig["log_abs_det_jacobian"](self, x, y) if r is None else r[1]

    def call_and_ladj(self, x):
        r = evaluate(self, x, False)
        return orig["call_and_ladj"](self, x) if r is None else r

    def bins(self):
        state = self.__dict__.get("_fastflow")
        return state[0].shape[-1] if state is not None else self.horizontal.shape[-1] - 1

    for f in (__init__, _call, _inverse, log_abs_det_jacobian, call_and_ladj):
        f.__qualname__ = f"MonotonicRQSTransform.{f.__name__}"
        f.__doc__ = getattr(orig[f.__name__], "__doc__", None)
    return [
        (M, "__init__", __init__),
        (M, "__getattr__", __getattr__),
        (M, "_call", _call),
        (M, "_inverse", _inverse),
        (M, "log_abs_det_jacobian", log_abs_det_jacobian),
        (M, "call_and_ladj", call_and_ladj),
        (M, "bins", property(bins)),
    ]


INTEGRATION = Integration("zuko", "zuko", _tested, TESTED, _targets)


def accelerate(*, backend: str | None = None, force: bool = False):
    """Route zuko's ``MonotonicRQSTransform`` to fastflow's fused spline op.

    Args:
        backend: fastflow backend for the op (None: the fastest available).
        force: patch even on a zuko version other than 1.6.x (with a warning).

    Returns:
        A handle: ``handle.close()`` (or the end of a ``with accelerate():`` block) turns it off.
    """
    return INTEGRATION.accelerate(backend=backend, force=force)


def restore() -> None:
    """Turn the acceleration off now (zuko's original methods back, the same objects)."""
    INTEGRATION.restore()


def is_accelerated() -> bool:
    return INTEGRATION.is_active()
