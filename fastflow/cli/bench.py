"""``fastflow bench``: run benchmark suites, print a table of medians and speed-ups, write JSON."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fastflow.bench.sizes import parse_sizes
from fastflow.cli.errors import CLIError, report

# A rough upper estimate of the memory one element of a benchmark case needs at K bins: its inputs
# and spline parameters (3K+1 values), their gradients, outputs and a reference implementation's
# temporaries, in float32 (4 bytes each), about four copies.
_BYTES_PER_VALUE = 16


def _sizes(text: str) -> list[int]:
    try:
        return parse_sizes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _bins(text: str) -> list[int]:
    from fastflow.bench.spline import _parse_bin

    try:
        return [_parse_bin(b) for b in text.split(",")]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sweep(text: str) -> list[tuple[int, int]]:
    from fastflow.bench.spline import _parse_cases

    try:
        return _parse_cases(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _model_sizes(text: str) -> list[str]:
    from fastflow.bench.models import parse_size_names

    try:
        return parse_size_names(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _model_names(text: str) -> list[str]:
    from fastflow.bench.models import MODELS

    names = [t.strip() for t in text.split(",")]
    bad = [n for n in names if n not in MODELS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown model {bad[0]!r}; expected names from {', '.join(MODELS)}")
    return names


def _estimator_names(text: str) -> list[str]:
    from fastflow.integrations.sbi import ESTIMATORS

    names = [t.strip() for t in text.split(",")]
    bad = [n for n in names if n not in ESTIMATORS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown sbi estimator {bad[0]!r}; expected names from "
                                         f"{', '.join(ESTIMATORS)}")
    return names


def add_parser(sub):
    from fastflow.bench import EXTRA_SUITES, SUITES

    p = sub.add_parser("bench", help="benchmark the fused ops against the reference, nflows and zuko")
    p.add_argument("suites", nargs="*", default=None, help=f"suites to run (default: all of {', '.join(SUITES)}; "
                   f"also {', '.join(EXTRA_SUITES)})")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--sizes", type=_sizes, default=None,
                   help="comma-separated element counts, e.g. 2**16,2**20 or 1e6 (parsed, never evaluated)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per case (default 5; models suite: rounds per size, default 15 sbi, 7 hpc)")
    p.add_argument("--bins", type=_bins, default=None,
                   help="spline suite: bin counts K timed at every size, e.g. 2,8,64 (default 8)")
    p.add_argument("--sweep", type=_sweep, action="append", default=[],
                   help="spline suite: extra cases BINS@SIZE, e.g. 2,16,64@2**18 (repeatable)")
    p.add_argument("--model-sizes", type=_model_sizes, default=None,
                   help="models suite: size names, e.g. sbi,hpc (default both; --quick: tiny)")
    p.add_argument("--models", type=_model_names, default=None,
                   help="models suite: which models, e.g. nsf-coupling,maf (default all)")
    p.add_argument("--estimators", type=_estimator_names, default=None,
                   help="integrations suite: only these sbi estimators, e.g. zuko_bpf,zuko_sospf (no peer models, "
                        "no NPE runs)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON results")
    p.set_defaults(func=run)


def _available_memory(device: str) -> int | None:
    import torch

    if device.startswith("cuda"):
        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except (RuntimeError, AssertionError, ValueError):
            return None
    from fastflow.cli.fit import _available_memory as host_memory

    return host_memory()


def _check_before_running(args, device: str) -> None:
    """Everything that can be refused before hours of timing: an --out that is a file (or cannot
    be made), sizes whose buffers would not fit this device's memory."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder (bench writes one JSON file per suite into "
                       "a folder); choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"--out {out}: cannot create the folder: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise CLIError(f"--out {out}: the folder is not writable")
    from fastflow.cli.io import _fmt_bytes

    cases = [c for group in (getattr(args, "sweep", None) or []) for c in group]
    bins = max([*(getattr(args, "bins", None) or [8]), *(k for _, k in cases)])
    sizes = [*(args.sizes or []), *(n for n, _ in cases)]
    if not sizes:
        return
    biggest = max(sizes)
    need = biggest * (3 * bins + 1) * _BYTES_PER_VALUE
    have = _available_memory(device)
    if have is not None and need > have:
        raise CLIError(f"--sizes {biggest} needs about {_fmt_bytes(need)} of memory on {device} (K={bins}), "
                       f"{_fmt_bytes(have)} is available; choose smaller sizes")


def run(args) -> int:
    try:
        return _run(args)
    except CLIError as e:
        return report("bench", e)


def _run(args) -> int:
    import torch

    from fastflow.bench import SUITES, add_ratios, environment, format_table, get_suite, pin_allocator, write_json

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_before_running(args, device)
    pin_allocator()  # before anything allocates: steady page reuse for every implementation
    env = environment(device)
    names = args.suites or SUITES
    cases = [c for group in (getattr(args, "sweep", None) or []) for c in group]
    bins = getattr(args, "bins", None)
    if (bins or cases) and "spline" not in names:
        print("fastflow bench: --bins and --sweep apply to the spline suite only")
        return 2
    if (getattr(args, "model_sizes", None) or getattr(args, "models", None)) and "models" not in names:
        print("fastflow bench: --model-sizes and --models apply to the models suite only")
        return 2
    if getattr(args, "estimators", None) and "integrations" not in names:
        print("fastflow bench: --estimators applies to the integrations suite only")
        return 2
    if "models" in names and args.sizes:
        print("fastflow bench: the models suite takes size names with --model-sizes (sbi, hpc, tiny), not --sizes")
        return 2
    print(f"fastflow bench on {env['device_name']} ({device}), torch {env['versions']['torch']}, {env['date']}")
    for name in names:
        suite = get_suite(name)
        kwargs = {"device": device, "repeats": args.repeats or 5, "quick": args.quick}
        if args.sizes:
            kwargs["sizes"] = args.sizes
        if name == "spline":
            kwargs.update(bins=bins, cases=cases)
        if name == "models":
            kwargs.update(sizes=getattr(args, "model_sizes", None), models=getattr(args, "models", None),
                          rounds=args.repeats)
            kwargs.pop("repeats")
        if name == "integrations" and getattr(args, "estimators", None):
            kwargs["estimators"] = args.estimators
        rows = add_ratios(suite.run(**kwargs))
        payload = {"suite": name, "environment": env, "results": rows}
        stamp = env["date"].replace(":", "").replace("-", "")[:15]
        path = write_json(Path(args.out) / f"{name}_{device}_{stamp}.json", payload)
        cols = getattr(suite, "TABLE_COLUMNS", ["op", "impl", "mode", "n", "median_s", "ns_per_element",
                                                "speedup_vs_nflows", "speedup_vs_reference"])
        print(f"\n## {name}\n")
        print(format_table([r for r in rows if "error" not in r], cols))
        for r in rows:
            if "error" in r:
                print(f"  {r['impl']} {r['mode']} n={r['n']}: failed: {r['error']}")
        print(f"\nresults: {path}")
        hook = getattr(suite, "after", None)  # optional: extra outputs (e.g. plots) next to the JSON
        if hook is not None:
            for extra in hook(rows, path) or ():
                print(f"wrote: {extra}")
    return 0
