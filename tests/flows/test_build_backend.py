"""``build(..., backend=name)`` refuses a backend that cannot run in this process at once, with
the registry's reason (it used to fail only at the flow's first call)."""

import pytest
import torch

from fastflow.backends import BACKENDS, BackendUnavailableError, UnknownBackendError
from fastflow.flows import build


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_unavailable_backend_refused_when_built(name):
    reason = BACKENDS[name].probe()
    if reason is None:
        pytest.skip(f"backend {name!r} can run here")
    with pytest.raises(BackendUnavailableError, match="cannot run here") as info:
        build("nsf", (4,), num_layers=1, hidden_features=8, backend=name)
    assert reason in str(info.value) and "build('nsf'" in str(info.value)


@pytest.mark.parametrize("name", ["reference", " Reference ", "numba"])
def test_available_backend_builds_and_runs(name):
    if BACKENDS[name.strip().lower()].probe():
        pytest.skip(f"backend {name!r} cannot run here")
    flow = build("nsf", (4,), num_layers=1, hidden_features=8, backend=name)
    with torch.no_grad():
        assert torch.isfinite(flow.log_prob(torch.randn(3, 4))).all()


def test_unknown_or_non_string_backend():
    with pytest.raises(UnknownBackendError):
        build("nsf", (4,), backend="gpu")
    with pytest.raises(TypeError):
        build("nsf", (4,), backend=1)
