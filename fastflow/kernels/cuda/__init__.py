"""CUDA C++ kernels from ``csrc/``, loaded through CuPy (ahead-of-time fatbin or NVRTC); see
:mod:`fastflow.kernels.cuda.loader`. Importing this package needs neither CuPy nor a GPU."""

import torch

from fastflow.kernels._facts import LOW, SPLINE, Backend, import_reason


def _probe():
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    return import_reason("cupy")


BACKEND = Backend("cuda", ("cuda",), (torch.float32,) + LOW, _probe, "CUDA C++ kernels via CuPy",
                  ops={**SPLINE, "affine_coupling": "coupling", "additive_coupling": "coupling"})
