"""Small configurations of every registered model, shared by the autocast and export tests."""

from __future__ import annotations

import torch

from fastflow.flows import build, names

IMAGE = {"glow", "realnvp-image"}
SMALL = {
    "nsf": dict(num_layers=2, hidden_features=16, num_blocks=1, num_bins=4),
    "realnvp": dict(num_layers=3, hidden_features=16, num_blocks=1),
    "nice": dict(num_layers=3, hidden_features=16, num_blocks=1),
    "maf": dict(num_layers=2, hidden_features=16, num_blocks=1),
    "iaf": dict(num_layers=2, hidden_features=16, num_blocks=1),
    "nsf-ar": dict(num_layers=2, hidden_features=16, num_blocks=1, num_bins=4),
    "bpf": dict(num_layers=2, hidden_features=16, num_blocks=1, degree=6, bound=4.0),
    "sospf": dict(num_layers=2, hidden_features=16, num_blocks=1, degree=2, polynomials=2),
    "ncsf": dict(num_layers=2, hidden_features=16, num_blocks=1, num_bins=4),
    "glow": dict(levels=2, depth=1, hidden_channels=8),
    "realnvp-image": dict(levels=2, hidden_channels=8, num_blocks=1),
    "resflow": dict(num_layers=2, hidden_features=16),
    "cnf": dict(hidden_features=16, num_layers=1, method="rk4", step_size=0.25),
    "planar": dict(num_layers=3),
    "radial": dict(num_layers=3),
}
UNCONDITIONAL_ONLY = {"planar", "radial"}


def shape_of(name: str) -> tuple[int, ...]:
    return (1, 4, 4) if name in IMAGE else (4,)


def small_flow(name: str, context_features: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    return build(name, shape_of(name), context_features, **SMALL[name])


def data(name: str, n: int = 64, seed: int = 1) -> torch.Tensor:
    """A fixed, non-Gaussian batch: a banana-shaped pair of features repeated over the event."""
    g = torch.Generator().manual_seed(seed)
    shape = shape_of(name)
    d = torch.Size(shape).numel()
    z = torch.randn(n, d, generator=g)
    x = torch.stack([z[:, 0], 0.5 * z[:, 1] + 0.4 * (z[:, 0] ** 2 - 1)], 1).repeat(1, (d + 1) // 2)[:, :d]
    return (x + 0.3 * z).reshape(n, *shape)


def registered() -> list[str]:
    assert set(names()) == set(SMALL), f"a registered model without a small configuration: {set(names()) ^ set(SMALL)}"
    return sorted(SMALL)
