import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()


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
    return "cuda" if HAS_CUDA and backend in ("triton", "cuda") else "cpu"


def dtypes_for(backend: str):
    if backend in ("triton", "cuda"):
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32, torch.float64]


