"""Built-in image conditioners run in channels-last layout on the CPU: the same function as the
plain NCHW evaluation of their layers, and a contiguous NCHW output."""

from __future__ import annotations

import pytest
import torch

from fastflow.nn.conditioners import ConvNet, ConvResNet


def _nchw_convnet(net, x, context):
    h = net.c1(x)
    if context is not None:
        h = h + net.ctx(context)[:, :, None, None]
    return net.c3(net.act(net.c2(net.act(h))))


def _nchw_resnet(net, x, context):
    h = net.inp(x)
    for b in net.blocks:
        t = b.n2(b.c1(b.act(b.n1(h))))
        if context is not None:
            t = t + b.ctx(context)[:, :, None, None]
        h = h + b.c2(b.act(t))
    return net.out(net.act(h))


@pytest.mark.parametrize("cls,oracle", [(ConvNet, _nchw_convnet), (ConvResNet, _nchw_resnet)])
@pytest.mark.parametrize("ctx", [None, 3])
def test_channels_last_conditioners_match_nchw(cls, oracle, ctx):
    torch.manual_seed(0)
    net = cls(3, 4, hidden_channels=8, context_features=ctx, zero_init=False).double()
    x = torch.randn(5, 3, 6, 4, dtype=torch.float64, requires_grad=True)
    context = torch.randn(5, 3, dtype=torch.float64) if ctx else None
    out = net(x, context) if ctx else net(x)
    assert out.is_contiguous() and out.shape == (5, 4, 6, 4)
    ref = oracle(net, x, context)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    gx = torch.autograd.grad(out, x, g)[0]
    gx_ref = torch.autograd.grad(ref, x, g)[0]
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
