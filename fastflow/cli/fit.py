"""``fastflow fit [CONFIG.toml] [--flags]``: train a flow by maximum likelihood (or, for a CNF, by flow
matching: ``--objective flow-matching``), resumably.

``fastflow fit`` alone trains the default model (an NSF on the embedded ``digits`` set) into
``runs/nsf-digits``. Output folder (``--out``)::

    .fastflow-run   the marker that makes this a fastflow run folder (only fit writes it)
    config.json     the resolved configuration
    metrics.jsonl   one JSON object per line: {"step", "loss", "lr", ...} and {"step", "val_ll", ...}
    checkpoint.pt   resumable training state (every ``checkpoint_every`` steps, atomically)
    checkpoint.prev.pt  the checkpoint before it, kept in case checkpoint.pt is damaged
    model.pt        the best model so far (by validation log-likelihood); what score/sample load
    samples.npy     samples from the final model; samples.png for 2-D and image data
    summary.json    test log-likelihood (nats, bits/dim), timings; written last = run complete

Resume: re-running the same command continues from ``checkpoint.pt`` and ends with the same
parameters as an uninterrupted run (the data order is a function of (seed, epoch), and the step
fixes the position in it; model, optimiser, scheduler, RNG and early-stopping state are restored).
A checkpoint whose digest does not match is refused, naming it (``--recover`` continues from
the verified ``checkpoint.prev.pt``, which gives the same final model); a data file whose size or
SHA-256 changed since the run started is refused (``--allow-data-change`` to resume anyway).

Folders: only a folder holding the ``.fastflow-run`` marker is taken for a run. ``--overwrite``
removes the files listed above (and fit's own temporary files), nothing else; a non-empty folder
without the marker is refused either way.

Distributed: under ``torchrun`` each of the K ranks takes a contiguous 1/K of every global batch
(``batch_size`` must be divisible by K), DDP averages the gradients, so the update is the
single-process one up to floating-point summation order; rank 0 writes all files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

import fastflow
from fastflow.backends import BackendUnavailableError, UnknownBackendError
from fastflow.cli import checkpoint as ckpt
from fastflow.cli import config as config_mod
from fastflow.cli import dist
from fastflow.cli.errors import CLIError, report
from fastflow.cli.io import (DISK_FULL_ERRNOS, _fmt_bytes, _host, _pid_alive, atomic_save_npy, atomic_torch_save,
                             atomic_write_json, atomic_write_text, check_free_space, file_fingerprint, replace_into,
                             write_error)
from fastflow.cli.progress import Progress

MARKER = ".fastflow-run"
LOCK = ".fastflow-run.lock"  # held by the fit writing this folder: {"pid", "host", "started"}
CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
CORRUPT = "checkpoint.pt.corrupt"
# Everything fit writes into a run folder: the only names --overwrite removes.
RUN_FILES = (MARKER, "config.json", "metrics.jsonl", CHECKPOINT, PREVIOUS, CORRUPT, "model.pt", "samples.npy",
             "samples.png", "summary.json")
# Samples held in memory at the end of a run: refused up front beyond this share of the free memory.
SAMPLES_MEMORY_SHARE = 0.5
_OUR_TEMP = re.compile(r"^\.(" + "|".join(re.escape(n) for n in RUN_FILES) + r")\.tmp-[A-Za-z0-9-]+(\.png)?$")


def add_parser(sub):
    p = sub.add_parser("fit", help="train a flow (resumable; torchrun for several processes)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=None, help="TOML config file (flags override it)")
    config_mod.add_flags(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    env = None
    try:
        resolved = config_mod.resolve(args)
        cfg = resolved.config
        if args.print_config:
            sys.stdout.write(config_mod.to_toml(cfg))
            return 0
        env = dist.init(cfg["device"], cfg["threads"], cfg["dist_timeout"])
        return fit(cfg, env)
    except CLIError as e:
        return report("fit", e, env.rank if env else int(os.environ.get("RANK", "0") or 0))
    except OSError as e:  # a full disk or quota: the user's to fix; the last checkpoint is intact
        if e.errno not in DISK_FULL_ERRNOS:
            raise
        return report("fit", write_error(e.filename or "the run folder", e),
                      env.rank if env else int(os.environ.get("RANK", "0") or 0))
    except (BackendUnavailableError, UnknownBackendError) as e:
        return report("fit", CLIError(str(e)), env.rank if env else int(os.environ.get("RANK", "0") or 0))
    finally:
        if env is not None:
            dist.shutdown(env)


# --------------------------------------------------------------------------- helpers


class _Loss(torch.nn.Module):
    """The batch loss as a module's ``forward`` (DDP needs the computation there; a Flow's
    forward may be something else): ``-mean log p(x)``, or another objective of the flow's."""

    def __init__(self, flow, objective: str = "nll"):
        super().__init__()
        self.flow = flow
        self.objective = objective

    def forward(self, x):
        if self.objective == "nll":
            return -self.flow.log_prob(x).mean()
        from fastflow.flows import training_loss

        return training_loss(self.flow, x, self.objective)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the training rows in ``epoch``: a pure function of (seed, epoch)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0xDA7A]).permutation(n)


