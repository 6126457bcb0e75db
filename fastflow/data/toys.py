"""2-D toy densities generated in code from a seed (after the recipes of FFJORD, Grathwohl et al.
2019, and scikit-learn's ``make_moons`` / ``make_circles``); values lie roughly in ``[-4, 4]^2``."""

from __future__ import annotations

import numpy as np

__all__ = ["TOYS"]


def moons(n, rng):
    n_out = n // 2
    n_in = n - n_out
    t_out = np.linspace(0, np.pi, n_out)
    t_in = np.linspace(0, np.pi, n_in)
    x = np.concatenate([np.stack([np.cos(t_out), np.sin(t_out)], 1),
                        np.stack([1 - np.cos(t_in), 1 - np.sin(t_in) - 0.5], 1)])
    x = x + rng.normal(scale=0.1, size=x.shape)
    return (x - np.array([0.5, 0.25])) * 2


def circles(n, rng):
    n_out = n // 2
    n_in = n - n_out
    t_out = rng.uniform(0, 2 * np.pi, n_out)
    t_in = rng.uniform(0, 2 * np.pi, n_in)
    x = np.concatenate([np.stack([np.cos(t_out), np.sin(t_out)], 1),
                        0.5 * np.stack([np.cos(t_in), np.sin(t_in)], 1)])
    return (x + rng.normal(scale=0.08, size=x.shape)) * 3


def checkerboard(n, rng):
    x1 = rng.uniform(size=n) * 4 - 2
    x2 = rng.uniform(size=n) - rng.integers(0, 2, n) * 2.0
    x2 = x2 + np.floor(x1) % 2
    return np.stack([x1, x2], 1) * 2


def eight_gaussians(n, rng):
    s = 1.0 / np.sqrt(2)
    centers = 4 * np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)])
    idx = rng.integers(0, 8, n)
    return (rng.normal(size=(n, 2)) * 0.5 + centers[idx]) / 1.414


def pinwheel(n, rng):
    radial_std, tangential_std, num_classes, rate = 0.3, 0.1, 5, 0.25
    rads = np.linspace(0, 2 * np.pi, num_classes, endpoint=False)
    labels = rng.integers(0, num_classes, n)
    feats = rng.normal(size=(n, 2)) * np.array([radial_std, tangential_std])
    feats[:, 0] += 1.0
    angles = rads[labels] + rate * np.exp(feats[:, 0])
    rot = np.stack([np.cos(angles), -np.sin(angles), np.sin(angles), np.cos(angles)], 1).reshape(-1, 2, 2)
    return 2 * np.einsum("ti,tij->tj", feats, rot)


def spirals(n, rng):
    m = np.sqrt(rng.uniform(size=(n // 2, 1))) * 540 * (2 * np.pi) / 360
    d1x = -np.cos(m) * m + rng.uniform(size=(n // 2, 1)) * 0.5
    d1y = np.sin(m) * m + rng.uniform(size=(n // 2, 1)) * 0.5
    x = np.vstack((np.hstack((d1x, d1y)), np.hstack((-d1x, -d1y)))) / 3
    return x + rng.normal(size=x.shape) * 0.1


def torus(n, rng):
    """Angles on ``[-pi, pi)^2``: three wrapped Gaussians (std 0.4), two centred on the seam
    (``+-pi``), so that their mass lies at both edges of the square: a density on the torus."""
    centers = np.array([(np.pi, 0.0), (0.0, np.pi), (-np.pi / 2, -np.pi / 2)])
    x = centers[rng.integers(0, 3, n)] + rng.normal(size=(n, 2)) * 0.4
    return np.remainder(x + np.pi, 2 * np.pi) - np.pi


TOYS = {
    "moons": moons,
    "circles": circles,
    "checkerboard": checkerboard,
    "8gaussians": eight_gaussians,
    "pinwheel": pinwheel,
    "spirals": spirals,
    "torus": torus,
}
