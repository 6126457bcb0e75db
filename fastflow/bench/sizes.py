"""Parsing element counts for ``fastflow bench --sizes`` without evaluating anything.

Accepted forms, each a non-negative integer: ``65536``, ``65_536``, ``2**16``, ``2^16``, ``1<<16``,
``1e6`` / ``4.5e3`` (when the value is a whole number), optionally a product of such terms with
``*`` (``3*2**20``). Anything else is an error naming the item.
"""

from __future__ import annotations

import re

__all__ = ["parse_size", "parse_sizes"]

_MAX = 2**40  # far beyond any benchmark; keeps 2**10**10 from taking the machine down
_INT = r"[0-9](?:_?[0-9])*"
_POW = re.compile(rf"^({_INT})\s*(?:\*\*|\^)\s*({_INT})$")
_SHIFT = re.compile(rf"^({_INT})\s*<<\s*({_INT})$")
_SCI = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE]\+?([0-9]+)$")
_PLAIN = re.compile(rf"^{_INT}$")


def _term(text: str) -> int:
    t = text.strip()
    if _PLAIN.match(t):
        return int(t.replace("_", ""))
    m = _POW.match(t)
    if m:
        base, exp = int(m.group(1).replace("_", "")), int(m.group(2).replace("_", ""))
        if base > 1 and exp > 64:
            raise ValueError(f"{text!r} is too large")
        return base**exp
    m = _SHIFT.match(t)
    if m:
        base, shift = int(m.group(1).replace("_", "")), int(m.group(2).replace("_", ""))
        if shift > 64:
            raise ValueError(f"{text!r} is too large")
        return base << shift
    m = _SCI.match(t)
    if m:
        mantissa, exp = m.group(1), int(m.group(2))
        if exp > 15:
            raise ValueError(f"{text!r} is too large")
        whole, _, frac = mantissa.partition(".")
        digits = int((whole or "0") + frac) if (whole or frac) else 0
        scale = exp - len(frac)
        if scale < 0:
            q, r = divmod(digits, 10 ** (-scale))
            if r:
                raise ValueError(f"{text!r} is not a whole number")
            return q
        return digits * 10**scale
    raise ValueError(f"{text!r} is not a size (use forms like 65536, 2**16, 1<<16 or 1e6)")


def parse_size(text: str) -> int:
    """One element count, e.g. ``"2**20"`` -> 1048576, ``"3*2**20"``, ``"1e6"``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{text!r} is not a size")
    value = 1
    for part in _split_product(text):
        value *= _term(part)
        if value > _MAX:
            raise ValueError(f"{text!r} is larger than {_MAX}")
    if value < 1:
        raise ValueError(f"{text!r}: a size must be >= 1")
    return value


def _split_product(text: str) -> list[str]:
    """Split on single ``*`` only (``**`` is a power)."""
    return re.split(r"(?<!\*)\*(?!\*)", text)


def parse_sizes(text: str) -> list[int]:
    """Comma-separated sizes: ``"2**16,2**20"`` -> [65536, 1048576]."""
    items = [t for t in text.split(",")]
    if not items or any(not t.strip() for t in items):
        raise ValueError(f"--sizes {text!r}: expected comma-separated sizes such as 2**16,2**20")
    return [parse_size(t) for t in items]
