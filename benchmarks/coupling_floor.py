"""How far the fused affine coupling is from the memory floor of its forward+backward.

The coupling suite's forward+backward case (B=65536, D=64, float32, exp law, ``y.sum() +
lad.sum()`` backpropagated) moves, at the least: the forward reads x, t, h and writes y; the
loss reads y; the backward reads x, h and writes dx, dh; autograd writes the shift's gradient
(an expanded tensor, materialised). On a machine where those bytes are the cost, no fused
kernel can take less than that traffic, and plain PyTorch eager moves about twice as much.

This script times, in alternation (``fastflow.bench.time_interleaved``):

- ``eager``: the suite's plain PyTorch baseline;
- ``fastflow``: ``affine_coupling(..., backend="numba")``;
- ``minimal``: the least an implementation can do: two bare numba loops (the forward without
  its log-det, which ``h.sum(1)`` gives as in eager; the backward reading the scalar output
  gradient), no argument checks, no strided views, no reproducible sums; wrapped in an
  ``autograd.Function``.

``minimal`` is not a usable op; it shows where the floor is, so that a shortfall against a
speed-up target can be told apart from slack in fastflow. Writes JSON (medians, paired
ratios, device, versions) to ``--out``.

    PYTHONPATH=. .venv/bin/python benchmarks/coupling_floor.py --repeats 30 --rounds 3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numba as nb
import numpy as np
import torch

from fastflow.bench import coupling as suite
from fastflow.bench import environment, paired_ratio, pin_allocator, time_interleaved, write_json
from fastflow.kernels.numba._math import exp32

_CHUNK = 32768


@nb.njit(parallel=True, fastmath={"contract", "arcp"}, error_model="numpy")
def _minimal_fwd(x, t, h, out):
    n = x.size
    for c in nb.prange((n + _CHUNK - 1) // _CHUNK):
        a = c * _CHUNK
        for j in range(min(n, a + _CHUNK) - a):
            i = np.uint64(a + j)
            out[i] = x[i] * exp32(h[i]) + t[i]


@nb.njit(parallel=True, fastmath={"contract", "arcp"}, error_model="numpy")
def _minimal_bwd(g, glad, x, h, gx, gh, d):
    rows = _CHUNK // d
    nrows = x.size // d
    for c in nb.prange((nrows + rows - 1) // rows):
        for r in range(c * rows, min(nrows, (c + 1) * rows)):
            gl = glad[r]
            for j in range(d):
                i = np.uint64(r * d + j)
                s = exp32(h[i])
                gx[i] = g * s
                gh[i] = g * x[i] * s + gl


class _Minimal(torch.autograd.Function):
    """Contiguous (B, D) float32 inputs and a scalar-broadcast output gradient only."""

    @staticmethod
    def forward(ctx, x, t, h):
        out = torch.empty_like(x)
        _minimal_fwd(x.view(-1).numpy(), t.view(-1).numpy(), h.view(-1).numpy(), out.view(-1).numpy())
        ctx.save_for_backward(x, h)
        return out, h.sum(1)

    @staticmethod
    def backward(ctx, g_out, g_lad):
        x, h = ctx.saved_tensors
        assert all(s == 0 for s in g_out.stride()), "minimal handles y.sum()'s gradient only"
        gx, gh = torch.empty_like(x), torch.empty_like(x)
        _minimal_bwd(np.float32(g_out.reshape(-1)[0].item()), g_lad.contiguous().numpy(), x.view(-1).numpy(),
                     h.view(-1).numpy(), gx.view(-1).numpy(), gh.view(-1).numpy(), x.shape[1])
        return gx, g_out, gh


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=30, help="rounds per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="measurements (each a fresh interleaved run)")
    ap.add_argument("--out", default="benchmarks/results/coupling_floor.json")
    args = ap.parse_args(argv)

    allocator = pin_allocator()
    make, impls = suite.cases()["affine_coupling"]
    tensors = [t.contiguous() for t in make(args.batch)]
    fns = {"eager": impls["eager"], "fastflow": impls["numba"], "minimal": lambda x, t, h, inv: _Minimal.apply(x, t, h)}
    calls = {name: suite.case_call(fn, tensors, "forward+backward") for name, fn in fns.items()}

    # The three compute the same gradients (the minimal one's log-det is torch's float32 sum).
    grads = {}
    for name, fn in fns.items():
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        y, lad = fn(*leaves, False)
        (y.sum() + lad.sum()).backward()
        grads[name] = [t.grad for t in leaves]
    for name in ("fastflow", "minimal"):
        for a, b in zip(grads[name], grads["eager"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    runs = []
    for r in range(args.rounds):
        stats = time_interleaved(calls, "cpu", repeats=args.repeats, warmup=3)
        row = {name: {"median_s": st["median_s"], "times": st["times"]} for name, st in stats.items()}
        row["eager_over_fastflow"] = paired_ratio(stats["eager"]["times"], stats["fastflow"]["times"])
        row["eager_over_minimal"] = paired_ratio(stats["eager"]["times"], stats["minimal"]["times"])
        row["fastflow_over_minimal"] = paired_ratio(stats["fastflow"]["times"], stats["minimal"]["times"])
        runs.append(row)
        print(f"run {r}: medians " + ", ".join(f"{n} {row[n]['median_s'] * 1e3:.2f} ms" for n in fns)
              + f"; paired: eager/fastflow {row['eager_over_fastflow']:.2f}x, eager/minimal "
              f"{row['eager_over_minimal']:.2f}x, fastflow/minimal {row['fastflow_over_minimal']:.2f}")
    payload = {"suite": "coupling_floor", "case": {"op": "affine_coupling", "scale": "exp", "b": args.batch,
                                                    "d": suite.D, "mode": "forward+backward", "dtype": "float32"},
               "environment": environment("cpu"), "allocator": allocator, "runs": runs}
    print(f"results: {write_json(Path(args.out), payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