def _rng_state() -> dict:
    s = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": s[0], "keys": torch.from_numpy(s[1].astype(np.int64)), "pos": int(s[2]),
                       "has_gauss": int(s[3]), "cached_gaussian": float(s[4])},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _make_optimizer(cfg, params):
    if cfg["optimizer"] in ("adam", "adamw"):  # torch's fused Adam where it has one (fastflow.flows.adam)
        from fastflow.flows.training import adam

        return adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], decoupled=cfg["optimizer"] == "adamw")
    return torch.optim.SGD(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], momentum=0.9)


def _make_scheduler(cfg, opt):
    steps = cfg["steps"]
    if cfg["scheduler"] == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps)))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def default_out(cfg) -> Path:
    model = cfg["model"].replace(":", "-").replace("/", "-")
    data = Path(cfg["data"]).stem if "/" in cfg["data"] or "." in cfg["data"] else cfg["data"]
    return Path("runs") / f"{model}-{data}"


def _is_run_folder(out: Path) -> bool:
    marker = out / MARKER
    if not marker.is_file() or marker.is_symlink():
        return False
    try:
        return json.loads(marker.read_text()).get("fastflow_run") == 1
    except (OSError, ValueError, AttributeError):
        return False


def _write_marker(out: Path) -> None:
    atomic_write_json(out / MARKER, {"fastflow_run": 1, "fastflow_version": fastflow.__version__,
                                     "note": "written by `fastflow fit`; marks this folder as its run folder"})


def _remove_run_files(out: Path) -> list[str]:
    """Delete the files fit writes (and its temporary files), nothing else; the folder stays."""
    removed = []
    for entry in out.iterdir():
        if entry.name == MARKER:
            continue  # last, so an interrupted overwrite still leaves a recognisable run folder
        if (entry.name in RUN_FILES or _OUR_TEMP.match(entry.name)) and (entry.is_file() or entry.is_symlink()):
            entry.unlink()
            removed.append(entry.name)
    (out / MARKER).unlink(missing_ok=True)
    return removed


def _data_fingerprint(cfg: dict, data) -> dict:
    if data.info.get("kind") == "embedded":
        return {"embedded": data.info["name"]}
    return file_fingerprint(cfg["data"])  # the contents, not the path: a moved file is the same data


def _choose_checkpoint(out: Path, cfg: dict, factory: str, spec: dict, fingerprint: dict, log) -> str:
    """The checkpoint file to resume from, verified; raise a CLIError naming a bad one."""
    ck, prev = out / CHECKPOINT, out / PREVIOUS
    name = CHECKPOINT
    if not ck.exists():  # only a predecessor: resume from it
        name = PREVIOUS
    try:
        state = ckpt.load_checkpoint(out / name, factory, spec)
    except ckpt.CorruptFileError as e:
        if name == PREVIOUS:
            raise CLIError(f"{e}; no intact checkpoint is left: pass --overwrite to start the run again") from None
        try:
            state = ckpt.load_checkpoint(prev, factory, spec) if prev.exists() else None
        except CLIError:
            state = None
        if state is None:
            raise CLIError(f"{e}; there is no intact previous checkpoint ({prev.name}): pass --overwrite to start "
                           "the run again") from None
        if not cfg["recover"]:
            raise CLIError(f"{e}; the previous checkpoint {prev} (step {state['step']}) is intact: re-run with "
                           "--recover to continue from it (same final model), or --overwrite to start again") from None
        os.replace(ck, out / CORRUPT)  # kept for inspection, out of the way of the next save
        log(f"{ck} is corrupt (moved to {CORRUPT}); resuming from {prev.name} at step {state['step']}")
        name = PREVIOUS
    saved = state.get("data_fingerprint")
    if saved is not None and saved != fingerprint and not cfg["allow_data_change"]:
        what = ("another embedded data set" if "embedded" in saved or "embedded" in fingerprint else
                f"{saved.get('size')} bytes, sha256 {str(saved.get('sha256'))[:12]}... then; {fingerprint.get('size')} "
                f"bytes, sha256 {str(fingerprint.get('sha256'))[:12]}... now")
        raise CLIError(f"data file {cfg['data']} changed since this run started ({what}); pass --allow-data-change "
                       "to resume on the new contents anyway, or --overwrite to start again")
    if saved is not None and saved != fingerprint:
        log(f"warning: data file {cfg['data']} changed since this run started; resuming on it as asked")
    return name


