"""Triton GPU kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``, which is how they
are tested without a GPU). float32/float16/bfloat16 computed in float32; float64 computed in
float64 for the spline, coupling and Bernstein ops (the LU kernels stay float32-only)."""

import torch

from fastflow.kernels._facts import (BERNSTEIN, COUPLING, LOW, LU, SPLINE, Backend, import_reason,
                                     interpreting)


def _probe():
    reason = import_reason("triton")
    if reason:
        return reason
    if not torch.cuda.is_available() and not interpreting():
        return "no CUDA device visible to torch (set TRITON_INTERPRET=1 to run on the CPU interpreter)"
    return None


BACKEND = Backend(
    "triton", ("cuda",), (torch.float32,) + LOW, _probe, "fused Triton GPU kernels",
    op_dtypes={op: (torch.float64,) for op in ("rq_spline", "affine_coupling", "additive_coupling", "rescale",
                                              "bernstein")},
    cpu_when=interpreting, ops={**SPLINE, **COUPLING, **LU, **BERNSTEIN},
    parameterizations=("nflows", "nflows_bounded", "zuko"),  # its KIND branches (kernels/triton/spline.py)
)
