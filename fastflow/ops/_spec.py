"""The test declaration of a public op: what the conformance suite runs.

An :class:`OpSpec` names the op, its kernel family, its tensor arguments (short names), which of
them receive gradients, the shape of its outputs and how its log-det relates to its Jacobian, and
carries an ``example`` builder, the options and shapes to try and the bad-input cases with the
errors they must raise. The declarations themselves live in :mod:`fastflow.ops._samples`, apart
from the op modules (which hold the op definition, ``fastflow/ops/_opdef.py``);
``tests/ops/test_conformance.py`` runs every spec on every backend that declares the op: oracle
agreement, round trip, naive-Jacobian log-det, fp64 gradcheck, opcheck, every derivative mode,
``torch.compile`` (static and dynamic shapes), odd, empty and strided shapes, the bad inputs and
backend forcing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


from fastflow import backends as _registry

__all__ = ["OpSpec", "BadInput", "SPECS", "declare"]


@dataclass(frozen=True)
class BadInput:
    """A call that must fail: ``mutate(tensors, kwargs) -> (tensors, kwargs)`` applied to a valid
    example, then ``fn(*tensors, **kwargs)`` raises ``error`` with a message matching ``match``."""

    label: str
    mutate: Callable
    error: type
    match: str


@dataclass(frozen=True)
class OpSpec:
    """The declaration of a public op.

    Attributes:
        name: the public function's name (``fastflow.ops.<name>``).
        op: the registry key and custom op (``fastflow::<op>``); several public functions may
            share one (the spline's parameterisations).
        fn: the public function ``fn(*tensors, inverse=..., backend=..., **kwargs)``.
        kernels: the kernel family (the kernel module's name in a backend's folder).
        inputs: the names of ``fn``'s tensor arguments, in order.
        grad_inputs: those that receive gradients.
        outputs: per output, ``"like:<input>"`` (that input's shape) or ``"batch:<input>"``
            (its leading dimension): the fake impl's shapes.
        logdet: ``"elementwise"`` (one log-det per element of the first input: the Jacobian is
            diagonal) or ``"sample"`` (one per sample: the log-det of each sample's Jacobian).
        example: ``example(shape, dtype, device, generator, **option) -> (tensors, kwargs)``
            valid inputs whose first tensor has ``shape``, and the keyword arguments of ``fn``
            (without ``inverse`` and ``backend``); ``option`` is one of ``options``.
        options: the variants to test (e.g. each scale law, several bin counts).
        requires: a parameterisation a backend's kernel module must list in its
            ``PARAMETERIZATIONS`` to run this function (None: any).
        shapes: shapes of the first input to test: typical, odd and empty ones.
        bad: the bad-input cases.
        fused: ``fused() -> FusedOp`` (the custom op, for opcheck); ``op_args(tensors, kwargs,
            inverse, backend)`` its arguments.
    """

    name: str
    op: str
    fn: Callable
    kernels: str
    inputs: tuple[str, ...]
    grad_inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    logdet: str
    example: Callable
    shapes: tuple[tuple[int, ...], ...]
    fused: Callable
    op_args: Callable
    bad: tuple[BadInput, ...] = ()
    options: tuple[dict, ...] = field(default=({},))
    requires: str | None = None

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends with kernels for ``op``, in the default order: each backend declares the
        ops it runs (``Backend.ops``, ``fastflow/kernels/<name>/__init__.py``)."""
        return tuple(n for n, b in _registry.BACKENDS.items() if self.op in b.ops)



    def __post_init__(self):
        # a misspelt name would silently drop an input from every check that selects by name
        for what, names in (("grad_inputs", self.grad_inputs),
                            ("outputs", tuple(o.partition(":")[2] for o in self.outputs))):
            unknown = [n for n in names if n not in self.inputs]
            if unknown:
                raise ValueError(f"OpSpec {self.name!r}: {what} names {unknown} not among inputs {self.inputs}")
        if self.logdet not in ("elementwise", "sample"):
            raise ValueError(f"OpSpec {self.name!r}: logdet must be 'elementwise' or 'sample', got {self.logdet!r}")


SPECS: dict[str, OpSpec] = {}


def declare(spec: OpSpec) -> OpSpec:
    """Record the spec in :data:`SPECS` (the backends' kernels are theirs to declare: ``Backend.ops``)."""
    SPECS[spec.name] = spec
    return spec

