import os

import pytest
import torch

# A backend package to register before collection (the test-only one of
# tests/ops/test_extra_backend.py): the conformance suite then parametrises over it too.
if os.environ.get("FASTFLOW_TEST_EXTRA_BACKEND"):
    from fastflow.backends import add_backend

    add_backend(os.environ["FASTFLOW_TEST_EXTRA_BACKEND"])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch intra-op thread for the test: with tiny tensors the threads only add
    synchronisation (10x slower on a busy 2-core box). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    """A test parametrised over the backends present here has no cases when none is (e.g. GPU
    backends on a CPU machine): deselect it rather than report a skip that looks like a pass."""
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("skip")
        reason = str(marker.kwargs.get("reason", marker.args)) if marker else ""
        (drop if "got empty parameter set" in reason else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
