"""Strided ``(B, M, N)`` views of ``(B, ...)`` tensors: how the coupling ops hand any layout
(channel halves, interleaved conditioner columns, channels-last, expanded gradients) to the
kernels without copying what a view can express."""

from __future__ import annotations

import functools
import math

__all__ = ["as_3d"]


def _breaks(shape, stride) -> set[int]:
    """Boundaries ``i`` (between event dims ``i`` and ``i+1``) across which a tensor of event
    ``shape`` and ``stride`` cannot merge."""
    out = set()
    prev = None  # the last event dim of size > 1
    for i, n in enumerate(shape):
        if n == 1:
            continue
        if prev is not None and stride[prev] != stride[i] * n:
            out.update(range(prev, i))  # every boundary between the two dims
        prev = i
    return out


def _split(tensors) -> int | None:
    """The event split ``(M, N) = (dims <= p, dims > p)`` needing the fewest copies (None: M=1)."""
    return _split_layouts(tuple((tuple(t.shape[1:]), t.stride()[1:]) for t in tensors))


@functools.lru_cache(maxsize=4096)
def _split_layouts(layouts) -> int | None:
    # A pure function of the event shapes and strides, which repeat from call to call (a layer
    # sees the same layouts every step): cached, as it costs ~20 us of Python per call.
    per = [_breaks(shape, stride) for shape, stride in layouts]
    candidates = [None] + sorted(set().union(*per))
    cost = lambda p: sum(1 for br in per if br - ({p} if p is not None else set()))  # noqa: E731
    return min(candidates, key=lambda p: (cost(p), p is not None))


def as_3d(tensors, split: int | None = "auto"):
    """``(B, ...)`` tensors of one shape as ``(B, M, N)`` views; a tensor whose layout cannot be
    expressed so is copied (the last resort: channel halves and interleaved columns never are)."""
    if split == "auto":
        split = _split(tensors)
    event = tensors[0].shape[1:]
    if split is None:
        m, n = 1, math.prod(event)
    else:
        m, n = math.prod(event[: split + 1]), math.prod(event[split + 1 :])
    out = []
    for t in tensors:
        b = t.shape[0]
        try:
            out.append(t.view(b, m, n))
        except RuntimeError:
            out.append(t.contiguous().view(b, m, n))
    return out
