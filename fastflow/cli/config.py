"""``fastflow fit`` configuration: one flat schema, read from TOML and/or command-line flags.

Every key of the schema is a TOML key and a flag (``batch_size`` <-> ``--batch-size``); flags
override the file, the file overrides the defaults. ``model_args`` is a TOML table of keyword
arguments for the model builder (flag form: ``--model-arg hidden_features=64``, repeatable).
Unknown keys are rejected with a did-you-mean; wrong types and out-of-range values are rejected
naming the key and where it came from. ``fastflow fit --print-config`` prints the resolved
configuration as TOML, which is a valid config file.
"""

from __future__ import annotations

import argparse
import difflib
import math

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastflow.cli.errors import CLIError


@dataclass(frozen=True)
class Field:
    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    minimum: float | None = None
    exclusive_min: bool = False
    maximum: float | None = None
    # Runtime keys change where/how a run executes, not what it computes: they may differ
    # between a run and its resumption.
    runtime: bool = False
    section: str = "training"


FIELDS: list[Field] = [
    Field("data", str, "digits", "embedded data set name (see fastflow.data.names()) or a .npy/.npz/.csv path",
          section="data"),
    Field("val_fraction", float, 0.1, "fraction of a data file's rows held out for validation", minimum=0.0,
          maximum=0.9, section="data"),
    Field("test_fraction", float, 0.1, "fraction of a data file's rows held out for the final test", minimum=0.0,
          maximum=0.9, section="data"),
    Field("csv_header", str, "auto", "a .csv's first line: a header when none of its fields is a number (auto), "
          "always (yes) or never (no)", choices=("auto", "yes", "no"), section="data"),
    Field("model", str, "nsf", "model name for fastflow.flows.build, or 'package.module:factory'", section="model"),
    Field("model_args", dict, {}, "keyword arguments for the model builder (TOML table [model_args]; flag "
          "--model-arg K=V, repeatable), over the defaults: for nsf hidden_features=64, num_layers=4, num_blocks=1; "
          "the builder's own for other models",
          section="model"),
    Field("objective", str, "nll", "training objective: maximum likelihood (nll), or conditional flow matching of "
          "a continuous flow's vector field (flow-matching; model cnf), evaluated by the exact ODE likelihood",
          choices=("nll", "flow-matching")),
    Field("steps", int, 600, "optimisation steps (the training budget)", minimum=1),
    Field("batch_size", int, 256, "global batch size (split evenly across ranks)", minimum=1),
    Field("optimizer", str, "adam", "optimiser", choices=("adam", "adamw", "sgd")),
    Field("lr", float, 1e-3, "learning rate", minimum=0.0, exclusive_min=True),
    Field("weight_decay", float, 0.0, "weight decay", minimum=0.0),
    Field("scheduler", str, "cosine", "learning-rate schedule over `steps`", choices=("cosine", "constant")),
    Field("grad_clip", float, 5.0, "clip the global gradient norm to this (0 = off)", minimum=0.0),
    Field("val_every", int, 50, "validate every N steps (0 = only at the end)", minimum=0),
    Field("patience", int, 6, "stop after N validations without improvement (0 = never stop early)", minimum=0),
    Field("checkpoint_every", int, 100, "write a resumable checkpoint every N steps", minimum=1),
    Field("log_every", int, 10, "write a metrics line every N steps", minimum=1),
    Field("eval_batch_size", int, 2048, "batch size for validation/test evaluation", minimum=1),
    Field("seed", int, 0, "seed for initialisation, data order and splits", minimum=0, maximum=2**32 - 1),
    Field("samples", int, 1000, "samples drawn for the final plot and samples.npy (0 = none)", minimum=0),
    Field("out", str, "", "output folder (default runs/<model>-<data>)", runtime=True, section="run"),
    Field("device", str, "auto", "auto, cpu, cuda or cuda:N", runtime=True, section="run"),
    Field("threads", int, 0, "torch CPU threads per process (0 = leave torch's default)", minimum=0, runtime=True,
          section="run"),
    Field("quiet", bool, False, "no progress bar", runtime=True, section="run"),
    Field("compile", bool, False, "compile the training step with torch.compile (pays off on long runs: the first "
          "step compiles for tens of seconds; see the docs' performance page)", runtime=True, section="run"),
    Field("overwrite", bool, False, "replace an existing run folder instead of resuming it (only the files fit "
          "wrote are removed)", runtime=True, section="run"),
    Field("recover", bool, False, "when checkpoint.pt is corrupt, resume from the verified checkpoint.prev.pt",
          runtime=True, section="run"),
    Field("allow_data_change", bool, False, "resume even though the data file's contents changed since the run "
          "started", runtime=True, section="run"),
    Field("dist_timeout", float, 600.0, "under torchrun: fail when another rank does not answer for this many "
          "seconds", minimum=0.0, exclusive_min=True, runtime=True, section="run"),
]
BY_NAME = {f.name: f for f in FIELDS}

# Builder arguments used for a model unless the config sets them: the default `fastflow fit` (an
# NSF on digits) is sized to finish in a few minutes on 2 CPU cores (the builder's own default
# NSF has 0.8 M parameters and would take ~4x longer per step). Other models use their builder's
# defaults.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "nsf": {"hidden_features": 64, "num_layers": 4, "num_blocks": 1},
}


