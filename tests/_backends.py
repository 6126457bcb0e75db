import os

import pytest
import torch

from fastflow.backends import BACKENDS
from fastflow.kernels._facts import LOW

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()


def run_table() -> dict:
    """Every registered backend that runs here, with its pytest marks, read from the backends'
    own facts: CPU backends whose probe passes; GPU backends on a GPU (marked ``gpu``, or
    ``triton`` for one that also runs on Triton's CPU interpreter) and, interpreter-capable ones,
    under ``TRITON_INTERPRET=1`` (marked ``triton``: that pass selects them with ``-m triton``)."""
    out = {}
    for name, b in BACKENDS.items():
        if "cpu" in b.devices or "any" in b.devices:
            if b.probe() is None:
                out[name] = ()
        elif b.cpu_when is not None and (HAS_CUDA or INTERPRET):
            out[name] = (pytest.mark.triton,)
        elif HAS_CUDA:
            out[name] = (pytest.mark.gpu,)
    return out


def backends_for(op: str) -> list:
    """Every backend that runs ``op`` here (its declared ``ops``), as pytest parameters with the
    marks of :func:`run_table`, in the registry's order."""
    return [pytest.param(n, marks=m) if m else n for n, m in run_table().items() if op in BACKENDS[n].ops]


def backend_name(param) -> str:
    """The backend name of a :func:`backends_for` entry (a name or a pytest parameter)."""
    return getattr(param, "values", (param,))[0]


# The spline kernel tests: every backend with spline kernels, and those other than the oracle.
# Under TRITON_INTERPRET=1 (a separate pytest invocation, `-m triton`) the Triton kernels run on
# CPU tensors.
ALL_BACKENDS = backends_for("rq_spline")
KERNEL_BACKENDS = [b for b in ALL_BACKENDS if backend_name(b) != "reference"]
# those that run on CPU tensors without an interpreter (float64 among their dtypes)
CPU_BACKENDS = [backend_name(b) for b in ALL_BACKENDS if {"cpu", "any"} & set(BACKENDS[backend_name(b)].devices)]


def device_for(backend: str) -> str:
    """Where the tests run ``backend``: a GPU backend on the GPU when there is one (else on the
    CPU, Triton's interpreter), the others on the CPU. Read from the backend's declared devices."""
    b = BACKENDS[backend]
    return "cuda" if HAS_CUDA and "cpu" not in b.devices and "any" not in b.devices else "cpu"


def float32_in_float32(backend: str, kernels: str) -> bool:
    """Whether ``backend`` computes float32 storage in float32 for the kernel family ``kernels``
    (its declared compute dtype, ``fastflow/kernels/<backend>/__init__.py``): the tests then
    hold it to float32 round-off instead of float64-accumulation accuracy."""
    return BACKENDS[backend].compute_dtype(kernels, torch.float32, device_for(backend)) == torch.float32


def dtypes_for(backend: str) -> list:
    """The storage dtypes the tests run ``backend`` in: those it declares, the 16-bit ones only for
    a backend made for GPUs (a GPU storage format; the CPU backends' 16-bit paths are what the
    autocast tests cover)."""
    b = BACKENDS[backend]
    gpu = "cpu" not in b.devices and "any" not in b.devices
    return [d for d in b.dtypes if gpu or d not in LOW]
