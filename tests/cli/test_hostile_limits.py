"""Hostile input, second round: forged specs that would exhaust memory or time, full disks and
impossible sizes, outputs that cannot be replaced, BOM-prefixed CSVs, unverifiable files, two
`fit` processes on one folder. Every case ends in one line, exit status 2, nothing left behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastflow.cli import checkpoint as ckpt
from fastflow.cli import io as cli_io
from fastflow.cli.errors import CLIError
from fastflow.cli.io import atomic_torch_save
from fastflow.flows import build
from tests.cli.conftest import REPO, TINY, cli_env


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


# ----------------------------------------------------------------------------- 4. full disks, impossible sizes


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MB tmpfs (needs root and mount); skipped where the machine cannot mount one (the
    RLIMIT_FSIZE and free-space tests below cover the same paths without it)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _cli(*args, limit_bytes=None, timeout=240):
    """``python -m fastflow ARGS`` in a fresh process, optionally under RLIMIT_FSIZE (SIGXFSZ ignored,
    so a write past it fails with EFBIG, as a full disk fails with ENOSPC)."""
    def limit():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "fastflow", *map(str, args)], capture_output=True, text=True,
                          env=cli_env(), timeout=timeout, cwd=REPO, preexec_fn=limit if limit_bytes else None)


def test_sample_on_a_full_small_filesystem(small_fs, model_file):
    proc = _cli("sample", model_file, "-n", 200000, "--out", small_fs / "s.npy", "--quiet")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "needs 1.6 MB" in proc.stderr and "free" in proc.stderr, proc.stderr
    _one_line(proc.stderr)
    assert not list(small_fs.iterdir())
    # fits the free-space check, then the disk fills while writing (another writer): still one line
    (small_fs / "other.bin").write_bytes(b"\0" * 1000)  # not ours: must survive
    proc = _cli("sample", model_file, "-n", 100000, "--out", small_fs / "s.npy", "--quiet")
    assert proc.returncode in (0, 2), proc.stderr
    assert proc.returncode == 0 or ("No space left" in proc.stderr or "needs" in proc.stderr), proc.stderr
    assert (small_fs / "other.bin").stat().st_size == 1000 and not _temps(small_fs)


def test_write_failure_mid_output_is_one_line_and_leaves_nothing(tmp_path, model_file):
    """A file-size limit makes every write past it fail (EFBIG), as a full disk does (ENOSPC)."""
    out = tmp_path / "s.npy"
    proc = _cli("sample", model_file, "-n", 200000, "--out", out, "--quiet", limit_bytes=1 << 20)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "cannot write" in proc.stderr and str(out) in proc.stderr, proc.stderr
    _one_line(proc.stderr)
    assert not out.exists() and not _temps(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros((1_000_000, 2), np.float32))
    proc = _cli("score", model_file, tmp_path / "x.npy", "--out", tmp_path / "lp.npy", "--quiet",
                limit_bytes=2_000_000)
    assert proc.returncode == 2 and "cannot write" in proc.stderr, proc.stderr
    _one_line(proc.stderr)
    assert not (tmp_path / "lp.npy").exists() and not _temps(tmp_path)


def test_impossible_sizes_are_refused_before_work(tmp_path, model_file, main_cli, monkeypatch):
    out = tmp_path / "s.npy"
    code, err = main_cli("sample", model_file, "-n", 10**12, "--out", out)
    assert code == 2 and "needs 8.0 TB" in err and "free" in err, err
    _one_line(err)
    assert not out.exists() and not _temps(tmp_path)
    # a disk reported full: score refuses with the numbers, before scoring
    np.save(tmp_path / "x.npy", np.zeros((1000, 2), np.float32))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=100))
    code, err = main_cli("score", model_file, tmp_path / "x.npy", "--out", tmp_path / "lp.npy")
    assert code == 2 and "needs 4.1 KB" in err and "100 bytes free" in err, err
    _one_line(err)
    assert not (tmp_path / "lp.npy").exists() and not _temps(tmp_path)


def test_fit_samples_beyond_memory_or_disk_refused_before_training(tmp_path, main_cli, monkeypatch):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    code, err = main_cli(*_fit_args(out, 100000, "--samples", 10**12))
    assert code == 2 and "'samples'" in err and "8.0 TB" in err, err
    _one_line(err)
    assert time.perf_counter() - t0 < 60
    assert not out.exists()  # nothing trained, nothing written
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    code, err = main_cli(*_fit_args(out, 100000, "--samples", 1000))
    assert code == 2 and "samples" in err and "1.0 KB free" in err, err
    assert not out.exists()


def test_fit_disk_full_during_a_checkpoint_keeps_the_last_one(tmp_path, main_cli, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def full_disk_save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("format") == ckpt.CHECKPOINT_FORMAT:
            calls["n"] += 1
            if calls["n"] == 3:  # the third checkpoint: half written, then the disk is full
                f.write(b"\0" * 100)
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk_save)
    code, err = main_cli(*_fit_args(out, 40))
    assert code == 2 and "No space left on device" in err and "intact" in err, err
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ": error:" in ln]) == 1, err
    state = ckpt.load_checkpoint(out / "checkpoint.pt", *(lambda o: (o["factory"], o["spec"]))(
        torch.load(out / "checkpoint.pt", weights_only=True)))
    assert state["step"] == 20  # the last complete one, verified
    assert not _temps(tmp_path) and not (out / ".fastflow-run.lock").exists()
    monkeypatch.setattr(torch, "save", real_save)
    code, err = main_cli(*_fit_args(out, 40))  # space again: the same command resumes
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["steps"] == 40


# ----------------------------------------------------------------------------- 9. --out that cannot be replaced


def test_out_onto_an_immutable_file(tmp_path, model_file, main_cli):
    out = tmp_path / "s.npy"
    np.save(out, np.ones(3, np.float32))
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("chattr +i needs root (test_out_replace_refused_by_the_os covers the same path)")
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem has no immutable attribute")
    try:
        code, err = main_cli("sample", model_file, "-n", 5, "--out", out, "--overwrite", "--quiet")
    finally:
        subprocess.run(["chattr", "-i", str(out)], capture_output=True)
    assert code == 2 and str(out) in err and "not permitted" in err, err
    _one_line(err)
    np.testing.assert_array_equal(np.load(out), np.ones(3, np.float32))
    assert not _temps(tmp_path)


def test_out_replace_refused_by_the_os(tmp_path, model_file, main_cli, monkeypatch):
    out = tmp_path / "s.npy"
    np.save(out, np.ones(3, np.float32))
    real = os.replace

    def refuse(src, dst, *a, **k):
        if Path(dst) == out:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", refuse)
    for argv in (["sample", model_file, "-n", 5], ["score", model_file, tmp_path / "x.npy"]):
        np.save(tmp_path / "x.npy", np.zeros((4, 2), np.float32))
        code, err = main_cli(*argv, "--out", out, "--overwrite", "--quiet")
        assert code == 2 and str(out) in err and "not permitted" in err, err
        _one_line(err)
        np.testing.assert_array_equal(np.load(out), np.ones(3, np.float32))
        assert not _temps(tmp_path)


# ----------------------------------------------------------------------------- 11. a CSV with a byte-order mark


def test_csv_with_bom_and_no_header(tmp_path, model_file, main_cli):
    x = np.random.default_rng(4).normal(size=(12, 2)).astype(np.float32)
    text = "\n".join(f"{a!r},{b!r}" for a, b in x.tolist()) + "\n"
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    code, err = main_cli("score", model_file, tmp_path / "bom.csv", "--out", tmp_path / "o.npy", "--quiet")
    assert code == 0, err
    lp = np.load(tmp_path / "o.npy")
    flow, _ = ckpt.load_model(model_file)
    with torch.no_grad():
        np.testing.assert_allclose(lp, flow.log_prob(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)
    # with a header: the header is recognised as one (the BOM is not part of it)
    (tmp_path / "bomh.csv").write_bytes(b"\xef\xbb\xbf" + ("a,b\n" + text).encode())
    code, err = main_cli("score", model_file, tmp_path / "bomh.csv", "--out", tmp_path / "o2.npy")
    assert code == 0 and "('a,b')" in err, err
    np.testing.assert_array_equal(np.load(tmp_path / "o2.npy"), lp)


# ----------------------------------------------------------------------------- bench


def test_bench_refuses_sizes_beyond_memory_and_an_out_file(tmp_path, main_cli):
    code, err = main_cli("bench", "spline", "--device", "cpu", "--sizes", "2**40", "--out", tmp_path / "b")
    assert code == 2 and "--sizes" in err and "memory" in err, err
    _one_line(err)
    (tmp_path / "f").write_text("mine")
    t0 = time.perf_counter()
    code, err = main_cli("bench", "spline", "--device", "cpu", "--sizes", "2**10", "--out", tmp_path / "f")
    assert code == 2 and "--out" in err and "not a folder" in err, err
    _one_line(err)
    assert time.perf_counter() - t0 < 10 and (tmp_path / "f").read_text() == "mine"


# ----------------------------------------------------------------------------- two fits on one folder


def test_second_fit_on_a_live_run_is_refused_and_a_stale_lock_is_not(tmp_path, main_cli):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".fastflow-run.lock"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(), "host_id": cli_io._host()}))
        code, err = main_cli(*_fit_args(out, 10))
        assert code == 2 and f"PID {other.pid}" in err and socket.gethostname() in err, err
        _one_line(err)
        assert json.loads(lock.read_text())["pid"] == other.pid  # not ours: left alone
    finally:
        other.kill()
        other.wait()
    # the same lock once its process is gone: stale, taken over; released at the end
    code, err = main_cli(*_fit_args(out, 10))
    assert code == 0, err
    assert not lock.exists() and (out / "summary.json").exists()
    # another host's lock cannot be judged from here: refused
    lock.write_text(json.dumps({"pid": 1, "host": "node-elsewhere", "host_id": "node-elsewhere"}))
    code, err = main_cli(*_fit_args(out, 10, "--overwrite"))
    assert code == 2 and "node-elsewhere" in err, err


def test_two_concurrent_fits_one_is_refused(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "fastflow", *map(str, _fit_args(out, 100000, "--val-every", 0))]
    first = subprocess.Popen(args, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "checkpoint.pt").exists():
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.1)
        second = subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and f"PID {first.pid}" in second.stderr, second.stderr
        _one_line(second.stderr)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
