"""A test-only backend that wraps the reference: the proof that adding a backend is one kernel
folder (this one) plus one registry line (``fastflow.backends.add_backend``, called by
``tests/conftest.py`` when ``FASTFLOW_TEST_EXTRA_BACKEND`` names this package); the conformance
suite then runs on it with no other change (``tests/ops/test_extra_backend.py``)."""

import torch

from fastflow.kernels._facts import COUPLING, FLOATS, LU, SPLINE, Backend

CALLS = {"count": 0}  # launches through this backend, so the proof can tell it really ran


def wrapping(reference_module):
    """A module ``__getattr__`` that hands out ``reference_module``'s attributes, its launchers
    wrapped to count their calls."""

    def getattr_(name):
        value = getattr(reference_module, name)
        if not callable(value) or name.startswith("_") or isinstance(value, type):
            return value

        def launcher(*args, **kwargs):
            CALLS["count"] += 1
            return value(*args, **kwargs)

        return launcher

    return getattr_

BACKEND = Backend(
    "wrapped", ("cpu",), FLOATS, description="the reference behind a test-only wrapper",
    compute=lambda kernels, dtype, device_type: torch.float64,
    ops={**SPLINE, **COUPLING, **LU}, parameterizations=("nflows", "nflows_bounded", "zuko"),  # the reference's
)
