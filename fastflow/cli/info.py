"""``fastflow info``: versions, devices, and which backends run which ops (and why not)."""

from __future__ import annotations

import json


def add_parser(sub):
    p = sub.add_parser("info", help="show versions, devices and backend availability")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import fastflow
    from fastflow.backends import backend_status

    status = backend_status()
    status["versions"]["fastflow"] = fastflow.__version__
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print("fastflow", fastflow.__version__)
    versions = status["versions"].items()
    print("versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in versions if k != "fastflow"))
    print("devices:  " + ", ".join(status["devices"]))
    if status["triton_interpret"]:
        print("TRITON_INTERPRET=1: Triton kernels run on the CPU interpreter")
    from fastflow.backends import ENV_VAR, UnknownBackendError, env_backend

    try:
        forced = env_backend()
        if forced:
            print(f"{ENV_VAR}={forced}: every op is forced onto the {forced!r} backend")
    except UnknownBackendError as e:
        print(f"warning: {e}; the batch commands refuse to run until it is fixed or unset")
    print(f"backends (backend=None tries {', '.join(status['order'])} in this order, each for the ops it is a "
          "default for; its other ops only through the routes below or by name):")
    for name, b in status["backends"].items():
        mark = "available  " if b["available"] else "unavailable"
        dtypes = "/".join(b["dtypes"])
        ops = ", ".join(b["ops"]) or "none"
        print(f"  {name:<10} {mark} {b['description']}; devices {'/'.join(b['devices'])}; dtypes {dtypes}; ops: {ops}")
        if b["reason"]:
            print(f"  {'':<10} why not: {b['reason']}")
        if b["default_for"] != b["ops"]:
            print(f"  {'':<10} default for: {', '.join(b['default_for']) or 'none'}")
        for op, note in b["notes"].items():
            print(f"  {'':<10} {op}: {note}")
    print("routes (backend=None, no FASTFLOW_BACKEND):")
    for route in status["routes"]:
        print(f"  {route}")
    return 0
