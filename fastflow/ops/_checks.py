"""Argument checks shared by the functional ops: clear errors naming the argument."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from fastflow.kernels.torch.lu import tensor_version as _version


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {str(t.dtype).replace('torch.', '')}, device {t.device}"


def check_tensor(name: str, t, *, op: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must have a floating dtype (float16/bfloat16/float32/float64), "
                        f"got {describe(t)}")
    return t


def check_same(op: str, named: dict[str, torch.Tensor]) -> None:
    """All tensors share the first one's dtype and device."""
    (n0, t0), *rest = named.items()
    for name, t in rest:
        if t.device != t0.device:
            raise ValueError(f"{op}: {name} is on device {t.device} but {n0} is on {t0.device}; "
                             "move them to one device")
        if t.dtype != t0.dtype:
            raise TypeError(
                f"{op}: {name} has dtype {str(t.dtype).replace('torch.', '')} but {n0} has "
                f"{str(t0.dtype).replace('torch.', '')}; cast them to one dtype"
            )


def check_positive_float(op: str, name: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a number, got {value!r}")
    if isinstance(value, (torch.SymFloat, torch.SymInt)):
        v = value  # dynamic shapes under torch.compile: checked by comparisons (guards), no float()
    else:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{op}: {name} must be a number, got {value!r}") from None
    # comparisons rather than math.isfinite, which torch.compile cannot trace on a SymFloat
    if v != v or v == math.inf or v < 0 or (v == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{op}: {name} must be a finite {kind} number, got {value!r}")
    return v


def check_bool(op: str, name: str, value) -> bool:
    """A flag that must be a real boolean: ``inverse="False"`` or ``[0]`` would otherwise be truthy
    and silently select the other map."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    raise TypeError(f"{op}: {name} must be True or False, got {value!r} ({type(value).__name__})")


class CheckMemo:
    """Remembers argument checks that passed, by everything they read: the tensors' shapes,
    dtypes, devices and types and the other arguments' types and values.

    An op's checks cost microseconds of Python per call, the same for every call of a training
    loop; the key costs a fraction of that. Only successes are remembered (a failing call runs
    the checks and raises each time); NaN never equals itself, so it never hits. Not used while
    torch.compile traces (symbolic sizes; the checks run once there anyway).
    """

    __slots__ = ("_seen",)

    def __init__(self):
        self._seen: dict = {}

    @staticmethod
    def key(tensors, scalars):
        if any(isinstance(v, torch.Tensor) for v in scalars):  # hashed by id: never remembered
            return None
        try:
            return (tuple((type(t), t.shape, t.dtype, t.device) for t in tensors),
                    tuple((type(v), v) for v in scalars))
        except AttributeError:  # not a tensor: the checks will say so
            return None

    def get(self, key):
        if key is None:
            return None
        try:
            return self._seen.get(key)
        except TypeError:  # an unhashable argument: the checks will say what is wrong with it
            return None

    def check(self, check, tensors, scalars):
        """``check(*tensors, *scalars)``'s result, run once per key (every call while
        torch.compile traces); a failing check raises each time."""
        if torch.compiler.is_compiling():
            return check(*tensors, *scalars)
        key = self.key(tensors, scalars)
        done = self.get(key)
        return done if done is not None else self.put(key, check(*tensors, *scalars))

    def put(self, key, value):
        if key is None:
            return value
        if len(self._seen) > 1024:
            self._seen.clear()
        try:
            self._seen[key] = value
        except TypeError:
            pass
        return value


def check_batch(op: str, named: dict) -> None:
    """Tensors of one floating dtype and device, the first with a batch dimension ``(B, ...)``
    and every other of its shape (the coupling laws' arguments)."""
    for name, t in named.items():
        check_tensor(name, t, op=op)
    check_same(op, named)
    (n0, t0), *rest = named.items()
    if t0.dim() < 1:
        raise ValueError(f"{op}: {n0} must have a batch dimension (B, ...), got {describe(t0)}")
    for name, t in rest:
        if t.shape != t0.shape:
            raise ValueError(f"{op}: {name} must have the shape of {n0} {tuple(t0.shape)}, got {describe(t)}")


_VALIDATED: "OrderedDict[tuple, tuple]" = OrderedDict()


def check_permutation_and_signs(op, perm, sign) -> None:
    """perm is a permutation of 0..C-1 and sign is +-1 (data-dependent: skipped while compiling).

    A (perm, sign) pair once found valid is remembered by ``data_ptr``/``_version`` (the entry
    holds a reference, so the address cannot be reused): on GPUs a check would cost a device
    sync, on the CPU ~20 us a call. CPU hits are confirmed against a snapshot (two small
    ``torch.equal``), which also catches writes through ``.data`` that bump no version.
    """
    if torch.compiler.is_compiling():
        return
    try:
        key = tuple((t.data_ptr(), _version(t), t.stride(), t.shape, t.dtype) for t in (perm, sign)) + (perm.device,)
    except RuntimeError:  # functorch-wrapped tensors have no data pointer: check without the cache
        key = None
    hit = _VALIDATED.get(key) if key is not None else None
    if hit is not None and (perm.device.type != "cpu" or (torch.equal(hit[2], perm) and torch.equal(hit[3], sign))):
        return
    c = perm.numel()
    if not torch.equal(torch.sort(perm).values, torch.arange(c, device=perm.device, dtype=perm.dtype)):
        got = perm.tolist() if c <= 32 else describe(perm)
        raise ValueError(f"{op}: perm must be a permutation of 0..{c - 1} (each index exactly once), got {got}")
    if not bool(((sign == 1) | (sign == -1)).all()):
        raise ValueError(f"{op}: sign must hold only +1 and -1 (the fixed signs of W's diagonal), got {describe(sign)}")
    if key is None:
        return
    snap = (perm.clone(), sign.clone()) if perm.device.type == "cpu" else (None, None)
    _VALIDATED[key] = (perm, sign, *snap)
    while len(_VALIDATED) > 256:
        _VALIDATED.popitem(last=False)


def check_elementwise(op: str, named: dict, dim: str = "parameter") -> None:
    """An elementwise law's arguments: ``inputs`` (the first) and per-element parameters
    ``(..., M)`` whose leading dims equal ``inputs.shape`` or broadcast to it, all of one floating
    dtype and device."""
    for name, t in named.items():
        check_tensor(name, t, op=op)
    check_same(op, named)
    (_, inputs), *params = named.items()
    for name, t in params:
        if t.dim() < 1:
            raise ValueError(f"{op}: {name} needs a trailing {dim} dimension, got {describe(t)}")
        if not broadcasts_to(t.shape[:-1], inputs.shape):
            raise ValueError(f"{op}: {name} must have leading shape {tuple(inputs.shape)} (that of inputs, or "
                             f"broadcastable to it) plus the {dim} dimension, got {describe(t)}")


def check_box(op: str, box) -> tuple:
    """``(left, right, bottom, top)`` finite with ``left < right`` and ``bottom < top``."""
    box = tuple(v if isinstance(v, torch.SymFloat) else float(v) for v in box)
    # comparisons rather than math.isfinite, which torch.compile cannot trace on a SymFloat
    if not all(v == v and v != math.inf and v != -math.inf for v in box) or not (box[0] < box[1] and box[2] < box[3]):
        raise ValueError(f"{op}: needs finite left < right and bottom < top, got left={box[0]}, right={box[1]}, "
                         f"bottom={box[2]}, top={box[3]}")
    return box


def broadcasts_to(leading, shape) -> bool:
    """Whether per-element parameters with leading dims ``leading`` broadcast to ``shape``
    exactly (equal shapes first: torch.broadcast_shapes costs microseconds of Python)."""
    if leading == shape:
        return True
    try:
        return torch.broadcast_shapes(leading, shape) == shape
    except RuntimeError:
        return False
