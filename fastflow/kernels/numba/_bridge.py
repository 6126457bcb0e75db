"""Torch tensors to the numpy arrays the Numba kernels take, without copies where possible."""

from __future__ import annotations

import numpy as np


def rows(t, k: int = 0) -> np.ndarray:
    """``t`` as C-contiguous numpy rows (``(N,)``, or ``(N, k)`` for ``k > 0``), sharing its memory
    when it can (a detached view of a tensor that requires grad; a copy only when not contiguous)."""
    a = (t.detach() if t.requires_grad else t).numpy()
    a = a.reshape(-1, k) if k else a.reshape(-1)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)
