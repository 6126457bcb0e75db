"""The ``torch`` backend: the LU maps' tuned plain-PyTorch launchers (GEMM layouts, a validated
``W^-1`` cache on the CPU), inside the custom op like every other backend's kernels; the default
for the LU ops wherever the fused backends decline, before the oracle. Unlike
:mod:`fastflow.kernels.reference` (the readable oracle, computed in float64 on the CPU), it runs
in the inputs' dtype (16-bit storage in float32), for speed.
"""

from fastflow.kernels._facts import FLOATS, LOW, LU, Backend

BACKEND = Backend(
    "torch", ("any",), FLOATS + LOW, description="tuned plain PyTorch (LU GEMM layouts and W^-1 cache)",
    ops={**LU},
)
