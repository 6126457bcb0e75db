"""The reference's spline launchers, called through this test-only backend."""

from fastflow.kernels.reference import spline as _reference
from tests.ops._wrapped_backend import wrapping

__getattr__ = wrapping(_reference)
