"""Process-group setup for ``torchrun`` / SLURM launches, and no-op fallbacks for one process.

A launch is distributed when ``WORLD_SIZE`` > 1 (set by torchrun, or by ``srun`` wrappers that
export ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``). The backend is
NCCL when the process's device is a GPU, gloo otherwise.

Every collective has a deadline (``--dist-timeout``, default :data:`DEFAULT_TIMEOUT_S`): a rank
that is hung (stopped, deadlocked, stuck on I/O) or dead makes the others fail with a clear
error after that long instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch

from fastflow.cli.errors import CLIError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    timeout_s: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise CLIError(f"environment variable {name}={value!r} is not an integer") from None


def pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(pref)
    except RuntimeError:
        raise CLIError(f"config key 'device': {pref!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"config key 'device': {pref!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    elif dev.type != "cpu":
        raise CLIError(f"config key 'device': {pref!r} is not supported (auto, cpu, cuda, cuda:N)")
    return dev


def _match_numba_threads(n: int) -> None:
    """Numba's CPU kernels have their own thread pool (default: every core); K ranks on one node
    would oversubscribe it K times. Keep it at torch's per-process thread count."""
    try:
        import numba
    except ImportError:
        return
    try:
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    except (ValueError, RuntimeError):
        pass


DEFAULT_TIMEOUT_S = 600.0


def check_timeout(value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise CLIError(f"--dist-timeout must be a number of seconds, got {value!r}") from None
    if not (v > 0 and v < 1e7):
        raise CLIError(f"--dist-timeout must be a positive number of seconds, got {value!r}")
    return v


def _dist_errors() -> tuple[type, ...]:
    errs = [getattr(torch.distributed, n) for n in ("DistError", "DistBackendError", "DistStoreError")
            if hasattr(torch.distributed, n)]
    return tuple(errs) or (RuntimeError,)


@contextlib.contextmanager
def collective_guard(env: DistEnv, what: str):
    """Turn a timed-out or broken collective into a CLIError naming the rank and the deadline."""
    if not env.enabled:
        yield
        return
    try:
        yield
    except CLIError:
        raise
    except RuntimeError as e:  # DistBackendError & co. are RuntimeErrors; so are gloo's timeouts
        if not isinstance(e, _dist_errors()) and "timed out" not in str(e).lower() \
                and "connection" not in str(e).lower():
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CLIError(f"rank {env.rank}/{env.world_size}: {what} did not complete within --dist-timeout "
                       f"{env.timeout_s:g} s: another rank is hung or has died ({first})") from None


def init(device_pref: str = "auto", threads: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    timeout_s = check_timeout(timeout_s)
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", 1)
    device = pick_device(device_pref, local_rank)
    if threads:
        torch.set_num_threads(threads)
    if threads or world > 1:
        _match_numba_threads(torch.get_num_threads())
    env = DistEnv(rank, world, local_rank, local_world, device, timeout_s)
    if env.enabled and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        with collective_guard(env, "joining the process group"):
            torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world,
                                                 timeout=datetime.timedelta(seconds=timeout_s))
    return env


def shutdown(env: DistEnv) -> None:
    if env.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        with collective_guard(env, "a barrier"):
            torch.distributed.barrier()


def broadcast_object(env: DistEnv, obj=None):
    """Rank 0's ``obj`` on every rank."""
    if not env.enabled:
        return obj
    box = [obj]
    with collective_guard(env, "a broadcast from rank 0"):
        torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(env: DistEnv, obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not env.enabled:
        return [obj]
    out = [None] * env.world_size
    with collective_guard(env, "a gather"):
        torch.distributed.all_gather_object(out, obj)
    return out


def all_reduce_sum(env: DistEnv, values: list[float]) -> list[float]:
    """Sum of float64 values across ranks (for losses and log-likelihood totals)."""
    if not env.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    with collective_guard(env, "an all-reduce"):
        torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous, balanced ``[start, stop)`` of ``n`` items for ``rank`` (ranks in order)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)
