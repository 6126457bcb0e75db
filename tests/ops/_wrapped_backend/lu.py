"""The reference's lu launchers, called through this test-only backend."""

from fastflow.kernels.reference import lu as _reference
from tests.ops._wrapped_backend import wrapping

__getattr__ = wrapping(_reference)