def _read_lock(lock: Path) -> dict | None:
    try:
        info = json.loads(lock.read_text())
        return info if isinstance(info, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # torn or foreign: not ours to judge stale


def acquire_lock(out: Path, log) -> Path:
    """Take ``out/.fastflow-run.lock`` (created exclusively). A lock of a live process, or of
    another host (whose processes we cannot see), is refused naming its PID and host; a lock left
    by a dead process of this host is taken over."""
    lock = out / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "host_id": _host(), "started": time.time()}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            info = _read_lock(lock)
            if info is None:
                continue  # released meanwhile: try again
            pid, host = info.get("pid"), info.get("host_id")
            if isinstance(pid, int) and host == _host() and not _pid_alive(pid):
                log(f"removing the stale lock of process {pid} (no longer running) on {out}")
                lock.unlink(missing_ok=True)
                continue
            raise CLIError(f"output folder {out} is in use by another fastflow fit (PID {info.get('pid', '?')} on "
                           f"host {info.get('host', '?')}); wait for it to finish or choose another --out (if that "
                           f"process is gone, remove {lock})") from None
        except OSError as e:
            raise CLIError(f"cannot lock the run folder {out}: {e.strerror or e}") from None
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        except OSError as e:
            lock.unlink(missing_ok=True)
            raise write_error(lock, e) from None
        return lock
    raise CLIError(f"cannot lock the run folder {out}: its lock {lock} keeps changing")


def release_lock(lock: Path | None) -> None:
    """Remove the lock if it is still ours (never another process's)."""
    if lock is None:
        return
    info = _read_lock(lock)
    if info and info.get("pid") == os.getpid() and info.get("host_id") == _host():
        lock.unlink(missing_ok=True)


