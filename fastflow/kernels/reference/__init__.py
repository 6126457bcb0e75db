"""The ``reference`` backend: the readable pure-torch oracle (any device and floating dtype;
on the CPU every storage dtype is computed in float64, see ``_precision.upcast``)."""

import torch

from fastflow.kernels._facts import BERNSTEIN, COUPLING, SOS, FLOATS, LOW, LU, SPLINE, Backend

BACKEND = Backend(
    "reference", ("any",), FLOATS + LOW, description="pure PyTorch (oracle)",
    compute=lambda kernels, dtype, device_type: torch.float64 if device_type == "cpu" else None,
    ops={**SPLINE, **COUPLING, **LU, **BERNSTEIN, **SOS},
    parameterizations=("nflows", "nflows_bounded", "zuko"),  # its PROLOGUES (kernels/reference/spline.py)
)
