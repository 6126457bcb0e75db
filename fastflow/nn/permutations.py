"""Fixed permutations of the features (vectors) or channels (images); volume preserving."""

from __future__ import annotations

import torch

from fastflow.nn.base import Transform

__all__ = ["Permutation", "ReversePermutation", "RandomPermutation"]


class Permutation(Transform):
    """Permutes dimension 1 (features of ``(B, D)``, channels of ``(B, C, H, W)``) by ``perm``."""

    def __init__(self, perm: torch.Tensor):
        super().__init__()
        perm = torch.as_tensor(perm, dtype=torch.long)
        if perm.dim() != 1 or not torch.equal(perm.sort().values, torch.arange(len(perm))):
            raise ValueError(f"{type(self).__name__}: perm must be a permutation of 0..n-1, got {perm.tolist()}")
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def _check(self, x):
        if x.dim() < 2 or x.shape[1] != len(self.perm):
            raise ValueError(f"{type(self).__name__}: expected dim 1 of size {len(self.perm)}, "
                             f"got shape {tuple(x.shape)}")

    def forward(self, x, context=None):
        self._check(x)
        return x.index_select(1, self.perm), x.new_zeros(x.shape[0])

    def inverse(self, y, context=None):
        self._check(y)
        return y.index_select(1, self.inv_perm), y.new_zeros(y.shape[0])


class ReversePermutation(Permutation):
    """Reverses the order of the ``features`` (or channels)."""

    def __init__(self, features: int):
        super().__init__(torch.arange(features - 1, -1, -1))


class RandomPermutation(Permutation):
    """A random permutation drawn once at construction (from ``seed`` if given); saved in the state dict."""

    def __init__(self, features: int, seed: int | None = None):
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        super().__init__(torch.randperm(features, generator=g))
