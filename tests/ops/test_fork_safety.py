"""Numba's parallel kernels under fork() and threads (each case in a fresh interpreter: the
threading layer is chosen once per process, and a failure here kills the process)."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba")

_PRELUDE = """
import threading
import numba
import torch
from fastflow.ops import affine_coupling, rq_spline

def call(n):
    g = torch.Generator().manual_seed(n)
    x, w, h, d = (torch.randn(*s, generator=g) for s in ((n,), (n, 8), (n, 8), (n, 7)))
    y, lad = rq_spline(x, w, h, d, tail_bound=3.0, backend="numba")
    x2, t, s = (torch.randn(n // 16, 16, generator=g) for _ in range(3))
    y2, lad2 = affine_coupling(x2, t, s, backend="numba")
    return y.sum() + lad.sum() + y2.sum() + lad2.sum()
"""


def _run(body: str, **env_overrides) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING_LAYER")}
    env.update(env_overrides)
    code = _PRELUDE + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def _check(proc):
    assert proc.returncode == 0 and "DONE" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr[-3000:])


def test_dataloader_workers_run_numba_ops_after_the_parent_did():
    """GNU OpenMP (numba's default layer on Linux) kills a forked child that opens a parallel
    region once the parent started its pool; fastflow's kernels run their serial twins in such a
    child, with the parent's results."""
    proc = _run("""
        from torch.utils.data import DataLoader, Dataset

        class Data(Dataset):
            def __len__(self):
                return 8

            def __getitem__(self, i):
                return call(4096 + 16 * i)

        before = call(1 << 16)  # the parent runs the pool first
        batches = list(DataLoader(Data(), batch_size=2, num_workers=2, multiprocessing_context="fork"))
        assert len(batches) == 4 and all(torch.isfinite(b).all() for b in batches)
        want = torch.stack([call(4096 + 16 * i) for i in range(8)]).reshape(4, 2)
        torch.testing.assert_close(torch.stack(batches), want)  # (the sums: order may differ in the last bits)
        assert torch.equal(call(1 << 16), before)
        print("layer", numba.threading_layer())
        print("DONE")
    """)
    _check(proc)
    assert "layer workqueue" not in proc.stdout  # the fast default layer, not the slow fork-safe one


@pytest.mark.parametrize("layer", [None, "workqueue"])
def test_concurrent_threads_calling_kernels(layer):
    """Threads calling kernels at once, on the default layer and on ``workqueue`` (which aborts
    the process when two threads enter a parallel region at once; fastflow's kernels are
    serialised while it is the layer)."""
    proc = _run("""
        call(1 << 12)
        errors = []

        def work():
            try:
                for _ in range(20):
                    call(1 << 15)
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        print("layer", numba.threading_layer())
        print("DONE")
    """, **({"NUMBA_THREADING_LAYER": layer} if layer else {}))
    _check(proc)
    if layer:
        assert f"layer {layer}" in proc.stdout


@pytest.mark.parametrize("layer", ["omp", "workqueue"])
def test_user_threading_layer_wins(layer):
    if layer == "omp":
        try:
            from numba.np.ufunc import omppool  # noqa: F401
        except ImportError:
            pytest.skip("numba's OpenMP layer is not available here")
    proc = _run("""
        call(1 << 12)
        print("layer", numba.threading_layer())
        print("DONE")
    """, NUMBA_THREADING_LAYER=layer)
    _check(proc)
    assert f"layer {layer}" in proc.stdout


def test_numba_config_set_before_first_kernel_wins():
    try:
        from numba.np.ufunc import omppool  # noqa: F401
    except ImportError:
        pytest.skip("numba's OpenMP layer is not available here")
    proc = _run("""
        numba.config.THREADING_LAYER = "omp"
        call(1 << 12)
        print("layer", numba.threading_layer())
        print("DONE")
    """)
    _check(proc)
    assert "layer omp" in proc.stdout
