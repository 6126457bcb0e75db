"""``fastflow.integrations.zuko``: zuko's spline and polynomial transforms on fastflow's fused ops.

The polynomial laws (``BoundedBernsteinTransform`` of zuko's ``BPF``, ``SOSPolynomialTransform``
of its ``SOSPF``) go to :func:`fastflow.ops.bernstein` and :func:`fastflow.ops.sos_polynomial`
(``fastflow/integrations/_zuko_laws.py`` says how). The rest of this docstring is the spline's.

``accelerate()`` patches ``zuko.transforms.MonotonicRQSTransform`` (used by ``zuko.flows.NSF``
and, composed with a circular shift, ``NCSF``) so that ``__call__``, ``inv``,
``log_abs_det_jacobian`` and ``call_and_ladj`` run :func:`fastflow.ops.rq_spline.rq_spline_zuko`
(the same function: soft-bounded raw values, softmax, exp slopes, identity outside
``[-bound, bound]``) instead of zuko's chain of searchsorted, gather and where kernels.

A transform built while accelerated is zuko's own object, with one difference while the
acceleration is on: its knots (``horizontal``, ``vertical``, ``derivatives``: a soft bound, two
softmaxes, two cumsums and an exp of the raw parameters, which the fused op recomputes inside its
kernel) are computed on first access, by zuko's own constructor code under the grad mode of the
construction, not at construction. zuko builds one transform per call of a flow (and per pass of
an autoregressive inverse), so this is most of what an accelerated zuko NSF spent outside its
conditioner (measured on a 2-core CPU, NSF of 8 features, 5 transforms, batch 512: the
accelerated train step 1.7x and sampling 3x faster than with the knots computed at construction).
Everything that reads a transform from outside computes them first: an attribute access,
pickling and ``copy.deepcopy`` (``__getstate__``), and ``restore()`` (or the last ``close()``)
computes them for every transform built while accelerated that is still alive, before zuko's
own methods come back, so afterwards every object is exactly the one zuko's constructor makes.
The raw ``widths, heights, derivatives, bound, slope`` the fused op needs are remembered beside
the transform (a table keyed by the object, dropped with it), not on it; a patched method uses
the fused op when the object's knots are still the ones zuko computes from those values (never
assigned since), and zuko's own code otherwise (a transform built before the call, a copy,
knots assigned since). Inputs or parameters the op does not take (half precision, mixed
devices, more than 1024 bins, a tensor bound) go through zuko's own code too.

``zuko.nn.MaskedLinear`` (every zuko autoregressive and coupling conditioner) multiplies its
weight by its boolean mask on every call, converting the mask to the weight's dtype each time
(and again in the backward): accelerated, the converted mask is kept (per mask tensor, its
version, dtype and device; dropped with the mask) and multiplied instead, the same numbers bit
for bit (measured: 5-20 us of a 40-120 us layer at batch 512). Under ``torch.compile`` and
inference mode it runs zuko's own ``forward``.

Tested with zuko 1.6.x.
"""

from __future__ import annotations

import math
import weakref

import torch

from fastflow.integrations._patch import Integration, aligned

__all__ = ["accelerate", "restore", "is_accelerated", "TESTED"]

TESTED = "zuko 1.6.x"

# id(transform) -> (weakref to it, its horizontal, vertical, derivatives as zuko's constructor
# set them (None: not computed yet), the raw widths, heights, derivatives, bound, slope it was
# built from, and whether grad mode was on when it was built)
# (single dict operations, atomic under the GIL: no lock, which a weakref callback run by the
# garbage collector inside a locked section would deadlock on)
_RAW: dict = {}
_KNOTS = ("horizontal", "vertical", "derivatives")
_ZUKO_INIT: list = []  # zuko's own MonotonicRQSTransform.__init__ (set when the patch is made)


def _tested(version: str) -> bool:
    return version.split(".")[:2] == ["1", "6"]


def _remember(t, widths, heights, derivatives, bound, slope, grad=None) -> None:
    key = id(t)

    def forget(ref, key=key):
        # called while ``t`` is freed, before its id can be reused
        entry = _RAW.get(key)
        if entry is not None and entry[0] is ref:
            _RAW.pop(key, None)

    d = t.__dict__
    entry = (weakref.ref(t, forget), d.get("horizontal"), d.get("vertical"), d.get("derivatives"),
             widths, heights, derivatives, bound, slope, torch.is_grad_enabled() if grad is None else grad)
    _RAW[key] = entry


def _materialize(t) -> bool:
    """Compute the knots of a transform built while accelerated, if they are not there yet, by
    zuko's own constructor code (on a scratch object) under the grad mode of the construction;
    knots assigned since are kept. Returns whether ``t`` is one such transform."""
    entry = _RAW.get(id(t))
    if entry is None or entry[0]() is not t:
        return False
    d = t.__dict__
    missing = [n for n in _KNOTS if n not in d]
    if not missing:
        return True
    scratch = object.__new__(type(t))
    with torch.set_grad_enabled(entry[9]):
        _ZUKO_INIT[0](scratch, *entry[4:9])
    knots = list(entry[1:4])
    for i, n in enumerate(_KNOTS):
        if n in missing:
            knots[i] = d[n] = scratch.__dict__[n]
    if _RAW.get(id(t)) is entry:  # the fused op still applies: its knots are zuko's own now
        _RAW[id(t)] = (entry[0], *knots, *entry[4:])
    return True


def _materialize_all() -> None:
    for entry in list(_RAW.values()):
        t = entry[0]()
        if t is not None:
            _materialize(t)


