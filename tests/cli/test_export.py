"""``fastflow export``: a model file or run folder to a torch.export program that runs with only
``fastflow.ops`` imported; outputs atomic and never replacing a file without --overwrite."""

import pytest
import torch

import fastflow.ops
from fastflow.cli import checkpoint as ckpt
from fastflow.cli.io import atomic_torch_save
from fastflow.flows import build
from fastflow.flows.export import Sampler


def _model(tmp_path, name="nsf", **kw):
    torch.manual_seed(3)
    flow = build(name, (2,), **kw)
    with torch.no_grad():  # a non-trivial density: perturb the (zero-initialised) outputs
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / f"{name}.pt"
    atomic_torch_save(ckpt.model_payload(flow, ckpt.DEFAULT_FACTORY, (2,), {"name": "test"}, {}), path)
    return path, flow.eval()


@pytest.fixture
def model_file(tmp_path):
    # nsf: its dynamic-batch export is not blocked by the affine coupling's size route (see
    # tests/flows/test_export.py, AFFINE_ROUTE)
    return _model(tmp_path, hidden_features=8, num_layers=2, num_blocks=1, num_bins=4)


def test_log_prob_fixed_and_dynamic(model_file, tmp_path, main_cli):
    path, flow = model_file
    x = torch.randn(5, 2)
    code, err = main_cli("export", path, "--out", tmp_path / "lp.pt2", "--batch", 5)
    assert code == 0, err
    run = fastflow.ops.load_exported(tmp_path / "lp.pt2").module()
    torch.testing.assert_close(run(x), flow.log_prob(x).detach())
    with pytest.raises(Exception):  # fixed batch
        run(torch.randn(3, 2))

    code, err = main_cli("export", path, "--out", tmp_path / "dyn.pt2", "--dynamic-batch")
    assert code == 0, err
    run = fastflow.ops.load_exported(tmp_path / "dyn.pt2").module()
    for n in (1, 7, 300):
        x = torch.randn(n, 2)
        torch.testing.assert_close(run(x), flow.log_prob(x).detach())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dyn.pt2", "lp.pt2", "nsf.pt"]  # no temporaries


def test_sampler(model_file, tmp_path, main_cli):
    path, flow = model_file
    code, err = main_cli("export", path, "--out", tmp_path / "s.pt2", "--what", "sample", "--dynamic-batch")
    assert code == 0, err
    run = fastflow.ops.load_exported(tmp_path / "s.pt2").module()
    eps = torch.randn(9, 2)
    x, lp = run(eps)
    want_x, want_lp = Sampler(flow)(eps)
    torch.testing.assert_close(x, want_x.detach())
    torch.testing.assert_close(lp, want_lp.detach())
    torch.testing.assert_close(lp, flow.log_prob(x).detach(), rtol=1e-4, atol=1e-4)


def test_run_folder_and_overwrite(model_file, tmp_path, main_cli):
    path, flow = model_file
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model.pt").write_bytes(path.read_bytes())
    out = tmp_path / "out.pt2"
    out.write_bytes(b"someone else's file")
    code, err = main_cli("export", run_dir, "--out", out)
    assert code != 0 and "exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"someone else's file"
    code, err = main_cli("export", run_dir, "--out", out, "--overwrite")
    assert code == 0, err
    x = torch.randn(1, 2)
    torch.testing.assert_close(fastflow.ops.load_exported(out).module()(x), flow.log_prob(x).detach())


@pytest.mark.parametrize("out,match", [("x.npy", "must be a .pt2"), ("folder.pt2", "is a directory")])
def test_bad_outputs(model_file, tmp_path, main_cli, out, match):
    path, _ = model_file
    (tmp_path / "folder.pt2").mkdir()
    code, err = main_cli("export", path, "--out", tmp_path / out)
    assert code != 0 and match in err


def test_bad_batch(model_file, tmp_path, main_cli):
    code, err = main_cli("export", model_file[0], "--out", tmp_path / "a.pt2", "--batch", 0)
    assert code != 0 and "--batch" in err


def test_a_model_that_cannot_export_says_why(tmp_path, main_cli):
    # a random log-det estimator in eval mode too: nothing to trace
    path, _ = _model(tmp_path, "resflow", num_layers=1, hidden_features=8, eval_estimator="series")
    code, err = main_cli("export", path, "--out", tmp_path / "p.pt2")
    assert code != 0 and "random probes" in err and "eval_estimator='exact'" in err
    assert not (tmp_path / "p.pt2").exists()
