"""Numba's parallel runtime, started so that it shares the CPU with PyTorch's.

Numba's default threading layer on Linux is OpenMP, but not PyTorch's copy of it: the two
runtimes keep separate thread pools, and libgomp's workers busy-wait (for up to ~300k spins,
milliseconds) after every parallel region. With one pool spinning while the other works, the
CPU is oversubscribed: on a 2-core machine a PyTorch op right after a numba kernel (or the
reverse) ran up to 3x slower in a training step (measured in the coupling benchmark's
interleaved rounds). Numba's pool is therefore started with passive waiting (its workers
sleep on a futex as soon as a region ends; the wake-up costs microseconds against kernels of
milliseconds), unless the user has chosen a wait policy: ``OMP_WAIT_POLICY``,
``GOMP_SPINCOUNT`` or ``KMP_BLOCKTIME`` set in the environment is left to act as set.

The OpenMP runtime reads these variables once, when it is loaded: ``start()`` sets
``OMP_WAIT_POLICY=PASSIVE`` only for the moment numba loads its threading layer, then
restores the environment. If numba's layer was already started (by other code in the
process) nothing changes.

Fork safety. Numba's OpenMP layer on Linux is GNU OpenMP, which cannot survive ``fork()``: a
child of a process whose pool was started (a ``DataLoader(num_workers>0)`` worker, a
``multiprocessing`` fork) is killed by numba the moment it opens a parallel region
("Terminating: fork() called from a process already using GNU OpenMP"). So in a forked child
of a process running the OpenMP layer, :func:`launch` runs every kernel's serial twin (no
parallel region; DataLoader workers run torch on one thread too). The pool itself is numba's
default (TBB when installed, else OpenMP, else ``workqueue``) unless the user chose one
(``NUMBA_THREADING_LAYER``...). The fork-safe ``workqueue`` layer was measured as the default and
dropped: its launches cost 1.5-2x OpenMP's on the 2-core machine (spline forward+backward, 2^17
elements: 24-26 ms against 12.5-17 ms). ``workqueue`` cannot run two parallel regions at once
and aborts the process when two threads try, so while it is the layer (a user's choice)
:func:`launch` runs fastflow's kernels one at a time (a lock; concurrent callers wait).
"""

from __future__ import annotations

import os
import threading

_USER_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
# Held around every kernel while the layer is ``workqueue`` (not thread-safe); None otherwise.
_SERIAL: threading.Lock | None = None


def start() -> bool:
    """Start numba's threading layer (numba's default order unless the user chose; OpenMP with
    passive waiting); True if this call set the wait policy."""
    try:
        from numba.np.ufunc import parallel
    except ImportError:  # pragma: no cover - numba always ships it
        return False
    launch = getattr(parallel, "_launch_threads", None)
    if launch is None or getattr(parallel, "_is_initialized", True):
        _watch_layer()
        return False
    passive = not any(v in os.environ for v in _USER_VARS)
    if passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        launch()
    finally:
        if passive:
            os.environ.pop("OMP_WAIT_POLICY", None)
        _watch_layer()
    return passive


def _layer_name():
    try:
        from numba.np.ufunc import parallel

        return getattr(parallel, "_threading_layer", None) if getattr(parallel, "_is_initialized", False) else None
    except ImportError:  # pragma: no cover
        return None


# True in a forked child of a process whose OpenMP pool was running: serial twins only.
_FORKED_OMP = False


def _after_fork_in_child() -> None:
    global _FORKED_OMP
    if _layer_name() == "omp":
        _FORKED_OMP = True
    _watch_layer()


def _watch_layer() -> None:
    """Serialise fastflow's kernels when the running layer is ``workqueue``."""
    global _SERIAL
    _SERIAL = threading.Lock() if _layer_name() == "workqueue" else None


# A fork while another thread held the lock would leave the child's copy locked forever.
os.register_at_fork(after_in_child=_after_fork_in_child)


def launch(kernel, tasks: int, *args):
    """Run a ``parallel=True`` kernel whose ``prange`` has ``tasks`` iterations.

    A single task runs the kernel's serial twin (the same function compiled without
    ``parallel``, see :func:`serial_twin`) on the calling thread: no parallel region at all.
    Numba opens a region even for one iteration, which wakes the pool (a futex wake per worker
    with passive waiting, a queue round trip with ``workqueue``): measured ~20 us on top of a
    22 us spline kernel of 256 elements on the 2-core CI machine, the largest fixed cost of a
    small op call. The twin needs no lock under ``workqueue`` either.
    """
    if tasks <= 1 or _FORKED_OMP:
        twin = _TWINS.get(kernel)
        if twin is None:
            twin = serial_twin(kernel)
        return twin(*args)
    serial = _SERIAL
    if serial is not None:
        with serial:
            return kernel(*args)
    return kernel(*args)


_TWINS: dict = {}


def serial_twin(kernel):
    """``kernel`` (a numba dispatcher) compiled without ``parallel`` (``prange`` is ``range``),
    with its other options (fastmath, error model, on-disk cache, the SLP vectoriser of
    ``_compile.slp``); a separately named copy of the function, so that the two cache entries do
    not collide."""
    import types

    import numba as nb

    fn = kernel.py_func
    clone = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__,
                               fn.__closure__)
    clone.__qualname__ = fn.__qualname__ + "_serial"
    clone.__module__ = fn.__module__
    options = {k: v for k, v in kernel.targetoptions.items() if k not in ("parallel", "nopython")}
    cached = type(kernel._cache).__name__ != "NullCache"
    twin = nb.njit(cache=cached, **options)(clone)
    if getattr(kernel.compile, "__name__", "") == "compile" and not hasattr(kernel.compile, "__self__"):
        from fastflow.kernels.numba._compile import slp  # the kernel was compiled with SLP on

        twin = slp(twin)
    _TWINS[kernel] = twin
    return twin


# Importing this module (every parallel kernel module does) starts the pool, passively waiting:
# the package's __init__ only declares the backend's facts and imports no numba.
start()
