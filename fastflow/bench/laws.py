"""Laws suite: the elementwise monotone laws beyond the spline, each fastflow backend against the
peer's own implementation of the same law (zuko's transform, eager and under ``torch.compile``),
on the same inputs: forward, inverse and forward+backward (a loss of the outputs and log-dets,
back to the inputs and the raw parameters), float32.

The implementations of one case are timed in alternation, round by round
(:func:`fastflow.bench.time_interleaved`); a compiled peer is compiled for its case first
(``torch._dynamo.reset()``, static shapes) and warmed twice, untimed. ``fastflow bench laws``
runs every law at 2^16, 2^20 and 2^22 elements (``--quick``: 2^12, 2^16).

Laws (``LAWS``): ``bernstein`` (zuko's ``BoundedBernsteinTransform``, 17 raw coefficients per
element as zuko's ``BPF(degree=16)``, bound 5), ``sos_polynomial`` (zuko's
``SOSPolynomialTransform``, 3 polynomials of degree 4 as its ``SOSPF``) and
``rq_spline_circular`` (zuko's ``CircularRQSTransform``, 8 bins as its ``NCSF``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fastflow.backends import BACKENDS, BackendUnavailableError, resolve_backend
from fastflow.bench import add_ratios, sync, time_interleaved
from fastflow.bench.spline import _calls  # the same three modes, timed the same way

SUITE = "laws"
DEFAULT_SIZES = (2**16, 2**20, 2**22)
QUICK_SIZES = (2**12, 2**16)
REFERENCE_MAX_N = 2**16  # the readable oracle is timed up to this size only
PEERS = ("zuko", "zuko+compile")
TABLE_COLUMNS = ["op", "impl", "mode", "n", "median_s", "ns_per_element", "speedup_vs_zuko",
                 "speedup_vs_zuko+compile"]


@dataclass(frozen=True)
class BenchLaw:
    """A law as timed here: the op's name, ``inputs(n, device, dtype) -> (x, params)``, the op
    ``ours(x, params, inverse, backend)`` and the peer's ``peer(x, params, inverse)``, each
    returning ``(y, logabsdet)``; ``kernels``: the registry's op whose kernels it runs (default
    ``op``)."""

    op: str
    inputs: Callable
    ours: Callable
    peer: Callable | None
    kernels: str | None = None


def _zuko_peer(module: str, name: str, **kwargs):
    """zuko's transform ``module.name(*params, **kwargs)`` as ``peer(x, params, inverse)``, or
    None without zuko."""
    import importlib

    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError:
        return None

    def peer(x, p, inverse):
        t = cls(*p, **kwargs)
        return (t.inv if inverse else t).call_and_ladj(x)

    peer.__name__ = f"zuko_{name}"
    return peer


def _bernstein_inputs(n, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 2.0  # mostly inside [-5, 5], as after standardisation
    theta = torch.randn(n, 17, generator=g)
    return x.to(device=device, dtype=dtype), (theta.to(device=device, dtype=dtype),)


def _bernstein_ours(x, p, inverse, backend):
    from fastflow.ops import bernstein

    return bernstein(x, *p, inverse=inverse, bound=5.0, backend=backend)


def _sos_inputs(n, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 2.0
    a = torch.randn(n, 3, 5, generator=g) * 0.5  # zuko's SOSPF: 3 polynomials of degree 4
    return x.to(device=device, dtype=dtype), (a.to(device=device, dtype=dtype),)


def _sos_ours(x, p, inverse, backend):
    from fastflow.ops import sos_polynomial

    return sos_polynomial(x, *p, inverse=inverse, backend=backend)


def _circular_inputs(n, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, generator=g) * 2 - 1) * torch.pi  # angles
    w, h = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
    d = torch.randn(n, 7, generator=g)
    return x.to(device=device, dtype=dtype), tuple(t.to(device=device, dtype=dtype) for t in (w, h, d))


def _circular_ours(x, p, inverse, backend):
    from fastflow.ops import rq_spline_circular

    return rq_spline_circular(x, *p, inverse=inverse, backend=backend)


LAWS = {"bernstein": BenchLaw("bernstein", _bernstein_inputs, _bernstein_ours,
                              _zuko_peer("zuko.transforms", "BoundedBernsteinTransform", bound=5.0)),
        "sos_polynomial": BenchLaw("sos_polynomial", _sos_inputs, _sos_ours,
                                   _zuko_peer("zuko.transforms", "SOSPolynomialTransform", slope=1e-3)),
        "rq_spline_circular": BenchLaw("rq_spline_circular", _circular_inputs, _circular_ours,
                                       _zuko_peer("zuko.flows.spline", "CircularRQSTransform", slope=1e-3),
                                       kernels="rq_spline")}


def _compiled(fn):
    compiled = {}

    def call(x, p, inverse):
        if inverse not in compiled:
            compiled[inverse] = torch.compile(lambda x, *p: fn(x, p, inverse), dynamic=False)
        return compiled[inverse](x, *p)

    return call


def _impls(law: BenchLaw, device, dtype, n):
    impls = {}
    probe = torch.empty(1, device=device, dtype=dtype)
    kernels = law.kernels or law.op
    for name in BACKENDS:
        if kernels not in BACKENDS[name].ops or (name == "reference" and n > REFERENCE_MAX_N):
            continue
        try:
            resolve_backend(kernels, probe, name)
        except BackendUnavailableError:
            continue
        impls[name] = lambda x, p, inv, name=name: law.ours(x, p, inv, name)
    if law.peer is not None:
        torch._dynamo.reset()  # every case its own static-shape graphs
        impls["zuko"] = law.peer
        impls["zuko+compile"] = _compiled(law.peer)
    return impls


def run(device="cpu", sizes=None, repeats=5, quick=False, laws=None, modes=None, dtype=torch.float32):
    """Rows of every (law, size, mode) case."""
    sizes = sizes or (QUICK_SIZES if quick else DEFAULT_SIZES)
    modes = modes or ("forward", "inverse", "forward+backward")
    rows = []
    for law_name in laws or LAWS:
        law = LAWS[law_name]
        for n in sizes:
            x, params = law.inputs(n, device, dtype)
            with torch.no_grad():
                y = law.ours(x, params, False, None)[0]
            for mode in modes:
                calls = _calls(_impls(law, device, dtype, n), mode, x, y, params)
                for name in PEERS:  # compile (and warm) untimed; a failure is reported by the rounds
                    if name in calls:
                        try:
                            calls[name]()
                            calls[name]()
                            sync(device)
                        except Exception:  # noqa: S110
                            pass
                for name, stats in time_interleaved(calls, device, repeats=repeats, warmup=1).items():
                    row = {"op": law.op, "impl": name, "mode": mode, "n": n, "dtype": str(dtype).replace("torch.", ""),
                           **stats}
                    if "median_s" in stats:
                        row["ns_per_element"] = stats["median_s"] / n * 1e9
                    rows.append(row)
    return add_ratios(rows, baselines=PEERS)
