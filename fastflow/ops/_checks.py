"""Argument checks shared by the functional ops: clear errors naming the argument."""

from __future__ import annotations

import math

import torch


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
