"""``fastflow export RUN --out model.pt2``: a ``torch.export`` program of a trained model.

RUN is a ``model.pt`` or a ``fastflow fit`` run folder. The program computes the model's
log-density (``--what log_prob``: ``x (B, *shape)[, context (B, F)] -> (B,)``) or draws samples
(``--what sample``: standard normal noise ``eps (B, *shape)[, context] -> (x, log_prob)``; see
``fastflow.flows.export``). ``--dynamic-batch`` exports any batch size >= 1, else the batch is
fixed at ``--batch``. Run the program with no fastflow model code::

    import fastflow.ops, torch
    program = fastflow.ops.load_exported("model.pt2")   # or torch.export.load after import fastflow.ops
    log_p = program.module()(x)

The output is written to a temporary file and renamed into place when complete; an existing file
is replaced only with ``--overwrite``. The backend each fused op ran on is fixed in the program:
export on the kind of device you deploy to (``--device``). A model file is data: a model built by
fastflow's registry is rebuilt from it; a file naming a user factory is refused unless you pass
``--trust-factory pkg.mod:fn``.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import torch

from fastflow.cli.checkpoint import load_model, model_path
from fastflow.cli.errors import CLIError, report
from fastflow.cli.io import remove_stale_temps, replace_into, tmp_path


def add_parser(sub):
    p = sub.add_parser("export", help="a torch.export program (.pt2) of a model's log_prob or sampler",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="RUN", help="model.pt or a fit run folder")
    p.add_argument("--out", required=True, help="output .pt2 file")
    p.add_argument("--what", choices=("log_prob", "sample"), default="log_prob",
                   help="the log-density (default) or the sampler (noise in, samples and log-densities out)")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: fixed at --batch)")
    p.add_argument("--batch", type=int, default=1, help="the example (and, without --dynamic-batch, the fixed) "
                                                        "batch size (default 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the program will run (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--trust-factory", action="append", default=None, metavar="PKG.MOD:FN",
                   help="allow a model file built by this user factory to call it (repeatable)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="load a format-version-1 model file, which has no digest to verify")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        return export(args)
    except CLIError as e:
        return report("export", e)


def _check_out(out: Path, overwrite: bool, model: Path) -> None:
    if out.suffix != ".pt2":
        raise CLIError(f"output {out} must be a .pt2 file")
    if out.is_dir():
        raise CLIError(f"output {out} is a directory")
    if out.exists() and model.exists() and os.path.samefile(out, model):
        raise CLIError(f"output {out} is the model file; choose another --out")
    if out.exists() and not overwrite:
        raise CLIError(f"output {out} exists; pass --overwrite to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create the folder of output {out}: {e.strerror or e}") from None
    if not os.access(out.parent, os.W_OK):
        raise CLIError(f"cannot write to the folder of output {out}")
    remove_stale_temps(out)


def export(args) -> int:
    from fastflow.flows.export import NotExportableError, export_flow

    if args.batch < 1:
        raise CLIError(f"--batch must be >= 1, got {args.batch}")
    out = Path(args.out)
    _check_out(out, args.overwrite, model_path(args.model))
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise CLIError(f"--device {args.device!r}: {e}") from None
    flow, meta = load_model(args.model, device, trust_factory=args.trust_factory,
                            allow_unverified=args.allow_unverified)
    try:
        program = export_flow(flow, args.what, batch=args.batch, dynamic_batch=args.dynamic_batch, device=device)
    except NotExportableError as e:
        raise CLIError(str(e)) from None
    tmp = tmp_path(out)
    try:
        buffer = io.BytesIO()  # torch.export.save wants a name ending in .pt2: our temporary's does not
        torch.export.save(program, buffer)
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CLIError(f"cannot write {out}: {e.strerror or e}; nothing was written") from None
    replace_into(tmp, out)
    inputs = "x" if args.what == "log_prob" else "eps (standard normal)"
    shape = "B" if args.dynamic_batch else str(args.batch)
    ctx = f", context ({shape}, {flow.context_features})" if isinstance(flow.context_features, int) else ""
    print(f"wrote {out}: {args.what} of {tuple(meta['shape'])}, inputs {inputs} ({shape}, "
          f"{', '.join(map(str, meta['shape']))}){ctx}; run it with: import fastflow.ops; "
          f"fastflow.ops.load_exported({str(out)!r}).module()(...)")
    return 0
