"""Numba CPU kernels. Importing a kernel module (``spline``, ``coupling``, ``lu``) starts numba's
thread pool with passive waiting, so that it does not spin against PyTorch's (see ``_threads``);
importing this package only declares the backend's facts (no numba import)."""

import torch

from fastflow.kernels._facts import BERNSTEIN, COUPLING, SOS, FLOATS, LU, SPLINE, Backend, import_reason


def _probe():
    return import_reason("numba")


def _compute(kernels, dtype, device_type):
    # the elementwise kernels accumulate float32 in float64; the LU data pass is torch's GEMM
    return torch.float64 if kernels in ("spline", "coupling", "bernstein", "sos") and dtype == torch.float32 else None


# The LU kernels compile the O(C^3) factor algebra as scalar loops, which lose to BLAS on wide
# layers: above this many channels the algebra is the torch backend's (`fastflow bench lu`).
_LU_MAX_CHANNELS = 32

BACKEND = Backend(
    "numba", ("cpu",), FLOATS, _probe, "fused parallel Numba CPU kernels", compute=_compute,
    ops={**SPLINE, **COUPLING, **LU, **BERNSTEIN, **SOS}, limits={"lu_max_channels": _LU_MAX_CHANNELS},
    # the prologues its kernels have (their `kind` branches, kernels/numba/spline.py): a row added to the
    # table is not claimed until the kernels have its branch
    parameterizations=("nflows", "nflows_bounded", "zuko"),
    notes={op: f"compiled factor algebra up to {_LU_MAX_CHANNELS} channels, the torch backend's above; the data "
               "pass is torch's GEMM either way" for op in LU},
)
