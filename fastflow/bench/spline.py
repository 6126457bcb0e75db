"""Spline suite: every available fastflow backend, nflows' function and zuko's spline, each of the
peers also under ``torch.compile``, on the same inputs: forward, inverse and forward+backward,
K bins, float32.

The implementations of one case (size, K, mode) are timed in alternation, round by round
(:func:`fastflow.bench.time_interleaved`). A compiled peer is compiled for its case before the
rounds (``torch._dynamo.reset()`` first, so that every case gets its own static-shape graphs and
no recompile limit is reached), then called twice more; compilation is never timed.

``fastflow bench spline`` runs K = 8 at the default sizes; the K sweep and other cases are options
of this module's own command line::

    python -m fastflow.bench.spline --sizes 2**20,2**22 --bins 8 --sweep 2,4,16,32,64@2**20 --repeats 7
"""

from __future__ import annotations

import torch

from fastflow.backends import BACKENDS, BackendUnavailableError, resolve_backend
from fastflow.bench import time_interleaved
from fastflow.ops import rq_spline

SUITE = "spline"
DEFAULT_SIZES = (2**16, 2**20, 2**22)
QUICK_SIZES = (2**12, 2**16)
DEFAULT_BINS = (8,)
# The readable oracle is slow (20 s a call at 2^22): timed up to this size only.
REFERENCE_MAX_N = 2**16
COMPILED = ("nflows+compile", "zuko+compile")
TABLE_COLUMNS = ["op", "impl", "mode", "n", "k", "median_s", "ns_per_element", "speedup_vs_nflows",
                 "speedup_vs_nflows+compile", "speedup_vs_zuko+compile"]


def _inputs(n, k, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 0.6
    uw, uh = torch.randn(n, k, generator=g), torch.randn(n, k, generator=g)
    ud = torch.randn(n, k - 1, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, uw, uh, ud)]


def _peers():
    """The peers' own splines, ``name -> fn(x, params, inverse) -> (y, lad)``, those installed."""
    peers = {}
    try:
        from nflows.transforms.splines.rational_quadratic import unconstrained_rational_quadratic_spline as nfl

        def nflows_spline(x, p, inv):
            return nfl(x, *p, inverse=inv, tails="linear", tail_bound=1.0)

        peers["nflows"] = nflows_spline
    except ImportError:
        pass
    try:
        from zuko.transforms import MonotonicRQSTransform

        def zuko_spline(x, p, inv):
            t = MonotonicRQSTransform(*p, bound=1.0)
            return (t.inv if inv else t).call_and_ladj(x)

        peers["zuko"] = zuko_spline
    except ImportError:
        pass
    return peers


def _compiled(fn):
    """``fn`` under ``torch.compile`` (default mode, static shapes), one graph per direction; the
    compilation happens at the first call of each."""
    compiled = {}

    def call(x, p, inv):
        if inv not in compiled:
            compiled[inv] = torch.compile(lambda x, uw, uh, ud: fn(x, (uw, uh, ud), inv), dynamic=False)
        return compiled[inv](x, *p)

    return call


def _impls(device, dtype, compile_peers=True):
    """name -> (fn(x, params, inverse) -> (y, lad)); only what runs here. A compiled peer's entry
    compiles lazily (call :func:`_fresh` per case)."""
    impls = {}
    probe = torch.empty(1, device=device, dtype=dtype)
    for name in BACKENDS:
        try:
            resolve_backend("rq_spline", probe, name)
        except BackendUnavailableError:
            continue
        impls[name] = lambda x, p, inv, name=name: rq_spline(x, *p, inverse=inv, backend=name)
    for name, fn in _peers().items():
        impls[name] = fn
        if compile_peers:
            impls[f"{name}+compile"] = _compiled(fn)
    return impls


def _fresh(impls):
    """The implementations for a new case: compiled peers re-wrapped (empty graph caches), after
    ``torch._dynamo.reset()``."""
    if not any(name in impls for name in COMPILED):
        return impls
    torch._dynamo.reset()
    peers = _peers()
    return {name: (_compiled(peers[name.split("+")[0]]) if name in COMPILED else fn) for name, fn in impls.items()}


def _calls(available, mode, x, y, params):
    calls = {}
    for name, fn in available.items():
        if mode == "forward":
            def call(fn=fn):
                with torch.no_grad():
                    return fn(x, params, False)
        elif mode == "inverse":
            def call(fn=fn):
                with torch.no_grad():
                    return fn(y, params, True)
        else:
            leaves = [t.detach().clone().requires_grad_(True) for t in (x, *params)]

            def call(fn=fn, leaves=leaves):
                out, lad = fn(leaves[0], leaves[1:], False)
                (out.sum() + lad.sum()).backward()
                for t in leaves:
                    t.grad = None
        calls[name] = call
    return calls


def _prime(calls, device):
    """Compile the compiled peers' graphs for this case and warm them (twice), untimed; a peer
    failing here is reported by the timing rounds, not raised."""
    from fastflow.bench import sync

    for name, call in calls.items():
        if name in COMPILED:
            try:
                call()
                call()
                sync(device)
            except Exception:  # noqa: S110 - time_interleaved records the error
                pass


