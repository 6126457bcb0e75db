"""The polynomial laws in layers: what their conditioners start from."""

from __future__ import annotations

import torch

import fastflow.nn as fnn


def _sos_params(layer, x):
    if isinstance(layer, fnn.MaskedAutoregressive):
        return layer.made(x, None)
    return layer._params(x, None)


def test_sos_polynomials_do_not_stay_identical():
    # The K polynomials enter the law symmetrically: from an all-zero conditioner output layer
    # they would get equal gradients forever (K collapsing to 1). Their conditioners start at
    # the default initialisation, and a few steps later the polynomials differ.
    torch.manual_seed(0)
    for layer in (fnn.MaskedAutoregressive(3, fnn.SOSLaw(2, 3), 16, 2),
                  fnn.Coupling(fnn.alternating_mask(4), law=fnn.SOSLaw(2, 3), hidden_features=16)):
        d = 3 if isinstance(layer, fnn.MaskedAutoregressive) else 4
        x = torch.randn(64, d)
        opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
        for _ in range(3):
            y, lad = layer(x)
            loss = 0.5 * y.square().sum(1).mean() - lad.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        p = _sos_params(layer, x).reshape(64, -1, 9)[..., :-1].reshape(64, -1, 2, 4)  # K=2, L+1=4, + shift
        assert not torch.allclose(p[..., 0, :], p[..., 1, :])


def test_the_other_laws_start_as_their_zero_parameter_map():
    torch.manual_seed(0)
    x = torch.randn(8, 4, dtype=torch.float64)
    layer = fnn.MaskedAutoregressive(4, fnn.BernsteinLaw(6, 5.0), 16, 2).double()
    y, lad = layer(x)
    torch.testing.assert_close(y, x, rtol=0, atol=1e-12)  # Bernstein: equal steps, the identity
    torch.testing.assert_close(lad, torch.zeros(8, dtype=torch.float64), rtol=0, atol=1e-12)
