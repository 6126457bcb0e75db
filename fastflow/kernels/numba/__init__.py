"""Numba CPU kernels. Importing this package starts numba's thread pool with passive waiting,
so that it does not spin against PyTorch's (see ``_threads``)."""

from fastflow.kernels.numba import _threads

_threads.start()
