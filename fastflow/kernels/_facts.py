"""What a backend is, declared by the backend itself: :class:`Backend`.

Each kernel package (``fastflow/kernels/<name>/__init__.py``) declares ``BACKEND = Backend(...)``:
the devices and dtypes it takes, what it computes each storage dtype in (per kernel family), a
probe for its requirements and a one-line description. Those ``__init__`` modules stay light
(no numba, triton or cupy import), so the registry (:mod:`fastflow.backends`) collects every
backend's facts at ``import fastflow.ops`` and keeps only the order and the routes; the tests
read the same facts (tolerances from the compute dtype, dtypes to try from the dtypes taken).
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["Backend", "import_reason", "interpreting", "FLOATS", "LOW", "SPLINE", "COUPLING", "LU", "BERNSTEIN", "SOS",
           "SplineParameterization", "SPLINE_PARAMETERIZATIONS"]

FLOATS = (torch.float32, torch.float64)
LOW = (torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def import_reason(module: str) -> str | None:
    """None if ``module`` imports, else why not (one line)."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"cannot import {module}: {type(exc).__name__}: {exc}"
    return None


@functools.lru_cache(maxsize=None)
def _load(module: str):
    return importlib.import_module(module)


SPLINE = {"rq_spline": "spline"}
COUPLING = {"affine_coupling": "coupling", "additive_coupling": "coupling", "rescale": "coupling"}
LU = {"lu_linear": "lu", "lu_conv1x1": "lu", "actnorm_conv1x1": "lu"}
BERNSTEIN = {"bernstein": "bernstein"}
SOS = {"sos_polynomial": "sos"}


@dataclass(frozen=True)
class SplineParameterization:
    """A row of the spline's parameterisation table: how raw values become knots and slopes.

    Attributes:
        code: the integer every compiled kernel's prologue switch reads (numba's ``kind``,
            Triton's ``KIND`` constexpr): one numbering for all backends.
        n_derivs: raw slopes per element beyond ``K``: -1 (interior knots, unit boundary
            slopes) or +1 (every knot, boundaries included).
        box: ``"tail_bound"`` (the square ``[-B, B]^2``, identity outside) or ``"box"`` (``left,
            right, bottom, top``).
        public: the public function of ``fastflow.ops`` that takes it.
        rule: one line: the prologue (widths/heights, slopes), as in the reference's
            ``PROLOGUES`` (``fastflow/kernels/reference/spline.py``).
        own_slope: its minimum slope is its own argument (``slope``; zuko's), not
            ``min_derivative``; the op hands it to the kernels, whose launchers take one
            minimum-slope value, the one the row's rule reads.
    """

    code: int
    n_derivs: int
    box: str
    public: str
    rule: str
    own_slope: bool = False


# The one parameterisation table: every backend reads its codes, declares which it has kernels
# for (Backend.parameterizations), and the op and the tests take the names from here.
SPLINE_PARAMETERIZATIONS = {
    "nflows": SplineParameterization(
        0, -1, "tail_bound", "rq_spline",
        "min + (1 - min K) softmax(raw) sizes, md + softplus(raw) interior slopes, unit boundary slopes"),
    "nflows_bounded": SplineParameterization(
        1, +1, "box", "rq_spline_bounded",
        "min + (1 - min K) softmax(raw) sizes on the box, md + softplus(raw) slopes at all K+1 knots"),
    "zuko": SplineParameterization(
        2, -1, "tail_bound", "rq_spline_zuko",
        "softmax(raw / (1 + |2 raw / log slope|)) sizes, exp(raw / (1 + |raw / log slope|)) interior slopes",
        own_slope=True),
}


@dataclass(frozen=True)
class Backend:
    """A kernel family: the devices and dtypes it takes, what it computes in, and a probe.

    Attributes:
        name: the backend's name (``backend="name"``).
        devices: device types it runs on (``"any"``: every one).
        dtypes: storage dtypes it takes for every op.
        probe: ``probe() -> None`` when it can run here, else the reason.
        description: one line for ``fastflow info``.
        op_dtypes: op -> dtypes taken beyond ``dtypes`` for that op alone.
        compute: ``compute(kernels, dtype, device_type) -> compute dtype`` or None for the usual
            rule (float16/bfloat16 storage computed in float32, the others in their own dtype);
            ``kernels`` is the kernel family (``"spline"``, ``"coupling"``, ``"lu"``).
        default_ops: the ops for which ``backend=None`` tries this backend in the default order
            (None: every op it has kernels for); its other ops are reached by routes or by name.
        cpu_when: a test that lets a GPU backend take CPU tensors (Triton's interpreter).
        ops: op -> the kernel module implementing it, in ``package`` (``"spline"``,
            ``"coupling"``, ``"lu"``): what this backend runs.
        package: the package its kernel modules are in (default ``fastflow.kernels.<name>``).
        limits: named limits of its kernels (read by the kernels and shown by ``fastflow info``).
        notes: op -> one line for ``fastflow info`` (what the backend does differently for it).
        parameterizations: the spline parameterisations (rows of
            :data:`SPLINE_PARAMETERIZATIONS`) its spline kernels have prologues for.
    """

    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    probe: Callable[[], str | None] = lambda: None
    description: str = ""
    op_dtypes: dict = field(default_factory=dict, compare=False, hash=False)
    compute: Callable[[str, torch.dtype, str], torch.dtype | None] | None = field(default=None, compare=False,
                                                                                  hash=False)
    default_ops: tuple[str, ...] | None = None
    cpu_when: Callable[[], bool] | None = field(default=None, compare=False, hash=False)
    ops: dict = field(default_factory=dict, compare=False, hash=False)
    package: str | None = None
    limits: dict = field(default_factory=dict, compare=False, hash=False)
    notes: dict = field(default_factory=dict, compare=False, hash=False)
    parameterizations: tuple[str, ...] = ("nflows",)

    @property
    def kernels_package(self) -> str:
        return self.package or f"fastflow.kernels.{self.name}"

    def kernel(self, op: str):
        """The kernel module of ``op`` (imported on first use: ``import fastflow`` never imports
        numba, triton or cupy)."""
        return _load(f"{self.kernels_package}.{self.ops[op]}")

    def device_ok(self, device: torch.device) -> bool:
        if device.type == "cpu" and self.cpu_when is not None and "cpu" not in self.devices:
            return self.cpu_when()
        return device.type in self.devices or "any" in self.devices

    def takes(self, op: str) -> tuple[torch.dtype, ...]:
        """The storage dtypes this backend takes for ``op``."""
        return self.dtypes + self.op_dtypes.get(op, ())

    def compute_dtype(self, kernels: str, dtype: torch.dtype, device_type: str = "cpu") -> torch.dtype:
        """What this backend computes ``dtype`` storage in, for the kernel family ``kernels`` on
        ``device_type`` tensors."""
        declared = self.compute(kernels, dtype, device_type) if self.compute is not None else None
        return declared or (torch.float32 if dtype in LOW else dtype)

    def decline_reason(self, op: str, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot run ``op`` on tensors of this device and dtype (None: it can)."""
        if op not in self.ops:
            return f"backend {self.name!r} has no kernel for {op!r}"
        reason = self.probe()
        if reason:
            return reason
        if not self.device_ok(device):
            return f"backend {self.name!r} runs on {'/'.join(self.devices)} tensors, got device {device}"
        if dtype not in self.takes(op):
            names = ", ".join(str(d).replace("torch.", "") for d in self.takes(op))
            return f"backend {self.name!r} takes dtypes ({names}), got {str(dtype).replace('torch.', '')}"
        return None
