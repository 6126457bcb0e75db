"""Hostile and careless input to the batch commands: files never execute, nothing foreign is
deleted, corrupted or changed inputs are refused, every edge case ends in one clear line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fastflow.cli import checkpoint as ckpt
from fastflow.cli.errors import CLIError
from fastflow.cli.io import _host, atomic_torch_save, remove_stale_temps
from fastflow.flows import build
from tests.cli.conftest import REPO, TINY, cli_env, run_cli


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


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err


# ----------------------------------------------------------------------------- 1. files never run code


def _evil_module(tmp_path: Path) -> tuple[str, Path]:
    """A module whose import and whose factory each would leave a file behind."""
    pkg = tmp_path / "evil_pkg_ff"
    pkg.mkdir()
    marker = tmp_path / "pwned.txt"
    (pkg / "__init__.py").write_text(
        f"open({str(tmp_path / 'imported.txt')!r}, 'w').write('imported')\n"
        "def build(**spec):\n"
        f"    open({str(marker)!r}, 'w').write('ran')\n"
        "    from tests.cli._tinyflow import TinyFlow\n"
        "    return TinyFlow(spec['shape'])\n")
    return "evil_pkg_ff:build", marker


def _hostile_model(tmp_path: Path, factory: str, spec: dict, state=None) -> Path:
    obj = ckpt.seal({"format": ckpt.MODEL_FORMAT, "format_version": ckpt.FORMAT_VERSION,
                     "fastflow_version": __import__("fastflow").__version__, "factory": factory, "spec": spec,
                     "shape": [2], "state_dict": state or {}, "data": {}, "config": {}})
    folder = tmp_path / "shared_model"
    folder.mkdir(exist_ok=True)
    torch.save(obj, folder / "model.pt")
    return folder


def test_model_file_cannot_run_a_command(tmp_path, main_cli):
    pwned = tmp_path / "pwned_by_os_system.txt"
    folder = _hostile_model(tmp_path, "os:system", {"command": f"id > {pwned}"})
    np.save(tmp_path / "x.npy", np.zeros((4, 2), np.float32))
    code, err = main_cli("score", folder, tmp_path / "x.npy", "--out", tmp_path / "o.npy")
    assert code == 2 and "'os:system'" in err and "--trust-factory os:system" in err
    _no_traceback(err)
    code, err = main_cli("sample", folder, "-n", 3, "--out", tmp_path / "s.npy")
    assert code == 2 and "os:system" in err
    assert not pwned.exists() and not (tmp_path / "o.npy").exists() and not (tmp_path / "s.npy").exists()
    with pytest.raises(CLIError, match="trust_factory='os:system'"):
        ckpt.load_model(folder)


def test_model_file_factory_runs_only_when_named(tmp_path, main_cli, monkeypatch):
    factory, marker = _evil_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from tests.cli._tinyflow import TinyFlow

    state = TinyFlow((2,)).state_dict()
    folder = _hostile_model(tmp_path, factory, {"shape": [2]}, state)
    np.save(tmp_path / "x.npy", np.zeros((4, 2), np.float32))
    code, err = main_cli("score", folder, tmp_path / "x.npy", "--out", tmp_path / "o.npy")
    assert code == 2 and factory in err
    assert not marker.exists() and not (tmp_path / "imported.txt").exists()
    assert "evil_pkg_ff" not in sys.modules  # not even imported
    # another trusted name does not help
    code, err = main_cli("score", folder, tmp_path / "x.npy", "--out", tmp_path / "o.npy",
                         "--trust-factory", "tests.cli._tinyflow:build")
    assert code == 2 and not marker.exists()
    # the person names it: it runs
    code, err = main_cli("score", folder, tmp_path / "x.npy", "--out", tmp_path / "o.npy", "--quiet",
                         "--trust-factory", factory)
    assert code == 0, err
    assert marker.exists() and np.load(tmp_path / "o.npy").shape == (4,)
    sys.modules.pop("evil_pkg_ff", None)


def test_registry_spec_is_only_passed_to_build(tmp_path, main_cli):
    # the default factory with a spec that names no registered model: refused, nothing imported
    folder = _hostile_model(tmp_path, ckpt.DEFAULT_FACTORY, {"name": "os", "shape": [2], "kwargs": {}})
    code, err = main_cli("sample", folder, "-n", 2, "--out", tmp_path / "s.npy")
    assert code == 2 and "unknown flow 'os'" in err
    _no_traceback(err)


# ----------------------------------------------------------------------------- 2. --overwrite deletes nothing foreign


def test_overwrite_refuses_a_foreign_folder_with_config_json(tmp_path, main_cli):
    out = tmp_path / "someones_model"
    (out / "src").mkdir(parents=True)
    files = {"config.json": '{"hidden_size": 768}', "pytorch_model.bin": "weights", "src/main.py": "print(1)"}
    for name, text in files.items():
        (out / name).write_text(text)
    for extra in ([], ["--overwrite"]):
        code, err = main_cli(*_fit_args(out, 10, *extra))
        assert code == 2 and "not a fastflow run folder" in err
    for name, text in files.items():
        assert (out / name).read_text() == text


def test_overwrite_removes_only_fits_files(tmp_path, main_cli):
    out = tmp_path / "run"
    assert main_cli(*_fit_args(out, 10))[0] == 0
    (out / "notes.txt").write_text("my notes")
    (out / "plots").mkdir()
    (out / "plots" / "a.png").write_text("png")
    code, err = main_cli(*_fit_args(out, 20, "--overwrite"))
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "my notes" and (out / "plots" / "a.png").exists()
    assert json.loads((out / "summary.json").read_text())["steps"] == 20
    assert (out / ".fastflow-run").is_file()


# ----------------------------------------------------------------------------- 5. corrupted checkpoints


def _flip_bit_in_largest_tensor(path: Path) -> None:
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        with open(path, "rb") as f:
            f.seek(info.header_offset + 26)
            name_len, extra_len = np.frombuffer(f.read(4), dtype="<u2")
        start = info.header_offset + 30 + int(name_len) + int(extra_len)
    with open(path, "r+b") as f:
        f.seek(start + info.file_size // 2)
        byte = f.read(1)[0]
        f.seek(start + info.file_size // 2)
        f.write(bytes([byte ^ 0x10]))


def test_corrupt_checkpoint_is_refused_and_previous_recovers(tmp_path, main_cli):
    ref = tmp_path / "ref"
    assert main_cli(*_fit_args(ref, 40))[0] == 0
    out = tmp_path / "run"
    assert main_cli(*_fit_args(out, 40))[0] == 0
    (out / "summary.json").unlink()  # as if killed after its last checkpoint
    assert torch.load(out / "checkpoint.prev.pt", weights_only=True)["step"] == 30
    _flip_bit_in_largest_tensor(out / "checkpoint.pt")
    code, err = main_cli(*_fit_args(out, 40))
    assert code == 2 and "checkpoint.pt is corrupt" in err and "--recover" in err and "step 30" in err
    _no_traceback(err)
    code, err = main_cli(*_fit_args(out, 40, "--recover"))
    assert code == 0, err
    assert (out / "checkpoint.pt.corrupt").exists()  # kept, not deleted
    a = torch.load(ref / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed from step 30: the same final model


def test_modified_tensor_and_flipped_bytes_are_refused(tmp_path, model_file, main_cli):
    obj = torch.load(model_file, weights_only=True)
    key = next(iter(obj["state_dict"]))
    obj["state_dict"][key] = obj["state_dict"][key] + 1e-3  # digest left as it was
    torch.save(obj, tmp_path / "edited.pt")
    code, err = main_cli("sample", tmp_path / "edited.pt", "-n", 2, "--out", tmp_path / "s.npy")
    assert code == 2 and "edited.pt is corrupt" in err
    raw = bytearray(model_file.read_bytes())
    rng = np.random.default_rng(0)
    for trial in range(5):
        bad = bytearray(raw)
        for pos in rng.integers(0, len(bad), 5):
            bad[pos] ^= 0xFF
        path = tmp_path / f"bad{trial}.pt"
        path.write_bytes(bytes(bad))
        code, err = main_cli("sample", path, "-n", 2, "--out", tmp_path / "s.npy")
        assert code == 2 and f"bad{trial}.pt" in err, err
        _no_traceback(err)


# ----------------------------------------------------------------------------- 6. changed data


def test_resume_refuses_changed_data(tmp_path, main_cli):
    x = np.random.default_rng(0).normal(size=(600, 2)).astype(np.float32)
    data = tmp_path / "x.npy"
    np.save(data, x)
    out = tmp_path / "run"
    args = _fit_args(out, 20, data=data)
    assert main_cli(*args)[0] == 0
    (out / "summary.json").unlink()
    np.save(data, x[::-1].copy())  # same path, same size, other contents
    code, err = main_cli(*args)
    assert code == 2 and "changed since this run started" in err and "--allow-data-change" in err
    code, err = main_cli(*args, "--allow-data-change")
    assert code == 0, err
    # another path is another configuration: refused by the config check, naming the key
    (out / "summary.json").unlink()
    np.save(tmp_path / "moved.npy", x[::-1].copy())
    code, err = main_cli(*_fit_args(out, 20, data=tmp_path / "moved.npy"))
    assert code == 2 and "'data'" in err


# ----------------------------------------------------------------------------- 9. CSV headers


def test_csv_first_row_garbage_is_a_bad_row_not_a_header(tmp_path, model_file, main_cli):
    x = np.random.default_rng(1).normal(size=(20, 2)).astype(np.float32)
    lines = ["1,x"] + [f"{a!r},{b!r}" for a, b in x.tolist()]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    code, err = main_cli("score", model_file, tmp_path / "d.csv", "--out", tmp_path / "o.npy")
    assert code == 2 and "0 (not a number)" in err
    code, err = main_cli("score", model_file, tmp_path / "d.csv", "--out", tmp_path / "o.npy", "--on-bad-rows", "nan",
                         "--quiet")
    assert code == 0, err
    lp = np.load(tmp_path / "o.npy")
    assert lp.shape == (21,) and np.isnan(lp[0]) and np.isfinite(lp[1:]).all()
    flow, _ = ckpt.load_model(model_file)
    with torch.no_grad():
        np.testing.assert_allclose(lp[1:], flow.log_prob(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)


def test_csv_header_reported_and_forced(tmp_path, model_file, main_cli):
    x = np.random.default_rng(2).normal(size=(10, 2)).astype(np.float32)
    rows = [f"{a!r},{b!r}" for a, b in x.tolist()]
    (tmp_path / "h.csv").write_text("\n".join(["a,b"] + rows) + "\n")
    code, err = main_cli("score", model_file, tmp_path / "h.csv", "--out", tmp_path / "o.npy")
    assert code == 0 and "taken as a header ('a,b')" in err
    assert np.load(tmp_path / "o.npy").shape == (10,)
    code, err = main_cli("score", model_file, tmp_path / "h.csv", "--out", tmp_path / "o2.npy", "--csv-header", "no")
    assert code == 2 and "0 (not a number)" in err
    (tmp_path / "n.csv").write_text("\n".join(rows) + "\n")
    code, err = main_cli("score", model_file, tmp_path / "n.csv", "--out", tmp_path / "o3.npy", "--csv-header", "yes",
                         "--quiet")
    assert code == 0 and np.load(tmp_path / "o3.npy").shape == (9,)
    # fit: the same rule, the bad first row named
    (tmp_path / "fitdata.csv").write_text("\n".join(["1,x"] + rows * 20) + "\n")
    code, err = main_cli(*_fit_args(tmp_path / "r", 5, data=tmp_path / "fitdata.csv"))
    assert code == 2 and "0 (not a number)" in err


# ----------------------------------------------------------------------------- 10/11. one-line errors


@pytest.mark.parametrize("case", ["out_parent_is_file", "out_impossible", "num_layers_0", "hidden_0",
                                  "bogus_env_backend", "triton_on_cpu", "seed_negative", "seed_too_big",
                                  "fit_seed_negative", "unknown_model_arg_type"])
def test_one_line_errors(tmp_path, model_file, main_cli, monkeypatch, case):
    np.save(tmp_path / "x.npy", np.zeros((8, 2), np.float32))
    (tmp_path / "a_file").write_text("")
    score = ["score", model_file, tmp_path / "x.npy", "--out"]
    argv, expect = {
        "out_parent_is_file": (score + [tmp_path / "a_file" / "o.npy"], "a_file"),
        "out_impossible": (score + ["/proc/fastflow-no-such-dir/o.npy"], "cannot"),
        "num_layers_0": (_fit_args(tmp_path / "r", 5, "--model-arg", "num_layers=0"), "num_layers must be >= 1"),
        "hidden_0": (_fit_args(tmp_path / "r", 5, "--model-arg", "hidden_features=0"), "hidden_features"),
        "bogus_env_backend": (_fit_args(tmp_path / "r", 5), "FASTFLOW_BACKEND"),
        "triton_on_cpu": (["fit", "--data", "moons", "--model", "nsf", "--model-arg", "backend=triton", "--model-arg",
                           "num_layers=1", "--model-arg", "hidden_features=8", "--steps", 2, "--batch-size", 16,
                           "--out", tmp_path / "r", "--quiet"], "triton"),
        "seed_negative": (["sample", model_file, "-n", 2, "--seed", "-1", "--out", tmp_path / "s.npy"], "--seed"),
        "seed_too_big": (["sample", model_file, "-n", 2, "--seed", str(2**64), "--out", tmp_path / "s.npy"], "--seed"),
        "fit_seed_negative": (_fit_args(tmp_path / "r", 5, "--seed", "-1"), "'seed'"),
        "unknown_model_arg_type": (_fit_args(tmp_path / "r", 5, "--model-arg", "num_layers=2.5"), "num_layers"),
    }[case]
    if case == "bogus_env_backend":
        monkeypatch.setenv("FASTFLOW_BACKEND", "bogus")
    if case == "triton_on_cpu":
        monkeypatch.delenv("FASTFLOW_BACKEND")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, err = main_cli(*argv)
    assert code == 2 and expect in err, err
    _no_traceback(err)


def test_python_api_argument_errors():
    from fastflow.ops import rq_spline

    x = torch.randn(4)
    with pytest.raises(TypeError, match="backend must be None or one of"):
        rq_spline(x, torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 2), backend=5)
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        build("realnvp", (2,), num_layers=0)
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        build("nsf", (3,), num_layers=-2)
    with pytest.raises(ValueError, match="positive integers"):
        build("nsf", (2.7,))
    with pytest.raises(TypeError, match="backend must be None"):
        build("nsf", (3,), backend=5)
    flow = build("realnvp", (2,), hidden_features=8, num_layers=2)
    with pytest.raises(ValueError, match="unconditional"):
        flow.log_prob(torch.randn(5, 2), context=torch.randn(5, 3))
    with pytest.raises(ValueError, match="unconditional"):
        flow.sample(3, context=torch.randn(3))
    cond = build("realnvp", (2,), context_features=3, hidden_features=8, num_layers=2)
    with pytest.raises(ValueError, match="conditional"):
        cond.log_prob(torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"\(5, 3\)"):
        cond.log_prob(torch.randn(5, 2), context=torch.randn(4, 3))
    from fastflow.cli.sample import chunk_seed

    with pytest.raises(ValueError):
        chunk_seed(-1, 0)
    assert chunk_seed(2**64 - 1, 0) != chunk_seed(0, 0)


# ----------------------------------------------------------------------------- 12. leftovers, self-overwrite


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_files_of_ours_are_removed_others_kept(tmp_path):
    out = tmp_path / "out.npy"
    dead = _dead_pid()
    ours_legacy = tmp_path / f".out.npy.tmp-{dead}"
    ours = tmp_path / f".out.npy.tmp-{_host()}-{_dead_pid()}"
    live = tmp_path / f".out.npy.tmp-{os.getppid()}"
    other_host = tmp_path / f".out.npy.tmp-some-other-node-{dead}"
    unrelated = tmp_path / f".other.npy.tmp-{dead}"
    for f in (ours_legacy, ours, live, other_host, unrelated):
        f.write_bytes(b"x")
    removed = remove_stale_temps(out)
    assert set(removed) == {ours_legacy, ours}
    assert live.exists() and other_host.exists() and unrelated.exists()


def test_killed_sample_leftover_is_cleaned_by_the_next_run(tmp_path, model_file):
    out = tmp_path / "s.npy"
    proc = subprocess.Popen([sys.executable, "-m", "fastflow", "sample", str(model_file), "-n", "20000000",
                             "--chunk-size", "4096", "--out", str(out), "--quiet"], cwd=REPO, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and not list(tmp_path.glob(".s.npy.tmp-*")):
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(tmp_path.glob(".s.npy.tmp-*")) and not out.exists()
    run_cli("sample", model_file, "-n", 10, "--out", out, "--quiet", check=True)
    assert np.load(out).shape == (10, 2)
    assert not list(tmp_path.glob(".s.npy.tmp-*"))


def test_score_out_equal_to_input_is_refused(tmp_path, model_file, main_cli):
    x = np.random.default_rng(0).normal(size=(6, 2)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    for out in (tmp_path / "x.npy", tmp_path / "." / "x.npy"):
        code, err = main_cli("score", model_file, tmp_path / "x.npy", "--out", out, "--overwrite")
        assert code == 2 and "input" in err
    os.symlink(tmp_path / "x.npy", tmp_path / "link.npy")
    code, err = main_cli("score", model_file, tmp_path / "x.npy", "--out", tmp_path / "link.npy", "--overwrite")
    assert code == 2 and "input" in err
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), x)


# ----------------------------------------------------------------------------- 13. hung ranks, --sizes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_stopped_rank_ends_the_job_with_a_clear_error(tmp_path):
    port = _free_port()
    out = tmp_path / "run"
    args = [sys.executable, "-m", "fastflow", *map(str, _fit_args(out, 100000, "--dist-timeout", "4",
                                                                   "--val-every", 0, "--log-every", 1))]
    procs = []
    for rank in range(2):
        env = {**cli_env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    try:
        deadline = time.time() + 120
        metrics = out / "metrics.jsonl"
        while time.time() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            assert all(p.poll() is None for p in procs), [p.stderr.read() for p in procs]
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGSTOP)
        t0 = time.time()
        procs[0].wait(90)
        waited = time.time() - t0
        err = procs[0].stderr.read()
        assert procs[0].returncode == 2, err
        assert "did not complete within --dist-timeout 4 s" in err and "Traceback" not in err
        assert waited < 60
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(30)


def test_bench_sizes_are_parsed_not_evaluated(main_cli):
    from fastflow.cli.main import build_parser

    args = build_parser().parse_args(["bench", "spline", "--sizes", "2**10,1e3,1<<4"])
    assert args.sizes == [1024, 1000, 16]
    for bad in ["().__class__.__bases__[0].__subclasses__()", "__import__('os').system('id')", "2**10**10"]:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["bench", "spline", "--sizes", bad])