def _prepare_out(out: Path, cfg: dict, factory: str, spec: dict, fingerprint: dict, log) -> tuple[str, str]:
    """Decide (on rank 0) whether to start fresh or resume (and from which checkpoint); raise for
    folders we must not touch."""
    want = config_mod.comparable(cfg)
    if out.exists() and not out.is_dir():
        raise CLIError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(e.name != LOCK for e in out.iterdir()):
        if not _is_run_folder(out):
            raise CLIError(f"output folder {out} exists and is not a fastflow run folder (it has no {MARKER} "
                           "marker); nothing in it was changed; choose another --out")
        if cfg["overwrite"]:
            _remove_run_files(out)
            return "fresh", ""
        saved_path = out / "config.json"
        if (out / "summary.json").exists():
            raise CLIError(f"output folder {out} holds a finished run; pass --overwrite to redo it or choose "
                           "another --out")
        try:
            saved = json.loads(saved_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CLIError(f"cannot read {saved_path}: {e}") from None
        key = config_mod.first_difference(config_mod.comparable(saved), want)
        if key is not None:
            raise CLIError(f"output folder {out} holds a run with a different '{key}' ({saved.get(key)!r}, now "
                           f"{cfg.get(key)!r}); pass --overwrite to replace it or choose another --out")
        for stale in out.iterdir():  # half-written by a killed predecessor; never read
            if _OUR_TEMP.match(stale.name) and stale.is_file():
                stale.unlink(missing_ok=True)
        if (out / CHECKPOINT).exists() or (out / PREVIOUS).exists():
            return "resume", _choose_checkpoint(out, cfg, factory, spec, fingerprint, log)
        return "fresh", ""
    return "fresh", ""


def _probe(flow, data, device, model: str) -> None:
    """Evaluate the model once on two training rows before anything is written: a backend that
    cannot run here, or a model that does not fit the data, fails now with one line. Eval mode,
    no gradients and a forked RNG: no state changes (data-dependent inits wait for training)."""
    flow.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            flow.log_prob(data.train.rows(np.arange(min(2, len(data.train)))).to(device))
    except (BackendUnavailableError, UnknownBackendError, TypeError, ValueError) as e:
        raise CLIError(f"model {model!r} cannot run on {device} for data of shape {tuple(data.shape)}: "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _save_checkpoint_file(payload: dict, out: Path) -> None:
    """checkpoint.pt, atomically (the one before kept as checkpoint.prev.pt). A failed write (a full
    disk) leaves both as they were and says so."""
    try:
        atomic_torch_save(payload, out / CHECKPOINT, keep_previous=out / PREVIOUS)
    except CLIError as e:
        last = "the last checkpoint is intact" if (out / CHECKPOINT).exists() else "no checkpoint was written yet"
        raise CLIError(f"{e}; {last}: free some space and re-run the same command to resume") from None


def _metric_step(line: str) -> float:
    """The step of a metrics line; a line torn by a kill mid-write counts as after any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _evaluate(flow, split, env, batch_size, device) -> tuple[float, int, int]:
    """Mean log-likelihood over ``split`` (ranks take contiguous shards; sums all-reduced)."""
    start, stop = dist.shard_range(len(split), env.rank, env.world_size)
    total, count, nonfinite = 0.0, 0, 0
    was_training = flow.training
    flow.eval()
    with torch.no_grad():
        for a in range(start, stop, batch_size):
            lp = flow.log_prob(split.range(a, min(a + batch_size, stop)).to(device)).double()
            finite = torch.isfinite(lp)
            nonfinite += int((~finite).sum())
            total += float(lp[finite].sum())
            count += int(finite.sum())
    flow.train(was_training)
    total, count, nonfinite = dist.all_reduce_sum(env, [total, count, nonfinite])
    return (total / count if count else float("nan")), int(count), int(nonfinite)


def _sample(flow, n: int, seed: int) -> np.ndarray:
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        flow.eval()
        return flow.sample(n).detach().cpu().numpy()


def _plot(samples: np.ndarray, data: np.ndarray, shape, path: Path, title: str) -> str | None:
    """samples.png for 2-D points (scatter against data) or images (a grid); None if not plottable."""
    kind = None
    if tuple(shape) == (2,):
        kind = "points"
    elif len(shape) == 3 and shape[0] in (1, 3):
        kind = "images"
    elif len(shape) == 1 and math.isqrt(shape[0]) ** 2 == shape[0] >= 16 and title.startswith("digits"):
        kind = "images"
        side = math.isqrt(shape[0])
        samples, data = samples.reshape(-1, 1, side, side), data.reshape(-1, 1, side, side)
    if kind is None:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fastflow fit: matplotlib is not installed, so no samples.png "
              "(pip install 'fastflow[plot]'); samples.npy is written", file=sys.stderr)
        return None
    if kind == "points":
        fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
        axes[0].scatter(data[:, 0], data[:, 1], s=2, alpha=0.5)
        axes[0].set_title("data")
        axes[1].scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.5, color="C1")
        axes[1].set_title("samples")
    else:
        k = min(64, len(samples))
        cols = 8
        rows = max(1, math.ceil(k / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(cols, rows))
        for i, ax in enumerate(np.atleast_1d(axes).ravel()):
            ax.axis("off")
            if i < k:
                img = samples[i]
                img = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
                lo, hi = float(np.min(data)), float(np.max(data))
                ax.imshow(np.clip((img - lo) / (hi - lo + 1e-12), 0, 1), cmap="gray")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from None
    finally:
        plt.close(fig)
    replace_into(tmp, path)
    return path.name


# --------------------------------------------------------------------------- the run


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_samples_fit(cfg: dict, shape, out: Path) -> None:
    """``samples`` are drawn in one batch after training and written to samples.npy: refuse, before
    training, a number whose array alone would not fit the free memory or the disk."""
    n = cfg["samples"]
    if not n:
        return
    nbytes = n * int(np.prod(shape, dtype=np.int64)) * 4
    mem = _available_memory()
    if mem is not None and nbytes > SAMPLES_MEMORY_SHARE * mem:
        raise CLIError(f"config key 'samples': {n} samples of shape {tuple(shape)} are {_fmt_bytes(nbytes)}, more "
                       f"than this machine can hold ({_fmt_bytes(mem)} of memory available); lower 'samples' (use "
                       "fastflow sample for large draws)")
    check_free_space(out / "samples.npy", nbytes + 128, "samples (config key 'samples') for")


def fit(cfg: dict, env: dist.DistEnv) -> int:
    """Train as configured; rank 0 holds the run folder's lock throughout, released on any exit."""
    held: list[Path] = []
    try:
        return _fit(cfg, env, held)
    finally:
        for lock in held:
            release_lock(lock)


def _fit(cfg: dict, env: dist.DistEnv, held: list) -> int:
    from fastflow.cli import data as data_mod

    t_start = time.perf_counter()
    main = env.is_main
    log = (lambda msg: print(f"fastflow fit: {msg}", file=sys.stderr, flush=True)) if main else (lambda msg: None)
    out = Path(cfg["out"]) if cfg["out"] else default_out(cfg)
    B, K = cfg["batch_size"], env.world_size
    if B % K:
        raise CLIError(f"config key 'batch_size': {B} is not divisible by the {K} ranks")

    data = data_mod.load(cfg, log=log)
    n_train = len(data.train)
    if n_train < B:
        raise CLIError(f"config key 'batch_size': {B} is larger than the training set ({n_train} rows)")
    batches_per_epoch = n_train // B  # the ragged tail of each epoch's order is skipped

    seed = cfg["seed"]
    torch.manual_seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    random.seed(seed)
    flow, factory = ckpt.build_model(cfg["model"], data.shape, cfg["model_args"])
    spec = ckpt.spec_of(flow)
    device = env.device
    if device.type != "cpu":  # a no-op on the CPU; skipping it also keeps Module.to out of the way
        flow.to(device)
    _probe(flow, data, device, cfg["model"])
    if cfg["objective"] != "nll" and not hasattr(flow, "flow_matching_loss"):
        raise CLIError(f"config key 'objective': {cfg['objective']!r} trains a continuous flow's vector field; model "
                       f"{cfg['model']!r} has none (use --model cnf, or --objective nll)")
    flow.train()
    opt = _make_optimizer(cfg, flow.parameters())
    sched = _make_scheduler(cfg, opt)

    # Rank 0 decides about the folder; everyone follows (or everyone fails with its message).
    decision = None
    fingerprint = None
    lock = None
    created = False
    if main:
        try:
            fingerprint = _data_fingerprint(cfg, data)
            if (out.exists() and not out.is_dir()) or (
                    out.is_dir() and any(e.name != LOCK for e in out.iterdir()) and not _is_run_folder(out)):
                _prepare_out(out, cfg, factory, spec, fingerprint, log)  # refuses what is not ours, touching nothing
            created = not out.exists()
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CLIError(f"cannot create the run folder {out}: {e.strerror or e}") from None
            lock = acquire_lock(out, log)
            held.append(lock)
            decision = ("ok", *_prepare_out(out, cfg, factory, spec, fingerprint, log))
            _check_samples_fit(cfg, data.shape, out)
        except CLIError as e:
            release_lock(lock)
            held.clear()
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # made by this run a moment ago, still empty: leave nothing behind
            decision = ("error", str(e))
    decision = dist.broadcast_object(env, decision)
    if decision[0] == "error":
        raise CLIError(decision[1])
    mode, resume_from = decision[1], decision[2]

    step, best_val, best_step, bad_evals, stopped, elapsed_before = 0, -math.inf, -1, 0, False, 0.0
    best_state = None
    metrics_path = out / "metrics.jsonl"
    if mode == "fresh" and main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            _write_marker(out)
            atomic_write_json(out / "config.json", cfg)
            atomic_write_text(metrics_path, "")
        except OSError as e:
            decision = ("error", f"cannot write the run folder {out}: {e.strerror or e}")
    if mode == "fresh":
        decision = dist.broadcast_object(env, decision)
        if decision[0] == "error":
            raise CLIError(decision[1])
    dist.barrier(env)
    if mode == "resume":
        state = ckpt.load_checkpoint(out / resume_from, factory, spec)
        ckpt.load_state(flow, state["model"], out / resume_from)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        rngs = state["rng"]
        _set_rng_state(rngs[env.rank] if len(rngs) == K else rngs[0])
        if len(rngs) != K:
            log(f"resuming a {len(rngs)}-rank checkpoint on {K} ranks: same data order, RNG streams not exact")
        step, best_val, best_step = state["step"], state["best_val"], state["best_step"]
        bad_evals, stopped, elapsed_before = state["bad_evals"], state["stopped"], state["elapsed_s"]
        best_state = state["best_state"]
        if main:  # drop metric lines written after this checkpoint: they will be written again
            lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
            keep = [ln for ln in lines if _metric_step(ln) <= step]
            atomic_write_text(metrics_path, "".join(ln + "\n" for ln in keep))
        log(f"resuming {out} from step {step}/{cfg['steps']}")
    elif main:
        log(f"training {cfg['model']} on {data.info['name']} {tuple(data.shape)} "
            f"({n_train} train rows, {K} rank(s), {cfg['steps']} steps) -> {out}")
    dist.barrier(env)

    module = _Loss(flow, cfg["objective"])
    if env.enabled:
        module = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:
        # the loss and its backward through torch.compile (static batch shape: one graph per
        # model without data-dependent loops; the first steps pay the compilation)
        module = torch.compile(module, dynamic=False)
        if main:
            log("compiling the training step (torch.compile; the first step takes longer)")
    local = B // K
    metrics_file = open(metrics_path, "a") if main else None

    def write_metrics(rec: dict) -> None:
        if metrics_file:
            try:
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
            except OSError as e:
                raise CLIError(f"{write_error(metrics_path, e)}; the last checkpoint is intact: free some space and "
                               "re-run the same command to resume") from None

    def save_checkpoint() -> None:
        rngs = dist.gather_objects(env, _rng_state())
        if main:
            _save_checkpoint_file(ckpt.checkpoint_payload(
                factory=factory, spec=spec, model={k: v.detach().cpu() for k, v in flow.state_dict().items()},
                optimizer=opt.state_dict(), scheduler=sched.state_dict(), rng=rngs, step=step,
                epoch=step // batches_per_epoch, position=step % batches_per_epoch, best_val=best_val,
                best_step=best_step, bad_evals=bad_evals, stopped=stopped, best_state=best_state,
                elapsed_s=elapsed_before + time.perf_counter() - t_start, world_size=K,
                config=config_mod.comparable(cfg), data_fingerprint=fingerprint), out)
        dist.barrier(env)

    def save_model(state) -> None:
        if main:
            flow_state = {k: v.clone() for k, v in flow.state_dict().items()}
            flow.load_state_dict(state)
            atomic_torch_save(ckpt.model_payload(flow, factory, data.shape, data.info, cfg,
                                                 {"step": best_step if best_state is not None else step}),
                              out / "model.pt")
            flow.load_state_dict(flow_state)

    has_val = len(data.val) > 0
    progress = Progress(cfg["steps"], desc="fit", unit="step", disable=cfg["quiet"] or not main, initial=step)
    order_epoch, order = -1, None
    window_loss, window_n = 0.0, 0
    t_loop = time.perf_counter()
    step_at_loop = step
    try:
        while step < cfg["steps"] and not stopped:
            # DDP all-reduces gradients inside backward: a hung or dead rank ends in a clear error
            with dist.collective_guard(env, "a training step (gradient all-reduce)"):
                epoch, pos = divmod(step, batches_per_epoch)
                if epoch != order_epoch:
                    order_epoch, order = epoch, epoch_order(seed, epoch, n_train)
                batch = order[pos * B:(pos + 1) * B][env.rank * local:(env.rank + 1) * local]
                x = data.train.rows(batch).to(device, non_blocking=True)
                loss = module(x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg["grad_clip"] > 0:
                    torch.nn.utils.clip_grad_norm_(flow.parameters(), cfg["grad_clip"])
                opt.step()
                sched.step()
            step += 1
            window_loss += float(loss.detach())
            window_n += 1

            if step % cfg["log_every"] == 0 or step == cfg["steps"]:
                total, n = dist.all_reduce_sum(env, [window_loss, window_n])
                mean_loss = total / n
                window_loss, window_n = 0.0, 0
                if not math.isfinite(mean_loss):
                    raise CLIError(f"training diverged: loss is {mean_loss} at step {step}; lower 'lr' or set "
                                   "'grad_clip'")
                rate = (step - step_at_loop) / max(time.perf_counter() - t_loop, 1e-9)
                write_metrics({"step": step, "epoch": step // batches_per_epoch, "loss": mean_loss,
                               "lr": opt.param_groups[0]["lr"], "steps_per_s": rate, "samples_per_s": rate * B,
                               "time_s": time.perf_counter() - t_loop})
                progress.postfix = f"loss {mean_loss:.4f}, {rate * B:,.0f} samples/s"

            validate = has_val and ((cfg["val_every"] and step % cfg["val_every"] == 0) or step == cfg["steps"])
            if validate:
                val_ll, _, val_bad = _evaluate(flow, data.val, env, cfg["eval_batch_size"], device)
                improved = val_ll > best_val
                if improved:
                    best_val, best_step, bad_evals = val_ll, step, 0
                    best_state = {k: v.detach().cpu().clone() for k, v in flow.state_dict().items()}
                    save_model(best_state)
                else:
                    bad_evals += 1
                    if cfg["patience"] and bad_evals >= cfg["patience"]:
                        stopped = True
                write_metrics({"step": step, "val_ll": val_ll, "val_nonfinite": val_bad, "best_val_ll": best_val,
                               "best_step": best_step, "bad_evals": bad_evals, "early_stop": stopped})
                if stopped:
                    log(f"early stop at step {step}: no validation improvement in {cfg['patience']} evaluations "
                        f"(best {best_val:.4f} at step {best_step})")
            if step % cfg["checkpoint_every"] == 0 or stopped or step == cfg["steps"]:
                save_checkpoint()
            progress.update(1)
    finally:
        progress.close()
        if metrics_file:
            metrics_file.close()
    train_s = time.perf_counter() - t_loop

    # ------------------------------------------------------------------ the final model
    if best_state is not None:
        flow.load_state_dict(best_state)
    final_step = best_step if best_state is not None else step
    save_model({k: v.detach().cpu().clone() for k, v in flow.state_dict().items()})
    test_ll, test_n, test_bad = _evaluate(flow, data.test, env, cfg["eval_batch_size"], device)
    dims = int(np.prod(data.shape))
    summary = None
    if main:
        plot = None
        if cfg["samples"]:
            samples = _sample(flow, cfg["samples"], seed)
            atomic_save_npy(out / "samples.npy", samples)
            ref = data.test.range(0, min(len(data.test), cfg["samples"])).numpy() if len(data.test) else samples
            plot = _plot(samples, ref, data.shape, out / "samples.png", f"{data.info['name']}: {cfg['model']}")
        summary = {
            "model": cfg["model"], "factory": factory, "spec": spec, "data": data.info,
            "steps": step, "early_stopped": stopped, "model_step": final_step,
            "best_val_ll": best_val if has_val else None, "best_step": best_step if has_val else None,
            "test_ll_nats": test_ll, "test_nll_nats": -test_ll,
            "test_bits_per_dim": -test_ll / (dims * math.log(2)), "test_rows": test_n, "test_nonfinite": test_bad,
            "dims": dims, "world_size": K, "device": str(device),
            "wall_s_this_invocation": time.perf_counter() - t_start, "train_s_this_invocation": train_s,
            "wall_s_total": elapsed_before + time.perf_counter() - t_start,
            "parameters": sum(p.numel() for p in flow.parameters()),
            "samples_plot": plot, "fastflow_version": fastflow.__version__, "torch_version": torch.__version__,
        }
        if data.info.get("kind") == "embedded":
            try:  # digits: also on the integer 0..16 scale, the usual reporting scale
                from fastflow.data import dequantization_log_det

                ll = test_ll + dequantization_log_det(data.info["name"])
                summary["test_ll_nats_discrete_scale"] = ll
                summary["test_bits_per_dim_discrete_scale"] = -ll / (dims * math.log(2))
            except (ImportError, ValueError):
                pass
        atomic_write_json(out / "summary.json", summary)
        log(f"test log-likelihood {test_ll:.4f} nats ({summary['test_bits_per_dim']:.4f} bits/dim) on {test_n} rows; "
            f"results in {out}")
    dist.barrier(env)
    return 0
