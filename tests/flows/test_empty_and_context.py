"""Every registered model: empty batches give empty results (no reshape errors), and a context
given to an unconditional model (or missing from a conditional one) is an error, not ignored."""

from __future__ import annotations

import pytest
import torch

from fastflow.flows import build, names

IMAGE = {"glow", "realnvp-image"}
TINY = {
    "nsf": dict(num_layers=1, hidden_features=8, num_blocks=1, num_bins=4),
    "nsf-ar": dict(num_layers=1, hidden_features=8, num_blocks=1, num_bins=4),
    "bpf": dict(num_layers=1, hidden_features=8, num_blocks=1, degree=4),
    "sospf": dict(num_layers=2, hidden_features=8, num_blocks=1, degree=2, polynomials=2),
    "ncsf": dict(num_layers=2, hidden_features=8, num_blocks=1, num_bins=4),
    "glow": dict(levels=1, depth=1, hidden_channels=4),
    "realnvp-image": dict(levels=1, hidden_channels=4, num_blocks=1),
}


def _model(name):
    shape = (1, 4, 4) if name in IMAGE else (3,)
    return build(name, shape, **TINY.get(name, {})), shape


@pytest.mark.parametrize("name", names())
def test_empty_batches(name):
    flow, shape = _model(name)
    lp = flow.log_prob(torch.zeros(0, *shape))
    assert lp.shape == (0,)
    lp.sum().backward()  # an empty loss still backpropagates (to zero gradients)
    x = flow.sample(0)
    assert x.shape == (0, *shape)
    x, lp = flow.sample_and_log_prob(0)
    assert x.shape == (0, *shape) and lp.shape == (0,)
    with pytest.raises(ValueError, match="non-negative integer"):
        flow.sample(-1)


@pytest.mark.parametrize("name", names())
def test_context_for_an_unconditional_model_is_an_error(name):
    flow, shape = _model(name)
    with pytest.raises(ValueError, match="unconditional"):
        flow.log_prob(torch.zeros(2, *shape), context=torch.zeros(2, 5))
