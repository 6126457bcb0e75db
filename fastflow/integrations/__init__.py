"""Accelerate the models people already have: ``fastflow.integrations.nflows``, ``.zuko``,
``.normflows``, ``.glasflow`` (glasflow's vendored nflows) and ``.sbi`` (every sbi density
estimator: the nflows and zuko integrations under one handle).

Each submodule has ``accelerate(backend=None)``, which routes that library's rational-quadratic
spline evaluation to fastflow's fused spline op (``fastflow::rq_spline`` with the library's own
parameterisation as its prologue), for models built before or after the call::

    import fastflow.integrations.zuko as ffz
    ffz.accelerate()            # global switch; returns a handle
    with ffz.accelerate():      # or scoped: restored on exit
        ...

``accelerate()`` is idempotent and reference-counted (each handle's ``close()`` releases its
share; the originals come back when the last one is released, or at once with ``restore()``),
guarded by a lock, and restores the patched attributes exactly (the same objects). The backend
belongs to the handle: the innermost handle still open decides it, and closing it gives the
choice back to the one before. ``accelerate(backend=...)`` checks the name at once: an unknown
one raises ``UnknownBackendError``, one that cannot run here (no CUDA device for ``"cuda"``, no
spline kernels) ``BackendUnavailableError`` with the reason. Calls the fused op declines run the
peer's own code. On a peer
version that was not tested it warns and patches nothing (``force=True`` patches anyway).
Importing a submodule does not import the peer.
"""

__all__ = ["nflows", "zuko", "normflows", "glasflow", "sbi"]
