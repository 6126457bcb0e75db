import os

import pytest
import torch

from fastflow.backends import BACKENDS

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


def gpu_backends():
    out = []
    if HAS_CUDA or INTERPRET:
        out.append(pytest.param("triton", marks=pytest.mark.triton))
    if HAS_CUDA:
        out.append(pytest.param("cuda", marks=pytest.mark.gpu))
    return out


# Backends the kernel tests run against the reference. Under TRITON_INTERPRET=1 (a separate
# pytest invocation, `-m triton`) the Triton kernels run on CPU tensors.
KERNEL_BACKENDS = ["numba"] + gpu_backends()
ALL_BACKENDS = ["reference"] + KERNEL_BACKENDS


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


def dtypes_for(backend: str):
    if backend in ("triton", "cuda"):
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32, torch.float64]


