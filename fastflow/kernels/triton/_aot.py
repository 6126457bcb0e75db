"""What the launchers launch, as data: one :class:`Spec` per kernel specialisation.

Each launcher asks a ``*_spec`` function of its module for the constexprs and ``num_warps`` it
launches with, so the ahead-of-time compile (``tests/gpu_readiness``) and the resource model
(``fastflow bench gpu-model``) see exactly the specialisations a GPU run would request, without
a GPU: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs Triton's real
code generator and ``ptxas`` on any machine (Triton 3.6 has every API used here).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


@dataclass(frozen=True)
class Spec:
    """One compiled specialisation: the kernel, the type of every runtime argument
    (``"*fp32"``, ``"i32"``, ...), the constexprs and the launch's ``num_warps``.

    ``label`` names it in reports (kernel, storage dtype, flags); it is not part of the key."""

    kernel: object
    signature: tuple  # ((arg name, type), ...) in the kernel's order, constexprs as "constexpr"
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    divisible: tuple = ()  # runtime arguments the JIT marks 16-divisible (aligned pointers, ints % 16 == 0)
    meta: tuple = ()  # the kernel's own tl.constexpr parameters (the launch passes them by name)
    label: str = field(default="", compare=False)

    def launch_kwargs(self) -> dict:
        """What the launcher passes by keyword: the kernel's constexprs and ``num_warps``. An
        integer argument the JIT makes a constexpr (a value of 1) is passed by position as usual."""
        cx = dict(self.constexprs)
        return {**{k: cx[k] for k in self.meta}, "num_warps": self.num_warps}

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else self.kernel.__name__

    def key(self):
        return (self.name, self.signature, self.constexprs, self.num_warps, self.divisible)


def f64(value) -> object:
    """A scalar argument the kernel declares ``tl.float64``. Compiled, the kernel receives the
    float64 its signature says. Triton's interpreter (``TRITON_INTERPRET=1``) would hand the
    kernel the Python float, which ``tl.cast`` first turns into an fp32 constant (pi arrives 9e-8
    off): there it travels as a float64 interpreter tensor instead, so float64 tests see what a
    GPU computes."""
    from fastflow.kernels._facts import interpreting

    value = float(value)
    if not interpreting():
        return value
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    return tl.tensor(TensorHandle(np.array([value], dtype=np.float64), tl.float64), tl.float64)


def make_spec(kernel, types: dict, constexprs: dict, num_warps: int, label: str = "", ints: dict | None = None) -> Spec:
    """``types`` maps runtime arguments of ``kernel`` to their Triton type (``"*fp32"``,
    ``"fp64"``); ``ints`` maps integer arguments to a representative value, typed as the JIT
    types it at launch (1 becomes the constexpr 1, a multiple of 16 is marked divisible,
    ``i64`` past int32); the rest of the kernel's arguments must be in ``constexprs``."""
    names = list(kernel.arg_names)
    types, constexprs = dict(types), dict(constexprs)
    meta = tuple(a for a in names if a in constexprs)
    divisible = [a for a, t in types.items() if t.startswith("*")]
    for a, v in (ints or {}).items():
        v = int(v)
        if v == 1:
            constexprs[a] = 1
            continue
        types[a] = "i32" if -(2**31) <= v < 2**31 else "i64"
        if v % 16 == 0:
            divisible.append(a)
    missing = [a for a in names if a not in types and a not in constexprs]
    extra = [a for a in list(types) + list(constexprs) if a not in names]
    if missing or extra:
        raise ValueError(f"{kernel.fn.__name__}: arguments without a type {missing}, unknown names {extra}")
    sig = tuple((a, "constexpr" if a in constexprs else types[a]) for a in names)
    cx = tuple((a, constexprs[a]) for a in names if a in constexprs)
    div = tuple(a for a in names if a in divisible and a not in constexprs)
    return Spec(kernel, sig, cx, int(num_warps), div, meta, label)


def ptr(dtype) -> str:
    return "*" + TRITON_TYPES[dtype]


def unique(specs) -> list[Spec]:
    """The distinct specialisations, first occurrence first."""
    seen, out = set(), []
    for s in specs:
        if s.key() not in seen:
            seen.add(s.key())
            out.append(s)
    return out


def compile_spec(spec: Spec, cc: int):
    """``triton.compile`` of one specialisation for ``sm_<cc>``; raises on any compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = dict(spec.signature)
    attrs = {(i,): [["tt.divisibility", 16]] for i, (a, _) in enumerate(spec.signature) if a in spec.divisible}
    src = ASTSource(fn=spec.kernel, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": spec.num_warps})


def tool(name: str) -> str:
    """Path of a CUDA binary utility (``cuobjdump``, ``nvdisasm``, ``ptxas``) that ships in
    Triton's wheel (or ``$TRITON_<NAME>_PATH``, or the PATH)."""
    import shutil

    import triton

    env = os.environ.get(f"TRITON_{name.upper()}_PATH")
    if env:
        return env
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else (shutil.which(name) or name)


def cubin_tool(cubin: bytes, *args: str) -> str:
    """Run ``cuobjdump`` on a cubin (``-res-usage``, ``-sass``) and return its output."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool("cuobjdump"), *args, f.name], capture_output=True, text=True, check=True)
    return res.stdout