def run(device="cpu", sizes=None, k=8, dtype=torch.float32, repeats=5, quick=False, impls=None, modes=None,
        bins=None, cases=None):
    """Rows of every (size, K, mode) case: ``sizes x bins`` (``bins`` default ``(k,)``), then the
    extra ``cases`` ``[(n, k), ...]``."""
    sizes = sizes or (QUICK_SIZES if quick else DEFAULT_SIZES)
    bins = tuple(bins or (k,))
    modes = modes or ("forward", "inverse", "forward+backward")
    todo = list(dict.fromkeys([(n, kk) for n in sizes for kk in bins] + list(cases or ())))
    available = _impls(device, dtype)
    if impls:
        available = {n: f for n, f in available.items() if n in impls}
    rows = []
    for n, kk in todo:
        x, uw, uh, ud = _inputs(n, kk, device, dtype)
        with torch.no_grad():
            y = rq_spline(x, uw, uh, ud)[0]
        here = {name: fn for name, fn in available.items()
                if name != "reference" or n <= REFERENCE_MAX_N or (impls and "reference" in impls)}
        for mode in modes:
            calls = _calls(_fresh(here), mode, x, y, (uw, uh, ud))
            _prime(calls, device)
            # In alternation, so that the ratios against the peers compare times taken side by
            # side (a peer failing on valid input is a result, not a crash).
            for name, stats in time_interleaved(calls, device, repeats=repeats, warmup=1).items():
                row = {"op": "rq_spline", "impl": name, "mode": mode, "n": n, "k": kk,
                       "dtype": str(dtype).replace("torch.", ""), **stats}
                if "median_s" in stats:
                    row["ns_per_element"] = stats["median_s"] / n * 1e9
                rows.append(row)
    from fastflow.bench import add_ratios

    return add_ratios(rows, baselines=COMPILED)  # ``fastflow bench`` adds those against nflows and the reference


def after(rows, json_path):
    """Hook run by ``fastflow bench`` after the JSON is written: the speed-up chart, next to it."""
    from pathlib import Path

    from fastflow.bench import plot_speedups

    return [plot_speedups(rows, Path(json_path).with_suffix(".png"), "nflows",
                          "Rational-quadratic spline: fastflow backends and peers against nflows")]


def _parse_cases(text: str) -> list[tuple[int, int]]:
    """``"2,4,64@2**20"`` -> ``[(2**20, 2), (2**20, 4), (2**20, 64)]``."""
    from fastflow.bench.sizes import parse_size

    ks, sep, size = text.partition("@")
    if not sep:
        raise ValueError(f"--sweep {text!r}: expected BINS@SIZE, e.g. 2,8,64@2**20")
    n = parse_size(size)
    return [(n, _parse_bin(b)) for b in ks.split(",")]


def _parse_bin(text: str) -> int:
    try:
        k = int(text.strip())
    except ValueError:
        raise ValueError(f"bins: {text!r} is not an integer") from None
    if not 2 <= k <= 1024:
        raise ValueError(f"bins: K={k} is outside 2..1024")
    return k


def main(argv=None) -> int:
    """``python -m fastflow.bench.spline``: the suite with bins and extra cases, JSON and chart as
    ``fastflow bench spline`` writes them."""
    import argparse
    from pathlib import Path

    from fastflow.bench import add_ratios, environment, format_table, pin_allocator, write_json
    from fastflow.bench.sizes import parse_sizes

    p = argparse.ArgumentParser(prog="python -m fastflow.bench.spline", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--sizes", type=parse_sizes, default=None, help="element counts, e.g. 2**20,2**22")
    p.add_argument("--bins", type=lambda s: [_parse_bin(b) for b in s.split(",")], default=None,
                   help="bin counts K timed at every size, e.g. 2,8,64 (default 8)")
    p.add_argument("--sweep", type=_parse_cases, action="append", default=[],
                   help="extra cases BINS@SIZE, e.g. 2,4,16,32,64@2**20 (repeatable)")
    p.add_argument("--modes", type=lambda s: s.split(","), default=None, help="forward,inverse,forward+backward")
    p.add_argument("--impls", type=lambda s: s.split(","), default=None, help="only these implementations")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    pin_allocator()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    cases = [c for group in args.sweep for c in group]
    rows = add_ratios(run(device=device, sizes=args.sizes, repeats=args.repeats, quick=args.quick, impls=args.impls,
                          modes=args.modes, bins=args.bins, cases=cases))
    command = "python -m fastflow.bench.spline " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    payload = {"suite": SUITE, "environment": env, "command": command.strip(), "results": rows}
    stamp = env["date"].replace(":", "").replace("-", "")[:15]
    path = write_json(Path(args.out) / f"{SUITE}_{device}_{stamp}.json", payload)
    print(format_table([r for r in rows if "error" not in r], TABLE_COLUMNS))
    for r in rows:
        if "error" in r:
            print(f"  {r['impl']} {r['mode']} n={r['n']} k={r['k']}: failed: {r['error']}")
    print(f"\nresults: {path}")
    for extra in after(rows, path):
        print(f"wrote: {extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
