"""``fastflow score MODEL DATA --out logp.npy``: log-densities of every row of a data file.

MODEL is a ``model.pt`` or a ``fastflow fit`` run folder. DATA is streamed in chunks of
``--chunk-size`` rows: ``.npy`` through a memory map, ``.csv`` line by line (a first line with
no numeric field is a header, and said so; ``--csv-header yes|no`` forces it), ``.npz`` (read
whole: zip members cannot be memory-mapped). So a file larger
than memory is fine; the output is written through a memory map to a temporary file and renamed
into place when complete, so ``logp.npy`` is either absent or whole.

Bad rows (NaN/Inf values, wrong number of values, non-numbers) are never dropped: with
``--on-bad-rows error`` (default) the command lists them (row index and reason) and exits with
status 2 writing nothing; with ``--on-bad-rows nan`` their log-density is NaN, they are listed on
stderr and in ``<out>.bad_rows.json``. Row ``i`` of the output is row ``i`` of the input.

Under ``torchrun`` each rank scores a contiguous part of the rows into its own shard file; rank 0
merges the shards in order after a barrier.

A model file is data: a model built by fastflow's registry is rebuilt from it; a file naming a
user factory (``pkg.mod:fn``) is refused unless you pass ``--trust-factory pkg.mod:fn``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from fastflow.cli import dist
from fastflow.cli.checkpoint import load_model, model_path
from fastflow.cli.errors import CLIError, report
from fastflow.cli.io import (CSV_HEADER_CHOICES, DISK_FULL_ERRNOS, BadRows, CsvSource, NpyWriter, atomic_write_json,
                             check_free_space, check_output_file, header_notice, merge_shards, open_rows, replace_into,
                             shard_path, tmp_path, write_error)
from fastflow.cli.progress import Progress


def add_parser(sub):
    p = sub.add_parser("score", help="log-density of each row of a (large) data file",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="model.pt or a fit run folder")
    p.add_argument("data", metavar="DATA", help=".npy (memory-mapped), .csv or .npz file")
    p.add_argument("--out", required=True, help="output .npy of log-densities (float32, one per row)")
    p.add_argument("--chunk-size", type=int, default=65536, help="rows per chunk (default 65536)")
    p.add_argument("--on-bad-rows", choices=("error", "nan"), default="error",
                   help="bad rows (NaN/Inf, wrong width): fail listing them (default), or score them NaN")
    p.add_argument("--npz-key", default=None, help="array to score in a .npz (default: x, data, test or the first)")
    p.add_argument("--csv-header", choices=CSV_HEADER_CHOICES, default="auto",
                   help="a .csv's first line: a header if no field is a number (auto, default), always (yes), "
                        "never (no)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_common(p)
    p.set_defaults(func=run)


def add_common(p) -> None:
    """Flags score and sample share: the factories a model file may call, the ranks' deadline."""
    p.add_argument("--trust-factory", action="append", default=None, metavar="PKG.MOD:FN",
                   help="allow a model file built by this user factory to call it (repeatable); files built "
                        "by fastflow's registry need none")
    p.add_argument("--dist-timeout", default=dist.DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help=f"under torchrun: fail when another rank does not answer for this long "
                        f"(default {dist.DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--allow-unverified", action="store_true",
                   help="load a format-version-1 model file, which has no digest to verify (its contents may have "
                        "been changed by anyone)")


def run(args) -> int:
    env = None
    try:
        if args.chunk_size < 1:
            raise CLIError(f"--chunk-size must be >= 1, got {args.chunk_size}")
        env = dist.init(args.device, timeout_s=args.dist_timeout)
        return score(args, env)
    except CLIError as e:
        return report("score", e, env.rank if env else int(os.environ.get("RANK", "0") or 0))
    except OSError as e:  # a full disk or quota met somewhere else than the output: still the user's to fix
        if e.errno not in DISK_FULL_ERRNOS:
            raise
        return report("score", write_error(e.filename or args.out, e),
                      env.rank if env else int(os.environ.get("RANK", "0") or 0))
    finally:
        if env is not None:
            dist.shutdown(env)


