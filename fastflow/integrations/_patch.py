"""The reversible, reference-counted patching shared by the integrations."""

from __future__ import annotations

import threading
import warnings
from importlib import metadata
from typing import Callable

_MISSING = object()
OP = "rq_spline"


class UntestedVersionWarning(UserWarning):
    """``accelerate()`` found a peer version it was not tested with and patched nothing."""


class Handle:
    """What ``accelerate()`` returns: ``close()`` (or leaving the ``with`` block) releases it.

    Attributes:
        active: whether this handle holds a share of the patch (False after ``close()``, after
            ``restore()`` and when nothing was patched, e.g. on an untested peer version).
        backend: the backend this handle asked for (None: the one fastflow picks per call). The
            most recently opened handle still open decides the backend; closing it gives the
            choice back to the one opened before it.
    """

    def __init__(self, integration: "Integration", active: bool, backend: str | None = None,
                 missing: frozenset = frozenset()):
        self._integration = integration
        self.active = active
        self.backend = backend
        self._missing = missing  # the optional parameterisations ``backend`` has no kernels for
        self.children: list[Handle] = []  # the handles of the integrations this one delegates to

    def close(self) -> None:
        """Release this handle's share (and its delegates' shares); the originals return when no
        handle holds one. Idempotent."""
        if self.active:
            self._integration._release(self)

    restore = close

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<fastflow.integrations.{self._integration.peer} handle active={self.active} "
                f"backend={self.backend!r}>")


class Integration:
    """One peer library's patch: ``targets()`` lists ``(owner, attribute, replacement)``.

    ``required`` are the spline parameterisations every patched call needs (a forced backend
    without kernels for one is refused by ``accelerate()``); ``optional`` those only some calls
    need (a forced backend without them sends those calls to the peer's own code: see
    ``declines``). ``delegates()`` lists the other integrations whose patches this one's
    handles also hold (a peer built on other peers: sbi on nflows and zuko, glasflow in its
    ``USE_NFLOWS`` mode on nflows): each handle opens one handle of each, with its backend,
    and closing or restoring it closes those. ``before_undo()`` runs when the last share is
    released, after the integration reads as inactive and before the originals come back
    (zuko: the knots of the transforms built while accelerated are computed there)."""

    def __init__(self, peer: str, distribution: str, tested: Callable[[str], bool], tested_text: str,
                 targets: Callable[[], list], required: tuple[str, ...] = ("nflows",),
                 optional: tuple[str, ...] = (), delegates: Callable[[], list] = list,
                 before_undo: Callable[[], None] | None = None):
        self.peer = peer
        self.distribution = distribution
        self.tested = tested
        self.tested_text = tested_text
        self.targets = targets
        self.required = required
        self.optional = optional
        self.delegates = delegates
        self.before_undo = before_undo
        # read by the patched functions on every call: kept in step with the open handles
        self.backend: str | None = None
        self._missing: frozenset = frozenset()
        self._lock = threading.RLock()
        self._handles: list[Handle] = []  # open handles, in the order they were opened
        self._saved: list = []  # (owner, name, what owner.__dict__ held or _MISSING)

    def version(self) -> str | None:
        try:
            return metadata.version(self.distribution)
        except metadata.PackageNotFoundError:
            return None

    def check_backend(self, backend) -> tuple[str | None, frozenset]:
        """``backend`` normalised, and the optional parameterisations it has no kernels for.

        Raises at once what the first patched call would raise: ``TypeError`` for a non-string,
        ``UnknownBackendError`` for a name that is not a fastflow backend,
        ``BackendUnavailableError`` (with the reason) for a backend that cannot run the spline
        op here (its requirements missing, e.g. no CUDA device) or has no kernels for the
        parameterisation this peer's splines need."""
        from fastflow.backends import BACKENDS, BackendUnavailableError, check_backend_name

        where = f"fastflow.integrations.{self.peer}.accelerate(backend=...)"
        name = check_backend_name(backend, where)
        if name is None:
            return None, frozenset()
        import fastflow.ops.rq_spline  # noqa: F401  (declares the spline kernels of every backend)

        b = BACKENDS[name]
        have: tuple = ()
        reason = b.probe() if OP in b.ops else f"backend {name!r} has no kernel for {OP!r}"
        if reason is None:
            have = b.parameterizations
            lacking = [p for p in self.required if p not in have]
            if lacking:
                reason = (f"backend {name!r} has no kernels for the {lacking[0]!r} spline parameterization "
                          f"{self.peer} needs")
        if reason:
            raise BackendUnavailableError(f"{where}: backend {name!r} cannot run here: {reason}")
        return name, frozenset(p for p in self.optional if p not in have)

    def accelerate(self, *, backend: str | None = None, force: bool = False) -> Handle:
        version = self.version()
        if version is None:
            raise ImportError(f"fastflow.integrations.{self.peer}: {self.distribution} is not installed "
                              f"(pip install 'fastflow[{self.peer}]')")
        name, missing = self.check_backend(backend)
        if not self.tested(version):
            msg = (f"fastflow.integrations.{self.peer}: {self.distribution} {version} is not a version fastflow "
                   f"was tested with ({self.tested_text})")
            if not force:
                warnings.warn(msg + "; nothing was patched (accelerate(force=True) patches anyway)",
                              UntestedVersionWarning, stacklevel=3)
                return Handle(self, False, name, missing)
            warnings.warn(msg + "; patching anyway (force=True)", UntestedVersionWarning, stacklevel=3)
        children: list[Handle] = []
        try:
            for other in self.delegates():
                children.append(other.accelerate(backend=backend, force=force))
        except BaseException:
            for h in children:
                h.close()
            raise
        try:
            handle = self._open(name, missing)
        except BaseException:
            for h in children:
                h.close()
            raise
        handle.children = children
        return handle

    def _open(self, name, missing) -> Handle:
        with self._lock:
            if not self._handles:
                saved = []
                try:
                    for owner, attr, new in self.targets():
                        saved.append((owner, attr, owner.__dict__.get(attr, _MISSING)))
                        setattr(owner, attr, new)
                except BaseException:
                    self._undo(saved)
                    raise
                self._saved = saved
            handle = Handle(self, True, name, missing)
            self._handles.append(handle)
            self._sync()
        return handle

    def _sync(self) -> None:
        # the backend of the most recently opened handle still open (None when none is)
        top = self._handles[-1] if self._handles else None
        self._missing = top._missing if top is not None else frozenset()
        self.backend = top.backend if top is not None else None

    def declines(self, parameterization: str) -> bool:
        """Whether the backend in force has no kernels for this (optional) parameterisation."""
        return parameterization in self._missing

    def _release(self, handle: Handle) -> None:
        with self._lock:
            if not handle.active:
                return
            handle.active = False
            self._handles = [h for h in self._handles if h is not handle]
            if not self._handles:
                self._finish()
            self._sync()
        for h in handle.children:
            h.close()

    def restore(self) -> None:
        """Turn the acceleration off now, whatever handles are still open (they become inactive),
        and release the delegates' handles they hold."""
        with self._lock:
            handles = self._handles
            for h in handles:
                h.active = False
            self._handles = []
            self._finish()
            self._sync()
        for h in handles:
            for c in h.children:
                c.close()

    def _finish(self) -> None:
        # called under the lock once no handle is open: the originals back
        try:
            if self._saved and self.before_undo is not None:
                self.before_undo()
        finally:
            self._undo(self._saved)
            self._saved = []

    @staticmethod
    def _undo(saved) -> None:
        for owner, name, old in reversed(saved):
            if old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)

    def is_active(self) -> bool:
        return bool(self._handles)

    def public_functions(self, module: str, summary: str, *, force_more: str = "", closes: str = "turns it off",
                         restore_doc: str | None = None):
        """The peer module's ``accelerate``, ``restore`` and ``is_accelerated``, written once:
        ``summary`` heads ``accelerate``'s docstring, ``force_more`` adds to its ``force``
        argument, ``closes`` says what closing the handle does, ``restore_doc`` replaces
        ``restore``'s docstring."""

        def accelerate(*, backend: str | None = None, force: bool = False) -> Handle:
            return self.accelerate(backend=backend, force=force)

        def restore() -> None:
            self.restore()

        def is_accelerated() -> bool:
            return self.is_active()

        accelerate.__doc__ = f"""{summary}

    Args:
        backend: fastflow backend (None: the fastest available).
        force: patch even on a version other than {self.tested_text} (with a warning){force_more}.

    Returns:
        A handle: ``handle.close()`` (or the end of a ``with accelerate():`` block) {closes}.
    """
        restore.__doc__ = restore_doc or f"Turn the acceleration off now ({self.peer}'s originals back, the same ones)."
        is_accelerated.__doc__ = f"Whether a handle of this integration is open ({self.peer}'s calls reach the op)."
        for fn in (accelerate, restore, is_accelerated):
            fn.__module__, fn.__qualname__ = module, fn.__name__
        return accelerate, restore, is_accelerated


