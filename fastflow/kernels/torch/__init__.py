"""The ``torch`` backend: tuned plain-PyTorch paths, differentiated by autograd (no custom op).

Reached through the routes in :mod:`fastflow.backends` (small or nothing-to-fuse inputs) or
by ``backend="torch"``. Unlike :mod:`fastflow.kernels.reference` (the readable oracle, computed
in float64 on the CPU), these run in the inputs' dtype, for speed.
"""

from fastflow.kernels._facts import COUPLING, FLOATS, LOW, LU, Backend

# The LU ops' kernels are launchers inside the custom op (and the default wherever the fused
# backends decline, before the oracle); the coupling ops' are plain differentiable torch ops
# called outside it, reached through the registry's routes. Computes in the storage dtype
# (16-bit storage in float32).
BACKEND = Backend(
    "torch", ("any",), FLOATS + LOW,
    description="tuned plain PyTorch (LU GEMM layouts and W^-1 cache; the small-input coupling routes)",
    default_ops=tuple(LU), ops={**COUPLING, **LU}, outside_op=tuple(COUPLING),
)
