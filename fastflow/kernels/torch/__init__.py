"""The ``torch`` backend: tuned plain-PyTorch paths, differentiated by autograd (no custom op).

Reached through the routes in :mod:`fastflow.backends` (small or nothing-to-fuse inputs) or
by ``backend="torch"``. Unlike :mod:`fastflow.kernels.reference` (the readable oracle, computed
in float64 on the CPU), these run in the inputs' dtype, for speed.
"""
