"""The reference's spline launchers, called through this test-only backend (every attribute is the
reference module's; the launchers count their calls)."""

from fastflow.kernels.reference import spline as _reference
from tests.ops._wrapped_backend import CALLS


def __getattr__(name):
    value = getattr(_reference, name)
    if not callable(value) or name.startswith("_") or isinstance(value, type):
        return value

    def launcher(*args, **kwargs):
        CALLS["count"] += 1
        return value(*args, **kwargs)

    return launcher
