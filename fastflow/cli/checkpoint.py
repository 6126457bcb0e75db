"""Model files and training checkpoints.

``model.pt`` (what ``score``/``sample`` load)::

    {"format": "fastflow-model", "format_version": 2, "fastflow_version": ...,
     "factory": "fastflow.flows:build", "spec": flow.spec, "state_dict": ..., "shape": [...],
     "data": {...}, "config": {...}, "digest": "sha256:..."}

``checkpoint.pt`` (what a restarted ``fit`` resumes from) adds the optimiser, scheduler, RNG
states of every rank (torch, numpy, python), step (the data-order position is a function of the
step), best validation score, early-stopping state and the fingerprint of the data file.

Both are written atomically and loaded with ``torch.load(weights_only=True)``: only tensors and
plain containers, no pickled code. Files are data, never code:

- **Rebuilding calls only fastflow's registry.** A file names the factory that built its model;
  ``fastflow.flows:build`` (the registry) is the only one called on the file's word. A user
  factory ``pkg.mod:fn`` stored in a file is imported only when the person running the command
  names it (``--trust-factory pkg.mod:fn``; ``load_model(path, trust_factory="pkg.mod:fn")``);
  otherwise loading is refused, naming the factory and how to allow it.
- **Every file carries a digest of its payload** (SHA-256 over a canonical walk of the stored
  containers: keys, scalars, and each tensor's dtype, shape and bytes), verified on load, so a
  flipped bit anywhere in the data is an error naming the file, not a different model.

- **A file's spec is checked against its tensors before anything is built.** The spec's sizes
  (``num_layers``, ``hidden_features``, ...) may not exceed what the stored tensors could hold,
  and the build itself runs under an allocation and operation budget proportional to the stored
  parameters: a sealed file asking for ``hidden_features=2**34`` or ``num_layers=10**7`` is refused
  in a moment with one line, not a 68 GB allocation (anyone can re-seal a file, so the digest
  alone is no defence).

A file from another format version or another fastflow version is refused with a clear message,
as is a checkpoint of a different model. Version-1 files (written before digests) cannot be
verified: they load only when the person asks for it (``--allow-unverified``,
``load_model(path, allow_unverified=True)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import math
import numbers
import re
import struct
import sys
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastflow
from fastflow.cli.errors import CLIError

MODEL_FORMAT = "fastflow-model"
CHECKPOINT_FORMAT = "fastflow-checkpoint"
FORMAT_VERSION = 2
LEGACY_VERSIONS = (1,)  # readable, without a digest to verify
DEFAULT_FACTORY = "fastflow.flows:build"
_FACTORY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


def factory_for(model: str) -> tuple[str, str | None]:
    """``"nsf"`` -> (``"fastflow.flows:build"``, ``"nsf"``): ``build("nsf", shape, **model_args)``.
    ``"pkg.mod:fn"`` -> (``"pkg.mod:fn"``, None): a user factory, called ``fn(shape=shape, **model_args)``;
    like ``build`` it must return a module with ``log_prob``, ``sample`` and a ``spec`` dict such
    that ``fn(**spec)`` rebuilds it."""
    return (model, None) if ":" in model else (DEFAULT_FACTORY, model)


def _check_factory_name(path: str) -> None:
    if not isinstance(path, str) or not _FACTORY_RE.match(path):
        raise CLIError(f"model factory {path!r} is not of the form 'package.module:function'")


def resolve_factory(path: str):
    """Import a factory named by the person running the command (never one read from a file
    unless that person named it too: see :func:`rebuild`)."""
    _check_factory_name(path)
    if path == DEFAULT_FACTORY:
        from fastflow.flows import build

        return build
    mod_name, _, attr = path.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise CLIError(f"cannot import model factory module {mod_name!r}: {e}") from None
    fn = getattr(mod, attr, None)
    if fn is None or not callable(fn):
        raise CLIError(f"model factory {path!r}: module {mod_name} has no callable {attr!r}")
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


def _trusted(trust_factory) -> set[str]:
    if trust_factory is None:
        return set()
    if isinstance(trust_factory, str):
        return {trust_factory}
    return set(trust_factory)


# Spec sizes that each add at least one stored tensor (counts) or one stored value per unit (widths):
# no honest file has one larger than its number of tensors or its largest tensor.
_SPEC_SIZES = ("num_layers", "num_blocks", "num_hidden", "depth", "levels", "hidden_features", "hidden_channels",
               "num_bins", "context_features")
# The build of a stored model may allocate this many times the stored bytes, plus a constant (masks,
# permutations, initialisation temporaries), and run this many tensor operations per stored tensor,
# plus a constant (spectral-norm power iterations). Honest registry models stay well inside (at most
# ~2.3x the stored bytes and ~100 operations per tensor).
_BUILD_BYTES_FACTOR, _BUILD_BYTES_SLACK = 8, 64 << 20
_BUILD_OPS_PER_TENSOR, _BUILD_OPS_SLACK = 400, 50_000


class _BuildTooLarge(Exception):
    pass


class _BuildBudget(TorchDispatchMode):
    """Counts what a model build allocates and how many tensor operations it runs, and stops it
    (before the allocation) once it exceeds the budget."""

    def __init__(self, max_bytes: int, max_ops: int):
        super().__init__()
        self.max_bytes, self.max_ops = max_bytes, max_ops
        self.bytes = 0
        self.ops = 0
        self._seen: set[int] = set()

    def _requested(self, func, args) -> int:
        """Elements an op is about to allocate, judged from its size arguments (before it runs)."""
        most = 0
        for a in args:
            if isinstance(a, (list, tuple)) and a and all(isinstance(x, int) for x in a):
                most = max(most, math.prod(max(int(x), 0) for x in a))
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        ints = [int(a) for a in args if isinstance(a, int) and not isinstance(a, bool)]
        if ints and name.startswith("eye"):
            most = max(most, ints[0] * (ints[1] if len(ints) > 1 else ints[0]))
        elif ints and name.split(".")[0] in ("arange", "randperm", "linspace", "logspace"):
            most = max(most, max(ints))
        return most

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += 1
        if self.ops > self.max_ops:
            raise _BuildTooLarge(f"more than {self.max_ops} tensor operations")
        if self.bytes + 8 * self._requested(func, [*args, *kwargs.values()]) > self.max_bytes:
            raise _BuildTooLarge(f"more than {self.max_bytes} bytes")
        out = func(*args, **kwargs)
        for t in out if isinstance(out, (list, tuple)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                try:
                    storage = t.untyped_storage()
                    key, size = storage.data_ptr(), storage.nbytes()
                except (RuntimeError, NotImplementedError):
                    continue
                if key not in self._seen:
                    self._seen.add(key)
                    self.bytes += size
                    if self.bytes > self.max_bytes:
                        raise _BuildTooLarge(f"more than {self.max_bytes} bytes")
        return out


def _state_stats(state) -> tuple[int, int, int] | None:
    """(number of tensors, total bytes, largest tensor's elements) of a stored state dict."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    total = sum(v.numel() * v.element_size() for v in state.values())
    largest = max((v.numel() for v in state.values()), default=0)
    return len(state), total, largest


def _check_spec_sizes(spec: dict, stats: tuple[int, int, int], where: str) -> None:
    """Refuse a registry spec asking for more than its stored tensors could hold."""
    n_tensors, total, largest = stats
    bound = max(n_tensors, largest)
    sizes = dict(spec.get("kwargs") or {}) if isinstance(spec.get("kwargs"), dict) else {}
    sizes.update({k: v for k, v in spec.items() if k != "kwargs"})
    for key in _SPEC_SIZES:
        value = sizes.get(key)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > bound:
            raise CLIError(f"{where}asks for {key}={value}, more than its {n_tensors} stored tensors "
                           f"(largest {largest} values) could hold; refusing to build it (a damaged or forged "
                           "file)")


def rebuild(factory: str, spec: dict, *, trust_factory: str | Iterable[str] | None = None,
            source: Path | str | None = None, state: dict | None = None) -> torch.nn.Module:
    """The model a file describes: ``build(**spec)`` from fastflow's registry, or a user factory
    only if it is among ``trust_factory`` (named by the person, never taken from the file).

    ``state``: the stored parameters the model is for. The spec is checked against them first
    (no size larger than they could hold) and the build runs under a budget proportional to them,
    so a forged spec cannot exhaust memory or time before the parameters are compared."""
    where = f"{source} " if source is not None else ""
    if not isinstance(spec, dict):
        raise CLIError(f"{where}holds a model spec of type {type(spec).__name__}, expected a table")
    if factory != DEFAULT_FACTORY:
        if not isinstance(factory, str) or factory not in _trusted(trust_factory):
            raise CLIError(
                f"{where}asks to rebuild its model by calling the factory {factory!r}; fastflow imports and runs "
                f"code named in a file only when you name it too: pass --trust-factory {factory} (Python: "
                f"load_model(path, trust_factory={factory!r})) if you trust it")
    fn = resolve_factory(factory)
    stats = _state_stats(state) if state is not None else None
    if stats is not None and factory == DEFAULT_FACTORY:
        _check_spec_sizes(spec, stats, where)
    budget = contextlib.nullcontext()
    if stats is not None:
        budget = _BuildBudget(_BUILD_BYTES_FACTOR * stats[1] + _BUILD_BYTES_SLACK,
                              _BUILD_OPS_PER_TENSOR * stats[0] + _BUILD_OPS_SLACK)
    try:
        with budget:
            return fn(**_tuplify_shapes(spec))
    except _BuildTooLarge as e:
        raise CLIError(f"{where}describes a model whose construction needs {e}, far more than its stored "
                       f"parameters ({stats[0]} tensors, {stats[1]} bytes) could fill; refusing to build it "
                       "(a damaged or forged file)") from None
    except (TypeError, ValueError, KeyError) as e:
        raise CLIError(f"cannot rebuild model from spec {spec}: {e}") from None


# --------------------------------------------------------------------------- digests


def _walk_digest(h, obj) -> None:
    """Feed a canonical, type-tagged encoding of ``obj`` to the hash ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(b"T" + str(t.dtype).encode() + repr(tuple(t.shape)).encode() + b";")
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"D%d;" % len(obj))
        for k in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _walk_digest(h, k)
            _walk_digest(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update((b"L" if isinstance(obj, list) else b"U") + b"%d;" % len(obj))
        for v in obj:
            _walk_digest(h, v)
    elif isinstance(obj, bool) or obj is None:
        h.update(b"B" + repr(obj).encode() + b";")
    elif isinstance(obj, int):
        h.update(b"I" + str(obj).encode() + b";")
    elif isinstance(obj, float):
        h.update(b"F" + struct.pack("<d", obj))
    elif isinstance(obj, str):
        b = obj.encode("utf-8", "surrogatepass")
        h.update(b"S%d;" % len(b) + b)
    elif isinstance(obj, (bytes, bytearray)):
        h.update(b"Y%d;" % len(obj) + bytes(obj))
    elif isinstance(obj, (torch.dtype, torch.device, torch.Size)):
        h.update(b"O" + repr(obj).encode() + b";")
    else:
        raise TypeError(f"cannot digest a {type(obj).__name__} in a fastflow file")


def payload_digest(obj: dict) -> str:
    """``sha256:<hex>`` of everything in ``obj`` but its ``digest`` entry."""
    h = hashlib.sha256()
    _walk_digest(h, {k: v for k, v in obj.items() if k != "digest"})
    return "sha256:" + h.hexdigest()


def seal(obj: dict) -> dict:
    """``obj`` with its payload digest (what every fastflow file is written as)."""
    return {**obj, "digest": payload_digest(obj)}


class CorruptFileError(CLIError):
    """A fastflow file whose payload does not match its digest (or cannot be read at all)."""


def _header(fmt: str) -> dict:
    return {"format": fmt, "format_version": FORMAT_VERSION, "fastflow_version": fastflow.__version__}


def _load(path: Path, fmt: str, allow_unverified: bool = False,
          how_to_allow: str = "pass --allow-unverified (Python: load_model(path, allow_unverified=True))") -> dict:
    if not path.is_file():
        raise CLIError(f"cannot read {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CorruptFileError(f"{path} is corrupt or not a fastflow file: it cannot be read ({type(e).__name__})"
                               ) from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CLIError(f"{path} is not a {fmt} file (found {found!r})")
    version = obj.get("format_version")
    if version not in (FORMAT_VERSION, *LEGACY_VERSIONS):
        raise CLIError(f"{path} has format version {version}; this fastflow "
                       f"({fastflow.__version__}) reads version {FORMAT_VERSION}")
    if obj.get("fastflow_version") != fastflow.__version__:
        raise CLIError(f"{path} was written by fastflow {obj.get('fastflow_version')}; this is fastflow "
                       f"{fastflow.__version__} (re-run fit, or use the matching fastflow version)")
    if version == FORMAT_VERSION:
        stored = obj.get("digest")
        try:
            actual = payload_digest(obj)
        except TypeError as e:
            raise CorruptFileError(f"{path} is corrupt: {e}") from None
        if stored != actual:
            raise CorruptFileError(f"{path} is corrupt: its contents do not match the digest stored when it was "
                                   "written (damaged or modified since)")
    elif not allow_unverified:
        raise CLIError(f"{path} is a format-version-{version} file without a digest: its contents cannot be "
                       f"verified (anyone may have changed them); {how_to_allow} if you trust where it came from")
    else:
        print(f"fastflow: warning: {path} is a format-version-{version} file without a digest; loading it "
              "unverified as asked", file=sys.stderr)
    return obj


def model_payload(flow, factory: str, shape, data_info: dict, config: dict, extra: dict | None = None) -> dict:
    return seal({**_header(MODEL_FORMAT), "factory": factory, "spec": spec_of(flow), "shape": list(shape),
                 "state_dict": {k: v.detach().cpu().clone() for k, v in flow.state_dict().items()},
                 "data": data_info, "config": config, **(extra or {})})


def model_path(path: str | Path) -> Path:
    path = Path(path)
    return path / "model.pt" if path.is_dir() else path


def load_model(path: str | Path, device="cpu", *, trust_factory: str | Iterable[str] | None = None,
               allow_unverified: bool = False) -> tuple[torch.nn.Module, dict]:
    """Rebuild the flow stored in a ``model.pt`` (or a run folder holding one), in eval mode.

    Args:
        path: a ``model.pt`` file or a ``fastflow fit`` run folder.
        device: where to put the model.
        trust_factory: user factories (``"pkg.mod:fn"``) you allow the file to call. A file built
            by fastflow's registry needs none; a file naming any other factory is refused unless
            that factory is listed here (files are data: nothing they name runs on their word).
        allow_unverified: load a format-version-1 file, which carries no digest (refused otherwise).

    Raises:
        CLIError: unreadable, corrupt (digest mismatch), unverifiable, foreign or untrusted file, or
            one whose spec asks for more than its stored parameters could hold.
    """
    path = model_path(path)
    obj = _load(path, MODEL_FORMAT, allow_unverified=allow_unverified)
    flow = rebuild(obj.get("factory"), obj.get("spec"), trust_factory=trust_factory, source=path,
                   state=obj.get("state_dict"))
    load_state(flow, obj.get("state_dict"), path)
    if not isinstance(obj.get("shape"), list) or not all(isinstance(s, int) and s > 0 for s in obj["shape"]):
        raise CLIError(f"{path} holds an invalid event shape {obj.get('shape')!r}")
    if torch.device(device).type != "cpu":
        flow.to(device)
    return flow.eval(), obj


def load_state(flow: torch.nn.Module, state: dict, path: Path) -> None:
    if not isinstance(state, dict):
        raise CLIError(f"{path} holds no parameter table")
    want = {k: tuple(v.shape) for k, v in flow.state_dict().items()}
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    wrong = [k for k in want if k in state and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != want[k]]

    def few(keys):
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    if missing or extra or wrong:
        parts = ([f"{len(missing)} missing ({few(missing)})"] if missing else []) + \
                ([f"{len(extra)} unexpected ({few(extra)})"] if extra else []) + \
                ([f"{len(wrong)} of another shape ({few(wrong)})"] if wrong else [])
        raise CLIError(f"{path} holds parameters of a different model: its spec builds {len(want)} tensors, it "
                       f"stores {len(state)}: {'; '.join(parts)}")
    try:
        flow.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise CLIError(f"{path} holds parameters of a different model: {detail}") from None


def load_checkpoint(path: str | Path, expect_factory: str, expect_spec: dict) -> dict:
    path = Path(path)
    obj = _load(path, CHECKPOINT_FORMAT, how_to_allow="pass --overwrite to start the run again")
    if obj.get("factory") != expect_factory or obj.get("spec") != expect_spec:
        raise CLIError(f"checkpoint {path} is of another model ({obj.get('factory')} {obj.get('spec')}), "
                       f"this run builds {expect_factory} {expect_spec}; use another --out or --overwrite")
    return obj


def checkpoint_payload(**fields: Any) -> dict:
    return seal({**_header(CHECKPOINT_FORMAT), **fields})
