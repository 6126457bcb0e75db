"""Coupling masks. Convention: a boolean tensor over the event shape, ``True`` where the
coupling *transforms* the feature, ``False`` where it is passed through and fed to the conditioner.
"""

from __future__ import annotations

import torch

__all__ = ["half_mask", "alternating_mask", "checkerboard_mask", "channel_mask", "random_mask"]


def half_mask(features: int, flip: bool = False) -> torch.Tensor:
    """``(features,)``: the second half transformed (the first half if ``flip``)."""
    if features < 2:
        raise ValueError(f"half_mask: a coupling needs features >= 2, got {features}")
    m = torch.arange(features) >= features // 2
    return ~m if flip else m


def alternating_mask(features: int, parity: int = 0) -> torch.Tensor:
    """``(features,)``: every other feature transformed, starting at index ``parity``."""
    if features < 2:
        raise ValueError(f"alternating_mask: a coupling needs features >= 2, got {features}")
    return torch.arange(features) % 2 == parity % 2


def checkerboard_mask(channels: int, height: int, width: int, parity: int = 0) -> torch.Tensor:
    """``(C, H, W)``: pixels with ``(i + j) % 2 == parity`` transformed, in every channel (RealNVP)."""
    i = torch.arange(height)[:, None]
    j = torch.arange(width)[None, :]
    m = (i + j) % 2 == parity % 2
    if height * width < 2:
        raise ValueError(f"checkerboard_mask: needs at least 2 pixels, got {height}x{width}")
    return m.expand(channels, height, width).clone()


def channel_mask(channels: int, height: int, width: int, flip: bool = False) -> torch.Tensor:
    """``(C, H, W)``: the second half of the channels transformed (the first half if ``flip``)."""
    if channels < 2:
        raise ValueError(f"channel_mask: needs at least 2 channels, got {channels}")
    m = torch.arange(channels) >= channels // 2
    m = ~m if flip else m
    return m[:, None, None].expand(channels, height, width).clone()


def random_mask(features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(features,)``: a random half of the features transformed."""
    perm = torch.randperm(features, generator=generator)
    m = torch.zeros(features, dtype=torch.bool)
    m[perm[: features - features // 2]] = True
    return m