def score(args, env: dist.DistEnv) -> int:
    out = Path(args.out)
    decision = None
    if env.is_main:
        try:
            check_output_file(out, args.overwrite, inputs=(args.data, model_path(args.model)))
            decision = ("ok", "")
        except CLIError as e:
            decision = ("error", str(e))
    decision = dist.broadcast_object(env, decision)
    if decision[0] == "error":
        raise CLIError(decision[1])

    flow, meta = load_model(args.model, env.device, trust_factory=args.trust_factory,
                            allow_unverified=args.allow_unverified)
    shape = tuple(meta["shape"])
    width = int(np.prod(shape))
    src = open_rows(args.data, npz_key=args.npz_key, csv_header=args.csv_header)
    if isinstance(src, CsvSource):
        # rows of another width are bad rows, not a new width
        src = CsvSource(src.path, width=width, header=args.csv_header)
        notice = header_notice(src)
        if notice and env.is_main and not args.quiet:
            print(f"fastflow score: {notice}", file=sys.stderr)
    elif int(np.prod(src.row_shape)) != width:
        raise CLIError(f"data file {src.path} has rows of shape {src.row_shape}; the model expects {shape}")

    n = len(src)
    if env.is_main:  # the whole output (and, under torchrun, the shards beside it) before any work
        try:
            check_free_space(out, (4 * n + 128) * (2 if env.enabled else 1))
            decision = ("ok", "")
        except CLIError as e:
            decision = ("error", str(e))
    decision = dist.broadcast_object(env, decision)
    if decision[0] == "error":
        raise CLIError(decision[1])
    start, stop = dist.shard_range(n, env.rank, env.world_size)
    target = tmp_path(out) if not env.enabled else shard_path(out, env.rank, env.world_size)
    result = NpyWriter(target, (stop - start,), np.float32, label=out)
    bad = BadRows()
    progress = Progress(stop - start, desc=f"score{f' rank 0/{env.world_size}' if env.enabled else ''}",
                        unit="rows", disable=args.quiet or not env.is_main)
    try:
        with torch.no_grad():
            for first, chunk, chunk_bad in src.chunks(start, stop, args.chunk_size):
                bad.rows.update(chunk_bad.rows)
                lo = first - start
                if len(bad) and args.on_bad_rows == "error":
                    progress.update(len(chunk))  # keep scanning, to list every bad row; skip the model
                    continue
                x = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32)).reshape(-1, *shape)
                rows = np.fromiter(chunk_bad.rows, dtype=np.int64) - first
                if len(rows):  # keep NaN out of the batch so it cannot touch other rows
                    x[torch.from_numpy(rows)] = 0.0
                lp = flow.log_prob(x.to(env.device)).detach().float().cpu().numpy()
                if len(rows):
                    lp[rows] = np.nan
                result.write(lo, lp)
                progress.update(len(chunk))
        result.close()
    except BaseException:
        result.abort()  # ours, partial: never left behind
        raise
    finally:
        progress.close()

    all_bad = dist.gather_objects(env, bad.rows)
    merged = BadRows()
    for part in all_bad:
        merged.rows.update(part)
    dist.barrier(env)
    if len(merged) and args.on_bad_rows == "error":
        target.unlink(missing_ok=True)
        raise CLIError(f"data file {src.path}: {merged.summary()}; fix them, or pass --on-bad-rows nan to score "
                       "them as NaN")
    if env.is_main:
        if env.enabled:
            merge_shards([shard_path(out, r, env.world_size) for r in range(env.world_size)], out)
        else:
            replace_into(target, out)
        report_path = out.with_name(out.name + ".bad_rows.json")
        if len(merged):
            atomic_write_json(report_path, {"data": str(src.path), "bad_rows": [
                {"row": i, "reason": r} for i, r in sorted(merged.rows.items())]})
            print(f"fastflow score: warning: {merged.summary()}; scored as NaN (all listed in {report_path})",
                  file=sys.stderr)
        elif report_path.exists():
            report_path.unlink()  # a stale report from an overwritten output would mislead
        if not args.quiet:
            print(f"fastflow score: {n} rows -> {out}", file=sys.stderr)
    dist.barrier(env)
    return 0
