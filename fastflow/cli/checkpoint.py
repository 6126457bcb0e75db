"""Model files and training checkpoints.

``model.pt`` (what ``score``/``sample`` load)::

    {"format": "fastflow-model", "format_version": 1, "fastflow_version": ...,
     "factory": "fastflow.flows:build", "spec": flow.spec, "state_dict": ..., "shape": [...],
     "data": {...}, "config": {...}}

``checkpoint.pt`` (what a restarted ``fit`` resumes from) adds the optimiser, scheduler, RNG
states of every rank (torch, numpy, python), step (the data-order position is a function of the
step), best validation score and early-stopping state.

Both are written atomically and loaded with ``torch.load(weights_only=True)``: only tensors and
plain containers, no pickled code. A file from another format version or another fastflow
version is refused with a clear message, as is a checkpoint of a different model.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

import fastflow
from fastflow.cli.errors import CLIError

MODEL_FORMAT = "fastflow-model"
CHECKPOINT_FORMAT = "fastflow-checkpoint"
FORMAT_VERSION = 1
DEFAULT_FACTORY = "fastflow.flows:build"


def factory_for(model: str) -> tuple[str, str | None]:
    """``"nsf"`` -> (``"fastflow.flows:build"``, ``"nsf"``): ``build("nsf", shape, **model_args)``.
    ``"pkg.mod:fn"`` -> (``"pkg.mod:fn"``, None): a user factory, called ``fn(shape=shape, **model_args)``;
    like ``build`` it must return a module with ``log_prob``, ``sample`` and a ``spec`` dict such
    that ``fn(**spec)`` rebuilds it."""
    return (model, None) if ":" in model else (DEFAULT_FACTORY, model)


def resolve_factory(path: str):
    mod_name, _, attr = path.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        if mod_name == "fastflow.flows":
            raise CLIError(f"the model builder fastflow.flows.build is not available: {e}") from None
        raise CLIError(f"cannot import model factory module {mod_name!r}: {e}") from None
    fn = getattr(mod, attr, None)
    if fn is None:
        raise CLIError(f"model factory {path!r}: module {mod_name} has no attribute {attr!r}")
    return fn


def build_model(model: str, shape: tuple[int, ...], model_args: dict) -> tuple[torch.nn.Module, str]:
    factory, name = factory_for(model)
    fn = resolve_factory(factory)
    try:
        flow = fn(name, tuple(shape), **model_args) if name is not None else fn(shape=tuple(shape), **model_args)
    except (TypeError, ValueError, KeyError) as e:
        raise CLIError(f"cannot build model {model!r} for data of shape {tuple(shape)} with model_args "
                       f"{model_args}: {e}") from None
    return flow, factory


def spec_of(flow) -> dict:
    spec = getattr(flow, "spec", None)
    if not isinstance(spec, dict):
        raise CLIError(f"model {type(flow).__name__} has no .spec dict, so it cannot be saved and rebuilt")
    return _plain(spec)


def _plain(obj):
    """Specs are stored as plain containers (tuples -> lists) so that they load with weights_only
    and compare equal after a round trip."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _tuplify_shapes(spec: dict) -> dict:
    spec = dict(spec)
    if isinstance(spec.get("shape"), list):
        spec["shape"] = tuple(spec["shape"])
    return spec


def rebuild(factory: str, spec: dict) -> torch.nn.Module:
    fn = resolve_factory(factory)
    try:
        return fn(**_tuplify_shapes(spec))
    except (TypeError, ValueError, KeyError) as e:
        raise CLIError(f"cannot rebuild model from spec {spec}: {e}") from None


def _header(fmt: str) -> dict:
    return {"format": fmt, "format_version": FORMAT_VERSION, "fastflow_version": fastflow.__version__}


def _load(path: Path, fmt: str) -> dict:
    if not path.is_file():
        raise CLIError(f"cannot read {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CLIError(f"cannot read {path}: not a fastflow file or corrupt ({type(e).__name__})") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CLIError(f"{path} is not a {fmt} file (found {found!r})")
    if obj.get("format_version") != FORMAT_VERSION:
        raise CLIError(f"{path} has format version {obj.get('format_version')}; this fastflow "
                       f"({fastflow.__version__}) reads version {FORMAT_VERSION}")
    if obj.get("fastflow_version") != fastflow.__version__:
        raise CLIError(f"{path} was written by fastflow {obj.get('fastflow_version')}; this is fastflow "
                       f"{fastflow.__version__} (re-run fit, or use the matching fastflow version)")
    return obj


def model_payload(flow, factory: str, shape, data_info: dict, config: dict, extra: dict | None = None) -> dict:
    return {**_header(MODEL_FORMAT), "factory": factory, "spec": spec_of(flow), "shape": list(shape),
            "state_dict": {k: v.detach().cpu().clone() for k, v in flow.state_dict().items()},
            "data": data_info, "config": config, **(extra or {})}


def model_path(path: str | Path) -> Path:
    path = Path(path)
    return path / "model.pt" if path.is_dir() else path


def load_model(path: str | Path, device="cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the flow stored in a ``model.pt`` (or a run folder holding one), in eval mode."""
    path = model_path(path)
    obj = _load(path, MODEL_FORMAT)
    flow = rebuild(obj["factory"], obj["spec"])
    load_state(flow, obj["state_dict"], path)
    if torch.device(device).type != "cpu":
        flow.to(device)
    return flow.eval(), obj


def load_state(flow: torch.nn.Module, state: dict, path: Path) -> None:
    try:
        flow.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CLIError(f"{path} holds parameters of a different model: {detail}") from None


def load_checkpoint(path: str | Path, expect_factory: str, expect_spec: dict) -> dict:
    path = Path(path)
    obj = _load(path, CHECKPOINT_FORMAT)
    if obj.get("factory") != expect_factory or obj.get("spec") != expect_spec:
        raise CLIError(f"checkpoint {path} is of another model ({obj.get('factory')} {obj.get('spec')}), "
                       f"this run builds {expect_factory} {expect_spec}; use another --out or --overwrite")
    return obj


def checkpoint_payload(**fields: Any) -> dict:
    return {**_header(CHECKPOINT_FORMAT), **fields}
