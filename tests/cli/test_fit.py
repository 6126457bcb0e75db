"""fit -> score -> sample end to end, resume after SIGKILL, and the folder/checkpoint rules."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.cli.conftest import REPO, TINY, cli_env, run_cli


def _fit_args(out, steps=60, *extra):
    return ["fit", "--data", "moons", *TINY, "--steps", steps, "--batch-size", 64, "--lr", "3e-3",
            "--val-every", 20, "--checkpoint-every", 10, "--log-every", 1, "--samples", 200, "--threads", 1,
            "--out", out, "--quiet", *extra]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _state(path, key):
    return torch.load(path, weights_only=True)[key]


def test_fit_score_sample_end_to_end(tmp_path, main_cli):
    out = tmp_path / "run"
    code, err = main_cli(*_fit_args(out, 60))
    assert code == 0, err
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "model.pt", "samples.npy", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    m = _metrics(out)
    losses = [r["loss"] for r in m if "loss" in r]
    assert len(losses) == 60 and losses[-1] < losses[0]  # it learned something
    assert np.isfinite(summary["test_ll_nats"])
    assert summary["test_bits_per_dim"] == pytest.approx(-summary["test_ll_nats"] / (2 * np.log(2)))
    assert summary["test_rows"] == 1000  # the embedded test split of moons
    pytest.importorskip("matplotlib")
    assert (out / "samples.png").stat().st_size > 1000

    # score the test split with the saved model: the mean is the reported test log-likelihood
    from fastflow.data import load

    np.save(tmp_path / "test.npy", load("moons", "test").numpy())
    code, err = main_cli("score", out, tmp_path / "test.npy", "--out", tmp_path / "logp.npy", "--chunk-size", 300)
    assert code == 0, err
    logp = np.load(tmp_path / "logp.npy")
    assert logp.shape == (1000,)
    assert logp.mean() == pytest.approx(summary["test_ll_nats"], rel=1e-5)

    code, err = main_cli("sample", out / "model.pt", "-n", 500, "--out", tmp_path / "s.npy", "--seed", 1)
    assert code == 0, err
    s = np.load(tmp_path / "s.npy")
    assert s.shape == (500, 2) and np.isfinite(s).all()

    # the finished run is not redone, nor silently replaced
    code, err = main_cli(*_fit_args(out, 60))
    assert code == 2 and "finished run" in err and "--overwrite" in err
    # a different config into the same folder is refused, naming the key
    (out / "summary.json").unlink()
    code, err = main_cli(*_fit_args(out, 60, "--seed", "4"))
    assert code == 2 and "'seed'" in err
    code, err = main_cli(*_fit_args(out, 30, "--overwrite"))
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["steps"] == 30


def test_checkpoint_of_another_model_is_refused(tmp_path, main_cli):
    out = tmp_path / "run"
    assert main_cli(*_fit_args(out, 10))[0] == 0
    (out / "summary.json").unlink()
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_args"]["hidden_features"] = 32  # the folder now claims another model than its checkpoint
    (out / "config.json").write_text(json.dumps(cfg))
    args = [a if a != "hidden_features=16" else "hidden_features=32" for a in map(str, _fit_args(out, 10))]
    code, err = main_cli(*args)
    assert code == 2 and "checkpoint" in err and "another model" in err
    # a checkpoint from another format version
    obj = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.save({**obj, "format_version": 0}, out / "checkpoint.pt")
    code, err = main_cli(*args)
    assert code == 2 and "format version 0" in err


def test_existing_non_run_folder_is_refused(tmp_path, main_cli):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    for extra in ([], ["--overwrite"]):
        code, err = main_cli(*_fit_args(out, 10, *extra))
        assert code == 2 and "not a fastflow run folder" in err
    assert (out / "thesis.tex").exists()


def _popen(args):
    return subprocess.Popen([sys.executable, "-m", "fastflow", *map(str, args)], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_after_checkpoint(args, out, min_step):
    """Start fit, SIGKILL it as soon as a checkpoint at step >= min_step exists."""
    proc = _popen(args)
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            ck = out / "checkpoint.pt"
            if ck.exists():
                try:
                    if torch.load(ck, weights_only=True)["step"] >= min_step:
                        break
                except Exception:  # being replaced right now: os.replace makes the next read whole
                    pass
            time.sleep(0.02)
        assert proc.poll() is None, "fit finished before it could be killed; make the run longer"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return torch.load(out / "checkpoint.pt", weights_only=True)["step"]


def test_kill_and_resume_matches_uninterrupted(tmp_path):
    steps = 240
    ref = tmp_path / "ref"
    run_cli(*_fit_args(ref, steps), check=True)

    out = tmp_path / "killed"
    args = _fit_args(out, steps)
    k1 = _kill_after_checkpoint(args, out, 10)
    assert not (out / "summary.json").exists() and k1 < steps
    k2 = _kill_after_checkpoint(args, out, k1 + 40)  # restart, killed again further on
    assert k1 < k2 < steps
    proc = run_cli(*args, check=True)
    assert f"resuming {out} from step" in proc.stderr

    for key in ("model",):
        a, b = _state(ref / "checkpoint.pt", key), _state(out / "checkpoint.pt", key)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"final parameter {name} differs after resume"
    a, b = _state(ref / "model.pt", "state_dict"), _state(out / "model.pt", "state_dict")
    assert all(torch.equal(a[n], b[n]) for n in a)
    # the metrics log has the same lines (timings aside): none lost or repeated across the kills
    def strip(rows):
        return [{k: v for k, v in r.items() if not k.endswith("_per_s") and k != "time_s"} for r in rows]

    assert strip(_metrics(ref)) == strip(_metrics(out))
    sa, sb = json.loads((ref / "summary.json").read_text()), json.loads((out / "summary.json").read_text())
    assert sa["test_ll_nats"] == sb["test_ll_nats"] and sa["best_step"] == sb["best_step"]


def test_fit_on_a_file_splits_and_checks_rows(tmp_path, main_cli):
    x = np.random.default_rng(2).normal(size=(700, 2)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "run"
    code, err = main_cli("fit", "--data", tmp_path / "x.npy", *TINY, "--steps", 5, "--batch-size", 50,
                         "--val-fraction", 0.2, "--test-fraction", 0.1, "--samples", 0, "--out", out, "--quiet")
    assert code == 0, err
    info = json.loads((out / "summary.json").read_text())["data"]
    assert info["memory_mapped"] is True
    assert info["sizes"] == {"train": 490, "val": 140, "test": 70}
    assert json.loads((out / "summary.json").read_text())["test_rows"] == 70
    x[[5, 600]] = np.nan
    np.save(tmp_path / "bad.npy", x)
    code, err = main_cli("fit", "--data", tmp_path / "bad.npy", *TINY, "--out", tmp_path / "r2", "--quiet")
    assert code == 2 and "bad.npy" in err and "5 (NaN/Inf)" in err and "600 (NaN/Inf)" in err


def test_user_model_factory(tmp_path, main_cli):
    """model = "package.module:factory": the factory is stored in model.pt and rebuilt by score."""
    np.save(tmp_path / "x.npy", np.random.default_rng(3).normal(size=(300, 2)).astype(np.float32))
    out = tmp_path / "run"
    code, err = main_cli("fit", "--data", tmp_path / "x.npy", "--model", "tests.cli._tinyflow:build", "--steps", 5,
                         "--batch-size", 50, "--samples", 0, "--out", out, "--quiet")
    assert code == 0, err
    assert torch.load(out / "model.pt", weights_only=True)["factory"] == "tests.cli._tinyflow:build"
    # the file names a user factory: score calls it only when the person names it too
    code, err = main_cli("score", out, tmp_path / "x.npy", "--out", tmp_path / "lp.npy", "--quiet")
    assert code == 2 and "--trust-factory tests.cli._tinyflow:build" in err
    assert not (tmp_path / "lp.npy").exists()
    code, err = main_cli("score", out, tmp_path / "x.npy", "--out", tmp_path / "lp.npy", "--quiet",
                         "--trust-factory", "tests.cli._tinyflow:build")
    assert code == 0, err
    assert np.isfinite(np.load(tmp_path / "lp.npy")).all()
    code, err = main_cli("fit", "--model", "tests.cli._nowhere:build", "--out", tmp_path / "r2", "--quiet")
    assert code == 2 and "tests.cli._nowhere" in err


def test_fit_cnf_by_flow_matching(tmp_path, main_cli):
    """--objective flow-matching trains a CNF's vector field without ODE solves; the saved model is
    then scored by the exact ODE likelihood, and score reproduces the summary's test value."""
    out = tmp_path / "cnf"
    code, err = main_cli("fit", "--data", "moons", "--model", "cnf", "--model-arg", "hidden_features=16",
                         "--model-arg", "num_layers=2", "--objective", "flow-matching", "--steps", 60,
                         "--batch-size", 128, "--lr", "3e-3", "--val-every", 0, "--samples", 0, "--threads", 1,
                         "--out", out, "--quiet")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    losses = [r["loss"] for r in _metrics(out) if "loss" in r]
    assert np.isfinite(summary["test_ll_nats"]) and losses[-1] < losses[0]
    from fastflow.data import load

    np.save(tmp_path / "test.npy", load("moons", "test").numpy()[:200])
    code, err = main_cli("score", out, tmp_path / "test.npy", "--out", tmp_path / "lp.npy", "--quiet")
    assert code == 0, err
    assert np.isfinite(np.load(tmp_path / "lp.npy")).all()
    code, err = main_cli(*_fit_args(tmp_path / "r", 5, "--objective", "flow-matching"))
    assert code == 2 and "continuous flow" in err


def test_fit_compile_trains_like_eager(tmp_path, main_cli):
    """``fit --compile``: the compiled training step (torch.compile of the loss and its backward)
    learns what the eager one learns from the same seed: the same per-step losses up to float32
    rounding (compiled kernels sum in another order), the same final test log-likelihood."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    code, err = main_cli(*_fit_args(eager, 20))
    assert code == 0, err
    code, err = main_cli(*_fit_args(compiled, 20, "--compile"))
    assert code == 0, err
    assert "compiling the training step" in err
    a = [r["loss"] for r in _metrics(eager) if "loss" in r]
    b = [r["loss"] for r in _metrics(compiled) if "loss" in r]
    assert len(a) == len(b) == 20
    np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-3)
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (eager, compiled))
    assert sb["test_ll_nats"] == pytest.approx(sa["test_ll_nats"], rel=2e-3, abs=2e-3)
