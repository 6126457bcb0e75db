import tomllib
from pathlib import Path

import pytest
import torch

import fastflow.data as data

TOYS = ["moons", "circles", "checkerboard", "8gaussians", "pinwheel", "spirals", "torus"]


def test_names():
    assert set(data.names()) == set(TOYS) | {"digits", "digits-image"}


@pytest.mark.parametrize("name", TOYS)
def test_toys_reproducible_and_split(name):
    x = data.load(name)
    assert x.dtype == torch.float32 and x.shape == (10000, 2)
    assert torch.isfinite(x).all() and x.abs().max() < 10
    assert torch.equal(x, data.load(name))
    assert not torch.equal(x, data.load(name, seed=1))
    parts = [data.load(name, s) for s in data.SPLITS]
    assert [len(p) for p in parts] == [8000, 1000, 1000]
    both = torch.cat(parts)
    # the splits partition the data set
    assert len(both) == len(x) and torch.equal(torch.unique(both, dim=0), torch.unique(x, dim=0))
    assert data.load(name, n=100).shape == (100, 2)


def test_torus_is_angles_across_the_seam():
    x = data.load("torus")
    pi32 = float(torch.tensor(torch.pi))  # (an angle just below pi may round up to float32's pi)
    assert float(x.min()) >= -pi32 and float(x.max()) <= pi32
    # mass at both edges of the first angle (the mode at pi, wrapped)
    assert float((x[:, 0] > 2.8).float().mean()) > 0.05 and float((x[:, 0] < -2.8).float().mean()) > 0.05


def test_digits():
    x = data.load("digits")
    img = data.load("digits-image")
    assert x.shape == (1797, 64) and img.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert torch.equal(img.reshape(1797, 64), x)
    assert torch.equal(x, data.load("digits"))
    levels = data.load("digits", dequantize=False) * 16
    assert torch.equal(levels, levels.round()) and levels.max() == 16 and levels.min() == 0
    # uniform dequantisation: x * 17 lies in [k, k + 1) for the integer level k
    assert bool(((x * 17 - levels) >= -1e-5).all()) and bool(((x * 17 - levels) < 1 + 1e-5).all())
    frac = x * 17 - levels
    assert 0.45 < float(frac.mean()) < 0.55
    parts = [data.load("digits", s) for s in data.SPLITS]
    assert sum(len(p) for p in parts) == 1797
    assert len(parts[0]) > 5 * len(parts[2])
    labels = data.load_labels("digits", "test")
    assert labels.shape == (len(parts[2]),) and set(labels.tolist()) <= set(range(10))
    train = {tuple(r.tolist()) for r in parts[0]}
    assert not any(tuple(r.tolist()) in train for r in parts[2])


def test_digits_file_is_package_data():
    root = Path(__file__).resolve().parents[2]
    cfg = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = cfg["tool"]["setuptools"]["package-data"]["fastflow"]
    assert "data/*.npz" in patterns
    assert (root / "fastflow" / "data" / "digits.npz").is_file()


def test_bad_names():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("mnist")
    with pytest.raises(ValueError, match="split"):
        data.load("moons", "training")
