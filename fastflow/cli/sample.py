"""``fastflow sample MODEL -n N --out samples.npy --seed S``: draw N samples, reproducibly.

Samples are drawn in chunks of ``--chunk-size`` rows; chunk ``c`` is drawn from a torch generator
seeded with a hash of ``(seed, c)``. The recipe is therefore ``(model, n, seed, chunk size)``:
the same recipe gives the same file on any number of ranks (each rank draws a contiguous range
of chunks and rank 0 merges the shards in order), but a different chunk size gives different
(equally valid) samples, because a flow draws its base noise for a whole batch at once. The
output is written through a memory map to a temporary file and renamed into place when complete.
Seeds are integers in ``[0, 2**64)``; anything else is refused rather than wrapped.
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
from fastflow.cli.io import (DISK_FULL_ERRNOS, NpyWriter, check_free_space, check_output_file, merge_shards,
                             replace_into, shard_path, tmp_path, write_error)
from fastflow.cli.progress import Progress
from fastflow.cli.score import add_common

MAX_SEED = 2**64 - 1


def add_parser(sub):
    p = sub.add_parser("sample", help="draw samples from a trained flow (seeded, chunked)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="model.pt or a fit run folder")
    p.add_argument("-n", "--num", dest="n", type=int, required=True, help="number of samples")
    p.add_argument("--out", required=True, help="output .npy (float32, shape (N, *event_shape))")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--chunk-size", type=int, default=4096,
                   help="rows per seeded chunk; part of the recipe (default 4096)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_common(p)
    p.set_defaults(func=run)


def run(args) -> int:
    env = None
    try:
        if args.n < 1:
            raise CLIError(f"-n must be >= 1, got {args.n}")
        if args.chunk_size < 1:
            raise CLIError(f"--chunk-size must be >= 1, got {args.chunk_size}")
        if not 0 <= args.seed <= MAX_SEED:
            raise CLIError(f"--seed must be an integer in [0, 2**64 - 1], got {args.seed}")
        env = dist.init(args.device, timeout_s=args.dist_timeout)
        return sample(args, env)
    except CLIError as e:
        return report("sample", e, env.rank if env else int(os.environ.get("RANK", "0") or 0))
    except OSError as e:  # a full disk or quota met somewhere else than the output: still the user's to fix
        if e.errno not in DISK_FULL_ERRNOS:
            raise
        return report("sample", write_error(e.filename or args.out, e),
                      env.rank if env else int(os.environ.get("RANK", "0") or 0))
    finally:
        if env is not None:
            dist.shutdown(env)


def chunk_seed(seed: int, chunk: int) -> int:
    """A 63-bit seed per (seed, chunk): independent streams, no overlap between neighbours."""
    if not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**64 - 1], got {seed}")
    return int(np.random.SeedSequence([int(seed), int(chunk)]).generate_state(1, np.uint64)[0]
               & 0x7FFFFFFFFFFFFFFF)


def sample(args, env: dist.DistEnv) -> int:
    out = Path(args.out)
    decision = None
    if env.is_main:
        try:
            check_output_file(out, args.overwrite, inputs=(model_path(args.model),))
            decision = ("ok", "")
        except CLIError as e:
            decision = ("error", str(e))
    decision = dist.broadcast_object(env, decision)
    if decision[0] == "error":
        raise CLIError(decision[1])

    flow, meta = load_model(args.model, env.device, trust_factory=args.trust_factory,
                            allow_unverified=args.allow_unverified)
    shape = tuple(meta["shape"])
    n, cs = args.n, args.chunk_size
    if env.is_main:  # the whole output (and, under torchrun, the shards beside it) before any work
        try:
            row_bytes = int(np.prod(shape, dtype=np.int64)) * 4
            check_free_space(out, (n * row_bytes + 128) * (2 if env.enabled else 1))
            decision = ("ok", "")
        except CLIError as e:
            decision = ("error", str(e))
    decision = dist.broadcast_object(env, decision)
    if decision[0] == "error":
        raise CLIError(decision[1])
    n_chunks = -(-n // cs)
    c0, c1 = dist.shard_range(n_chunks, env.rank, env.world_size)
    r0, r1 = min(c0 * cs, n), min(c1 * cs, n)
    target = tmp_path(out) if not env.enabled else shard_path(out, env.rank, env.world_size)
    result = NpyWriter(target, (r1 - r0, *shape), np.float32, label=out)
    progress = Progress(r1 - r0, desc=f"sample{f' rank 0/{env.world_size}' if env.enabled else ''}", unit="rows",
                        disable=args.quiet or not env.is_main)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
            for c in range(c0, c1):
                a, b = c * cs, min((c + 1) * cs, n)
                torch.manual_seed(chunk_seed(args.seed, c))
                x = flow.sample(b - a)
                result.write(a - r0, x.detach().float().cpu().numpy().reshape(b - a, *shape))
                progress.update(b - a)
        result.close()
    except BaseException:
        result.abort()  # ours, partial: never left behind
        raise
    finally:
        progress.close()
    dist.barrier(env)
    if env.is_main:
        if env.enabled:
            merge_shards([shard_path(out, r, env.world_size) for r in range(env.world_size)], out)
        else:
            replace_into(target, out)
        if not args.quiet:
            print(f"fastflow sample: {n} samples (seed {args.seed}, chunk size {cs}) -> {out}", file=sys.stderr)
    dist.barrier(env)
    return 0