def defaults() -> dict[str, Any]:
    return {f.name: (dict(f.default) if isinstance(f.default, dict) else f.default) for f in FIELDS}


def _did_you_mean(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _type_name(t: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table"}[t]


def check_value(f: Field, value: Any, where: str) -> Any:
    """Validate (and lightly coerce: int -> float) one value; raise CLIError naming key and source."""
    if f.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, f.type) and not (f.type is int and isinstance(value, bool))
    if not ok:
        raise CLIError(f"config key '{f.name}' ({where}): expected {_type_name(f.type)}, got {value!r}")
    if f.type is float and not math.isfinite(value):
        raise CLIError(f"config key '{f.name}' ({where}): expected a finite number, got {value!r}")
    if f.choices is not None and value not in f.choices:
        raise CLIError(f"config key '{f.name}' ({where}): {value!r} is not one of {', '.join(map(repr, f.choices))}"
                       + _did_you_mean(str(value), f.choices))
    if f.minimum is not None and (value < f.minimum or (f.exclusive_min and value == f.minimum)):
        op = ">" if f.exclusive_min else ">="
        raise CLIError(f"config key '{f.name}' ({where}): must be {op} {f.minimum}, got {value!r}")
    if f.maximum is not None and value > f.maximum:
        raise CLIError(f"config key '{f.name}' ({where}): must be <= {f.maximum}, got {value!r}")
    if f.type is dict:
        for k in value:
            if not isinstance(k, str) or not k.isidentifier():
                raise CLIError(f"config key '{f.name}' ({where}): {k!r} is not a valid keyword argument name")
    return value


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CLIError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot parse config file {path}: {e}") from None
    out = {}
    for key, value in data.items():
        if key not in BY_NAME:
            raise CLIError(f"unknown config key '{key}' in {path}" + _did_you_mean(key, BY_NAME))
        out[key] = check_value(BY_NAME[key], value, f"in {path}")
    return out


def parse_model_arg(text: str) -> tuple[str, Any]:
    """``K=V`` with V read as a TOML value (so 64, 1e-3, true, [64, 64], "s" work); a bare word
    that is not TOML is taken as a string."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise CLIError(f"--model-arg expects KEY=VALUE, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key, parsed


def add_flags(p: argparse.ArgumentParser) -> None:
    """One flag per schema key; defaults are None so only given flags override the file."""
    for f in FIELDS:
        flag = "--" + f.name.replace("_", "-")
        if f.type is dict:
            p.add_argument("--model-arg", dest="model_args", action="append", metavar="KEY=VALUE", default=None,
                           help=f.help)
        elif f.type is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=f.help)
        else:
            metavar = "{" + ",".join(f.choices) + "}" if f.choices else f.name.upper()
            p.add_argument(flag, dest=f.name, type=str, default=None, metavar=metavar,
                           help=f"{f.help} (default: {f.default!r})")


def _coerce_flag(f: Field, text: str) -> Any:
    if f.type is str:
        return text
    try:
        return f.type(text)
    except ValueError:
        raise CLIError(f"flag --{f.name.replace('_', '-')}: expected {_type_name(f.type)}, got {text!r}") from None


@dataclass
class Resolved:
    config: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)


def resolve(args: argparse.Namespace) -> Resolved:
    """defaults <- config file <- flags."""
    cfg = defaults()
    sources = {k: "default" for k in cfg}
    if getattr(args, "config", None):
        for k, v in read_toml(args.config).items():
            cfg[k] = v
            sources[k] = str(args.config)
    for f in FIELDS:
        given = getattr(args, f.name, None)
        if given is None:
            continue
        if f.type is dict:
            merged = dict(cfg[f.name])
            for item in given:
                k, v = parse_model_arg(item)
                merged[k] = v
            value = merged
        elif f.type is bool:
            value = bool(given)
        else:
            value = _coerce_flag(f, given)
        cfg[f.name] = check_value(f, value, "flag --" + f.name.replace("_", "-"))
        sources[f.name] = "flag"
    cfg["model_args"] = {**MODEL_DEFAULTS.get(cfg["model"], {}), **cfg["model_args"]}
    if cfg["val_fraction"] + cfg["test_fraction"] >= 1.0:
        raise CLIError("config keys 'val_fraction' + 'test_fraction' must be < 1, got "
                       f"{cfg['val_fraction']} + {cfg['test_fraction']}")
    return Resolved(cfg, sources)


def comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """The keys that define what a run computes (runtime keys dropped)."""
    return {k: v for k, v in cfg.items() if k in BY_NAME and not BY_NAME[k].runtime}


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return k
    return None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def to_toml(cfg: dict[str, Any]) -> str:
    lines = ["# fastflow fit configuration (every key is also a flag: batch_size -> --batch-size)"]
    section = None
    for f in FIELDS:
        if f.type is dict:
            continue
        if f.section != section:
            section = f.section
            lines.append(f"\n# --- {section}")
        lines.append(f"# {f.help}" + (f" ({', '.join(f.choices)})" if f.choices else ""))
        lines.append(f"{f.name} = {_toml_value(cfg[f.name])}")
    lines.append("\n# keyword arguments for the model builder")
    lines.append("[model_args]")
    for k, v in cfg["model_args"].items():
        lines.append(f"{k} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"
