"""Embedded datasets: 2-D toys generated in code and scikit-learn's 8x8 digits, bundled.

``load(name, split=None)`` returns a float32 tensor; ``names()`` lists the datasets.

- 2-D toys (``"moons"``, ``"circles"``, ``"checkerboard"``, ``"8gaussians"``, ``"pinwheel"``,
  ``"spirals"``, and ``"torus"``, angles in ``[-pi, pi)^2`` for circular flows): ``n=10000``
  points (default) drawn with ``numpy.random.default_rng(seed)``, ``seed=0`` by default, so
  every call returns the same array.
- ``"digits"``: the 1797 8x8 grey-level digits of scikit-learn (``sklearn.datasets.load_digits``,
  BSD-3-Clause), which are the test set of the UCI "Optical Recognition of Handwritten Digits"
  data set (Alpaydin & Kaynak, 1998; CC BY 4.0), stored in ``digits.npz`` as uint8 in
  ``0..16``. Returned as ``(N, 64)`` float32, uniformly dequantised: ``(x + u) / 17`` with
  ``u ~ U[0, 1)`` drawn from a fixed seed, so values lie in ``[0, 1)``. Add
  :func:`dequantization_log_det` (``-64 log 17``) to a model's ``log p(x)`` to report it on the
  integer scale ``0..16`` (a lower bound on the log-probability of the discrete digits).
- ``"digits-image"``: the same values as ``(N, 1, 8, 8)``.

Splits (deterministic, from a fixed permutation): ``"train"`` 80 %, ``"val"`` 10 %, ``"test"``
10 % of the points; ``split=None`` returns all of them.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch

from fastflow.data.toys import TOYS

__all__ = ["load", "names", "load_labels", "dequantization_log_det", "SPLITS"]

SPLITS = ("train", "val", "test")
_DIGITS = ("digits", "digits-image")
_FRACTIONS = (0.8, 0.1, 0.1)
_SPLIT_SEED = 1234
_DEQUANT_SEED = 4321


def names() -> list[str]:
    """All dataset names."""
    return list(TOYS) + list(_DIGITS)


@functools.lru_cache(maxsize=None)
def _digits_raw():
    with np.load(Path(__file__).with_name("digits.npz")) as f:
        return f["images"].copy(), f["labels"].copy()


def _split_index(n: int, split: str | None) -> np.ndarray:
    if split is None:
        return np.arange(n)
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS} or None")
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    n_train = int(round(_FRACTIONS[0] * n))
    n_val = int(round(_FRACTIONS[1] * n))
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
    lo, hi = bounds[split]
    return np.sort(perm[lo:hi])


def load(name: str, split: str | None = None, *, n: int | None = None, seed: int = 0,
         dequantize: bool = True) -> torch.Tensor:
    """Loads dataset ``name`` as a float32 tensor.

    Args:
        name: one of :func:`names`.
        split: ``"train"``, ``"val"``, ``"test"`` or None (all).
        n: number of points generated for a toy before splitting (default 10000; toys only).
        seed: generator seed of a toy (toys only).
        dequantize: digits only; False returns the integer levels divided by 16 (in ``[0, 1]``).

    Returns:
        ``(N, 2)`` for toys, ``(N, 64)`` for ``"digits"``, ``(N, 1, 8, 8)`` for ``"digits-image"``.
    """
    if name in TOYS:
        n = 10000 if n is None else int(n)
        if n < 1:
            raise ValueError(f"load({name!r}): n must be positive, got {n}")
        x = TOYS[name](n, np.random.default_rng(seed))
        return torch.from_numpy(np.ascontiguousarray(x[_split_index(len(x), split)], dtype=np.float32))
    if name in _DIGITS:
        if n is not None:
            raise ValueError("load: n applies to the generated toys only")
        images, _ = _digits_raw()
        idx = _split_index(len(images), split)
        x = images.astype(np.float64)
        if dequantize:
            u = np.random.default_rng(_DEQUANT_SEED).random(x.shape)
            x = (x + u) / 17.0
        else:
            x = x / 16.0
        x = x[idx].astype(np.float32)
        x = x.reshape(len(idx), 1, 8, 8) if name == "digits-image" else x.reshape(len(idx), 64)
        return torch.from_numpy(np.ascontiguousarray(x))
    raise ValueError(f"unknown dataset {name!r}; expected one of {names()}")


def load_labels(name: str, split: str | None = None) -> torch.Tensor:
    """Class labels (int64, 0..9) of ``"digits"`` / ``"digits-image"`` in the order of :func:`load`."""
    if name not in _DIGITS:
        raise ValueError(f"load_labels: only {_DIGITS} have labels, got {name!r}")
    _, labels = _digits_raw()
    return torch.from_numpy(labels[_split_index(len(labels), split)].astype(np.int64))


def dequantization_log_det(name: str) -> float:
    """``log |d x_model / d x_levels|`` per sample of the digits scaling: ``-64 log 17``.

    The log-likelihood of the dequantised data on the integer scale (the usual reporting scale,
    a lower bound on the discrete log-probability) is ``log p(x) + dequantization_log_det``.
    """
    if name not in _DIGITS:
        raise ValueError(f"dequantization_log_det: only for {_DIGITS}, got {name!r}")
    return -64 * math.log(17.0)
