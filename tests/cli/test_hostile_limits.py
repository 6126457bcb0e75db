"""Hostile input, second round: forged specs that would exhaust memory or time, full disks and
impossible sizes, outputs that cannot be replaced, BOM-prefixed CSVs, unverifiable files, two
`fit` processes on one folder. Every case ends in one line, exit status 2, nothing left behind."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastflow.cli import checkpoint as ckpt
from fastflow.cli.errors import CLIError
from fastflow.cli.io import atomic_torch_save
from fastflow.flows import build
from tests.cli.conftest import TINY


def _fit_args(out, steps=40, *extra, data="moons"):
    return ["fit", "--data", data, *TINY, "--steps", steps, "--batch-size", 64, "--lr", "3e-3", "--val-every", 20,
            "--checkpoint-every", 10, "--log-every", 5, "--samples", 0, "--threads", 1, "--out", out, "--quiet",
            *extra]


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(3)
    flow = build("realnvp", (2,), hidden_features=8, num_layers=2, num_blocks=1)
    path = tmp_path / "model.pt"
    atomic_torch_save(ckpt.model_payload(flow, ckpt.DEFAULT_FACTORY, (2,), {"name": "test"}, {}), path)
    return path


def _one_line(err: str) -> None:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp-" in p.name or ".part" in p.name]


# ----------------------------------------------------------------------------- 3. forged specs


def _forged(model_file: Path, tmp_path: Path, name: str, **changes) -> Path:
    """The model file with its spec changed and re-sealed (anyone can compute a digest)."""
    obj = torch.load(model_file, weights_only=True)
    spec = dict(obj["spec"])
    shape = changes.pop("shape", None)
    if shape is not None:
        spec["shape"] = shape
    spec["kwargs"] = {**spec["kwargs"], **changes}
    path = tmp_path / name
    torch.save(ckpt.seal({**obj, "spec": spec}), path)
    return path


@pytest.mark.parametrize("changes", [{"hidden_features": 2**34}, {"num_layers": 10**7},
                                     {"shape": [2**40]}, {"num_layers": 8, "num_blocks": 8, "hidden_features": 16}],
                         ids=["hidden_2e34", "layers_1e7", "shape_2e40", "bigger_within_sizes"])
def test_forged_spec_is_refused_fast_before_building(tmp_path, model_file, main_cli, changes):
    forged = _forged(model_file, tmp_path, "forged.pt", **changes)
    t0 = time.perf_counter()
    code, err = main_cli("sample", forged, "-n", 3, "--out", tmp_path / "s.npy")
    took = time.perf_counter() - t0
    assert code == 2 and "forged.pt" in err, err
    assert any(w in err for w in ("could hold", "could fill", "different model")), err
    _one_line(err)
    assert took < 5, took
    assert not (tmp_path / "s.npy").exists() and not _temps(tmp_path)
    assert len(err) < 600, err  # one short line, not a list of every key
    with pytest.raises(CLIError, match="refusing to build|different model"):
        ckpt.load_model(forged)


def test_every_registry_model_still_loads_under_the_build_budget(tmp_path):
    from fastflow.flows import names

    for name in names():
        shape = (3, 8, 8) if name in ("glow", "realnvp-image") else (4,)
        flow = build(name, shape)
        path = tmp_path / f"{name}.pt"
        atomic_torch_save(ckpt.model_payload(flow, ckpt.DEFAULT_FACTORY, shape, {"name": "t"}, {}), path)
        loaded, _ = ckpt.load_model(path)
        assert loaded.state_dict().keys() == flow.state_dict().keys(), name


# ----------------------------------------------------------------------------- unverifiable (version-1) files


def _version1(model_file: Path, tmp_path: Path) -> Path:
    obj = torch.load(model_file, weights_only=True)
    obj.pop("digest")
    key = next(iter(obj["state_dict"]))
    obj["state_dict"][key] = obj["state_dict"][key] + 100.0  # tampered: nothing can tell
    path = tmp_path / "legacy.pt"
    torch.save({**obj, "format_version": 1}, path)
    return path


def test_version1_file_needs_allow_unverified(tmp_path, model_file, main_cli):
    legacy = _version1(model_file, tmp_path)
    code, err = main_cli("sample", legacy, "-n", 3, "--out", tmp_path / "s.npy")
    assert code == 2 and "legacy.pt" in err and "--allow-unverified" in err, err
    _one_line(err)
    assert not (tmp_path / "s.npy").exists()
    with pytest.raises(CLIError, match="allow_unverified=True"):
        ckpt.load_model(legacy)
    code, err = main_cli("sample", legacy, "-n", 3, "--out", tmp_path / "s.npy", "--allow-unverified", "--quiet")
    assert code == 0 and "unverified" in err, err
    assert np.load(tmp_path / "s.npy").shape == (3, 2)
    flow, _ = ckpt.load_model(legacy, allow_unverified=True)
    assert flow is not None