def float_tensors(*ts) -> bool:
    """Whether fastflow's op takes these as they are: float32/float64, one dtype and device."""
    import torch

    t0 = ts[0]
    return all(isinstance(t, torch.Tensor) and t.dtype == t0.dtype and t.device == t0.device for t in ts) and \
        t0.dtype in (torch.float32, torch.float64)


def aligned(v, params, event: int):
    """``v`` and ``params`` (each with ``event`` trailing parameter dims) in one float dtype and
    device, ``v`` and the parameters' leading dims broadcast to one shape (views): ``(v, params)``,
    or None where the peer's own code must run (not tensors of one float dtype and device, an
    empty ``v``, shapes that do not broadcast: the peer raises its own error)."""
    import torch

    if not (isinstance(v, torch.Tensor) and float_tensors(*params) and v.numel() > 0
            and all(p.dim() > event for p in params) and v.device == params[0].device):
        return None
    if v.dtype != params[0].dtype:
        dtype = torch.promote_types(v.dtype, params[0].dtype)
        if dtype not in (torch.float32, torch.float64):
            return None
        v, params = v.to(dtype), [p.to(dtype) for p in params]
    leads = [p.shape[:p.dim() - event] for p in params]
    if any(lead != v.shape for lead in leads):
        try:
            shape = torch.broadcast_shapes(v.shape, *leads)
        except RuntimeError:
            return None
        v = v if v.shape == shape else v.expand(shape)
        params = [p if lead == shape else p.expand(*shape, *p.shape[p.dim() - event:])
                  for p, lead in zip(params, leads)]
    return v, tuple(params)
