"""score and sample, in-process: streaming over a memory-mapped file larger than a chunk, bad
rows reported (never dropped), atomic outputs, seeded reproducible samples, file-format checks."""

import json

import numpy as np
import pytest
import torch

import fastflow
from fastflow.cli import checkpoint as ckpt
from fastflow.cli.io import atomic_torch_save
from fastflow.flows import build


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(3)
    flow = build("realnvp", (2,), hidden_features=8, num_layers=2, num_blocks=1)
    with torch.no_grad():  # a non-trivial density: perturb the (zero-initialised) outputs
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "model.pt"
    atomic_torch_save(ckpt.model_payload(flow, ckpt.DEFAULT_FACTORY, (2,), {"name": "test"}, {}), path)
    return path, flow.eval()


def _data_with_bad_rows(n=2500):
    x = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    bad = [3, 1024, 1025, n - 1]
    x[3, 0] = np.nan
    x[1024, 1] = np.inf
    x[1025, :] = -np.inf
    x[n - 1, 1] = np.nan
    return x, bad


def test_score_memmap_bad_rows_error(model_file, tmp_path, main_cli):
    x, bad = _data_with_bad_rows()
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "logp.npy"
    code, err = main_cli("score", model_file[0], tmp_path / "x.npy", "--out", out, "--chunk-size", 512, "--quiet")
    assert code == 2
    assert "4 bad row(s)" in err and all(str(i) in err for i in bad)
    assert not out.exists() and not list(tmp_path.glob(".logp.npy*"))  # nothing half-written is left


def test_score_memmap_bad_rows_nan(model_file, tmp_path, main_cli):
    x, bad = _data_with_bad_rows()
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "logp.npy"
    code, err = main_cli("score", model_file[0], tmp_path / "x.npy", "--out", out, "--chunk-size", 512,
                         "--on-bad-rows", "nan")
    assert code == 0, err
    logp = np.load(out)
    assert logp.shape == (len(x),)
    assert np.flatnonzero(np.isnan(logp)).tolist() == bad  # exactly the bad rows, in place
    good = np.setdiff1d(np.arange(len(x)), bad)
    with torch.no_grad():
        want = model_file[1].log_prob(torch.from_numpy(x[good])).numpy()
    np.testing.assert_allclose(logp[good], want, rtol=1e-5, atol=1e-5)
    report = json.loads((tmp_path / "logp.npy.bad_rows.json").read_text())
    assert [r["row"] for r in report["bad_rows"]] == bad
    assert "4 bad row(s)" in err
    # the output exists now: refused without --overwrite, replaced with it
    code, err = main_cli("score", model_file[0], tmp_path / "x.npy", "--out", out, "--on-bad-rows", "nan")
    assert code == 2 and "exists" in err and "--overwrite" in err
    code, _ = main_cli("score", model_file[0], tmp_path / "x.npy", "--out", out, "--on-bad-rows", "nan",
                       "--overwrite", "--quiet")
    assert code == 0


def test_score_csv_widths_and_junk(model_file, tmp_path, main_cli):
    x = np.random.default_rng(1).normal(size=(40, 2)).astype(np.float32)
    lines = ["a,b"] + [f"{u!r},{v!r}" for u, v in x.tolist()]
    lines[1 + 5] = "1.0,2.0,3.0"  # row 5: three values
    lines[1 + 17] = "0.5"  # row 17: one value
    lines[1 + 30] = "0.1,abc"  # row 30: not a number
    lines[1 + 33] = "nan,0"  # row 33: NaN
    (tmp_path / "x.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "logp.npy"
    code, err = main_cli("score", model_file[0], tmp_path / "x.csv", "--out", out, "--chunk-size", 7, "--quiet")
    assert code == 2 and "4 bad row(s)" in err
    assert "5 (3 values, expected 2)" in err and "17 (1 values, expected 2)" in err
    assert "30 (not a number)" in err and "33 (NaN/Inf)" in err
    code, err = main_cli("score", model_file[0], tmp_path / "x.csv", "--out", out, "--chunk-size", 7,
                         "--on-bad-rows", "nan", "--quiet")
    assert code == 0, err
    logp = np.load(out)
    assert np.flatnonzero(np.isnan(logp)).tolist() == [5, 17, 30, 33]
    good = np.setdiff1d(np.arange(40), [5, 17, 30, 33])
    with torch.no_grad():
        want = model_file[1].log_prob(torch.from_numpy(x[good])).numpy()
    np.testing.assert_allclose(logp[good], want, rtol=1e-5, atol=1e-5)


def test_score_wrong_shape_file(model_file, tmp_path, main_cli):
    np.save(tmp_path / "x3.npy", np.zeros((10, 3), np.float32))
    code, err = main_cli("score", model_file[0], tmp_path / "x3.npy", "--out", tmp_path / "o.npy")
    assert code == 2 and "(3,)" in err and "(2,)" in err


def test_sample_seeded_and_rank_independent_recipe(model_file, tmp_path, main_cli):
    a, b, c = (tmp_path / f"{k}.npy" for k in "abc")
    assert main_cli("sample", model_file[0], "-n", 1000, "--out", a, "--seed", 5, "--chunk-size", 300)[0] == 0
    assert main_cli("sample", model_file[0], "-n", 1000, "--out", b, "--seed", 5, "--chunk-size", 300)[0] == 0
    assert main_cli("sample", model_file[0], "-n", 1000, "--out", c, "--seed", 6, "--chunk-size", 300)[0] == 0
    sa, sb, sc = np.load(a), np.load(b), np.load(c)
    assert sa.shape == (1000, 2) and np.isfinite(sa).all()
    np.testing.assert_array_equal(sa, sb)
    assert not np.allclose(sa, sc)
    # chunks are seeded independently: chunk 1 of a 1000-row run is chunk 1 of a 600-row run
    d = tmp_path / "d.npy"
    assert main_cli("sample", model_file[0], "-n", 600, "--out", d, "--seed", 5, "--chunk-size", 300)[0] == 0
    np.testing.assert_array_equal(np.load(d), sa[:600])


def test_model_file_version_and_format_checks(model_file, tmp_path, main_cli):
    obj = torch.load(model_file[0], weights_only=True)
    for key, value, match in [("format_version", 99, "format version 99"),
                              ("fastflow_version", "0.0.1", "fastflow 0.0.1"),
                              ("format", "fastflow-checkpoint", "not a fastflow-model file")]:
        bad = tmp_path / f"bad_{key}.pt"
        torch.save({**obj, key: value}, bad)
        code, err = main_cli("sample", bad, "-n", 10, "--out", tmp_path / "s.npy")
        assert code == 2 and match in err and str(bad) in err, err
    # parameters of another model under this spec
    other = build("realnvp", (2,), hidden_features=4, num_layers=2, num_blocks=1)
    bad = tmp_path / "other.pt"
    torch.save({**obj, "state_dict": other.state_dict()}, bad)  # edited after writing: the digest says so
    code, err = main_cli("score", bad, tmp_path / "none.npy", "--out", tmp_path / "s.npy")
    assert code == 2 and "is corrupt" in err
    torch.save(ckpt.seal({**obj, "state_dict": other.state_dict()}), bad)  # written so, with its own digest
    code, err = main_cli("score", bad, tmp_path / "none.npy", "--out", tmp_path / "s.npy")
    assert code == 2 and "different model" in err
    assert obj["fastflow_version"] == fastflow.__version__
