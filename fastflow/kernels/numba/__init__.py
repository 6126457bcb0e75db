"""Numba CPU kernels. Importing a kernel module (``spline``, ``coupling``, ``lu``) starts numba's
thread pool with passive waiting, so that it does not spin against PyTorch's (see ``_threads``);
importing this package only declares the backend's facts (no numba import)."""

import torch

from fastflow.kernels._facts import FLOATS, Backend, import_reason


def _probe():
    return import_reason("numba")


def _compute(kernels, dtype, device_type):
    # the elementwise kernels accumulate float32 in float64; the LU data pass is torch's GEMM
    return torch.float64 if kernels in ("spline", "coupling") and dtype == torch.float32 else None


BACKEND = Backend("numba", ("cpu",), FLOATS, _probe, "fused parallel Numba CPU kernels", compute=_compute)
