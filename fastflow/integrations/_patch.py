"""The reversible, reference-counted patching shared by the integrations."""

from __future__ import annotations

import threading
import warnings
from importlib import metadata
from typing import Callable

_MISSING = object()


class UntestedVersionWarning(UserWarning):
    """``accelerate()`` found a peer version it was not tested with and patched nothing."""


class Handle:
    """What ``accelerate()`` returns: ``close()`` (or leaving the ``with`` block) releases it.

    Attributes:
        active: whether this handle holds a share of the patch (False after ``close()`` and when
            nothing was patched, e.g. on an untested peer version).
    """

    def __init__(self, integration: "Integration", active: bool):
        self._integration = integration
        self.active = active

    def close(self) -> None:
        """Release this handle's share; the originals return when no handle holds one. Idempotent."""
        if self.active:
            self.active = False
            self._integration._release()

    restore = close

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<fastflow.integrations.{self._integration.peer} handle active={self.active}>"


class Integration:
    """One peer library's patch: ``targets()`` lists ``(owner, attribute, replacement)``."""

    def __init__(self, peer: str, distribution: str, tested: Callable[[str], bool], tested_text: str,
                 targets: Callable[[], list]):
        self.peer = peer
        self.distribution = distribution
        self.tested = tested
        self.tested_text = tested_text
        self.targets = targets
        self.backend = None
        self._lock = threading.RLock()
        self._count = 0
        self._saved: list = []  # (owner, name, what owner.__dict__ held or _MISSING)

    def version(self) -> str | None:
        try:
            return metadata.version(self.distribution)
        except metadata.PackageNotFoundError:
            return None

    def accelerate(self, *, backend: str | None = None, force: bool = False) -> Handle:
        version = self.version()
        if version is None:
            raise ImportError(f"fastflow.integrations.{self.peer}: {self.distribution} is not installed "
                              f"(pip install 'fastflow[{self.peer}]')")
        if not self.tested(version):
            msg = (f"fastflow.integrations.{self.peer}: {self.distribution} {version} is not a version fastflow "
                   f"was tested with ({self.tested_text})")
            if not force:
                warnings.warn(msg + "; nothing was patched (accelerate(force=True) patches anyway)",
                              UntestedVersionWarning, stacklevel=3)
                return Handle(self, False)
            warnings.warn(msg + "; patching anyway (force=True)", UntestedVersionWarning, stacklevel=3)
        with self._lock:
            self.backend = backend
            if self._count == 0:
                saved = []
                try:
                    for owner, name, new in self.targets():
                        saved.append((owner, name, owner.__dict__.get(name, _MISSING)))
                        setattr(owner, name, new)
                except BaseException:
                    self._undo(saved)
                    raise
                self._saved = saved
            self._count += 1
        return Handle(self, True)

    def _release(self) -> None:
        with self._lock:
            if self._count == 0:
                return
            self._count -= 1
            if self._count == 0:
                self._undo(self._saved)
                self._saved = []

    def restore(self) -> None:
        """Turn the acceleration off now, whatever handles are still open."""
        with self._lock:
            self._count = 0
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
        return self._count > 0


def float_tensors(*ts) -> bool:
    """Whether fastflow's op takes these as they are: float32/float64, one dtype and device."""
    import torch

    t0 = ts[0]
    return all(isinstance(t, torch.Tensor) and t.dtype == t0.dtype and t.device == t0.device for t in ts) and \
        t0.dtype in (torch.float32, torch.float64)