def _raw(t):
    """The raw parameters ``t`` was built from, if its knots are still the ones zuko computed
    from them (else None)."""
    entry = _RAW.get(id(t))
    if entry is None or entry[0]() is not t:
        return None
    d = t.__dict__  # a knot absent (None in the entry) and still absent: not computed yet
    if d.get("horizontal") is not entry[1] or d.get("vertical") is not entry[2] or \
            d.get("derivatives") is not entry[3]:
        return None
    return entry[4:9]


# id(mask) -> (weakref to it, its version, the dtype and device converted to, the float mask)
_MASKS: dict = {}


def _float_mask(mask, weight):
    """``mask`` (bool) as ``weight``'s dtype and device, converted once per mask version."""
    key = id(mask)
    entry = _MASKS.get(key)
    if entry is not None and entry[0]() is mask and entry[1] == mask._version and entry[2] == weight.dtype \
            and entry[3] == weight.device:
        return entry[4]

    def forget(ref, key=key):
        e = _MASKS.get(key)
        if e is not None and e[0] is ref:
            _MASKS.pop(key, None)

    f = mask.to(weight.dtype)
    _MASKS[key] = (weakref.ref(mask, forget), mask._version, weight.dtype, weight.device, f)
    return f


def _masked_linear_forward(original):
    import torch.nn.functional as F

    def forward(self, x):
        mask, weight = self.mask, self.weight
        if (type(mask) is torch.Tensor and mask.dtype is torch.bool and weight.dtype in (torch.float32, torch.float64)
                and mask.device == weight.device and not torch.is_inference_mode_enabled()
                and not torch.compiler.is_compiling()):
            return F.linear(x, _float_mask(mask, weight) * weight, self.bias)
        return original(self, x)

    forward.__qualname__ = "MaskedLinear.forward"
    forward.__doc__ = original.__doc__
    forward.__wrapped__ = original
    return forward


def _spline(v, w, h, d, inverse, bound, slope):
    """zuko's spline of ``v`` by fastflow's fused op: (values, log-det); the arguments are
    what the op takes (checked by ``evaluate``).

    zuko's parameters are views into its conditioner's output (``unpack`` splits the last dim),
    which the op copies into contiguous arrays; made contiguous here, once, the op's backward
    reuses them instead of copying them again. The op is called without its public wrapper's
    argument checks (tens of microseconds per call, several calls per step): ``evaluate`` asked
    the op's own predicate first."""
    from fastflow.ops.rq_spline import rq_spline_unchecked

    w, h, d = w.contiguous(), h.contiguous(), d.contiguous()
    return rq_spline_unchecked(v, w, h, d, parameterization="zuko", inverse=inverse, tail_bound=bound, slope=slope,
                               backend=INTEGRATION.backend)


def evaluate(t, v, inverse):
    """(values, log-det) of transform ``t`` at ``v`` by fastflow, or None where zuko's own code
    must run."""
    raw = _raw(t)
    if raw is None:
        return None
    w, h, d, bound, slope = raw
    if not (type(bound) in (float, int) and type(slope) in (float, int) and 0.0 < bound < math.inf
            and 0.0 < slope < 1.0):
        return None
    got = aligned(v, (w, h, d), 1)
    if got is None:
        return None
    v, (w, h, d) = got
    from fastflow.ops.rq_spline import rq_spline_accepts

    if not rq_spline_accepts(v, w, h, d, parameterization="zuko", tail_bound=bound, slope=slope):
        return None  # bins, slopes or shapes the op refuses: zuko's own code (and its own errors)
    return _spline(v, w, h, d, inverse, bound, slope)


def _targets():
    from zuko.transforms import MonotonicRQSTransform as M

    orig = {name: M.__dict__[name] for name in ("__init__", "_call", "_inverse", "log_abs_det_jacobian",
                                                "call_and_ladj")}
    init = orig["__init__"]
    _ZUKO_INIT[:] = [init]
    base = super(M, M)

    def __init__(self, widths, heights, derivatives, bound=5.0, slope=1e-3, **kwargs):
        # zuko's constructor without its knots (computed on first access: see _materialize)
        base.__init__(self, **kwargs)
        _remember(self, widths, heights, derivatives, bound, slope)
        if not INTEGRATION.is_active():  # restored meanwhile (another thread): zuko's object now
            _materialize(self)

    def __getattr__(self, name):
        if name in _KNOTS and _materialize(self) and name in self.__dict__:
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __getstate__(self):
        _materialize(self)
        return base.__getstate__(self)

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

    for f in (__init__, _call, _inverse, log_abs_det_jacobian, call_and_ladj):
        f.__qualname__ = f"MonotonicRQSTransform.{f.__name__}"
        f.__doc__ = getattr(orig[f.__name__], "__doc__", None)
        f.__wrapped__ = orig[f.__name__]
    for f in (__getattr__, __getstate__):
        f.__qualname__ = f"MonotonicRQSTransform.{f.__name__}"
    from zuko.nn import MaskedLinear

    from fastflow.integrations import _zuko_laws

    spline = [(M, name, f) for name, f in (("__init__", __init__), ("_call", _call), ("_inverse", _inverse),
                                           ("log_abs_det_jacobian", log_abs_det_jacobian),
                                           ("call_and_ladj", call_and_ladj), ("__getattr__", __getattr__),
                                           ("__getstate__", __getstate__))]
    masks = [(MaskedLinear, "forward", _masked_linear_forward(MaskedLinear.__dict__["forward"]))]
    return _zuko_laws.targets(INTEGRATION) + spline + masks


INTEGRATION = Integration("zuko", "zuko", _tested, TESTED, _targets, required=("zuko",),
                          before_undo=_materialize_all)


accelerate, restore, is_accelerated = INTEGRATION.public_functions(
    __name__, "Route zuko's ``MonotonicRQSTransform``, ``BoundedBernsteinTransform`` and "
    "``SOSPolynomialTransform`` to fastflow's fused ops.")
