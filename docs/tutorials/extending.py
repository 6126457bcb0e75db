"""
# Writing a new law or backend

The layers of `fastflow.nn` separate *structure* (which elements are transformed, by which
conditioner: `Coupling`, `MaskedAutoregressive`) from the *law*, the elementwise bijection applied
to each transformed element (`AffineLaw`, `AdditiveLaw`, `SplineLaw`). A new law is a small class
and works in every structure at once. Backends are the kernel families that run the fused ops.
"""

# %%
# ## The law protocol
#
# A law (see `fastflow.nn.laws`) has `params_per_element` (`P`) and is called as
# `law(x, params, inverse) -> (y, logabsdet)`, with `x` of shape `(B, ...)`, `params` of shape
# `(B, ..., P)` (raw conditioner outputs, possibly a strided view), `y` of `x`'s shape and
# `logabsdet` of shape `(B,)`, summed over the non-batch dimensions. Subclass `Law` for the
# defaults (`bind(hidden_features)` is called once with the conditioner's width).
#
# Here, the sinh-arcsinh law (Jones & Pewsey, 2009), `y = sinh(d * asinh(x) - e)` with
# `d = softplus(a) + 1e-3 > 0`, which can skew and fatten the tails of each element, written in
# plain torch (no kernel needed when torch ops are fast enough).
import os

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import fastflow.data
from fastflow.backends import backend_status, resolve_backend
from fastflow.flows import Flow, StandardNormal, ml_step
from fastflow.nn import Coupling, Law, MaskedAutoregressive, ReversePermutation, alternating_mask
from fastflow.testing import jacobian_logabsdet

QUICK = os.environ.get("FASTFLOW_DOCS_QUICK") == "1"
STEPS = 60 if QUICK else 2000
torch.manual_seed(0)


class SinhArcsinhLaw(Law):
    params_per_element = 2  # e (skew) and a (raw tail weight) per element

    def __call__(self, x, params, inverse):
        e, a = params[..., 0], params[..., 1]
        d = F.softplus(a + 0.5413) + 1e-3  # softplus(0.5413) ~ 1: a zero conditioner is near the identity
        if inverse:
            u = (torch.asinh(x) + e) / d
            y = torch.sinh(u)
            # log |dy/dx| of the inverse map = -(log |dx/dy| of the forward map at y)
            lad = -(torch.log(d) + torch.log(torch.cosh(d * torch.asinh(y) - e)) - 0.5 * torch.log1p(y * y))
        else:
            u = d * torch.asinh(x) - e
            y = torch.sinh(u)
            lad = torch.log(d) + torch.log(torch.cosh(u)) - 0.5 * torch.log1p(x * x)
        return y, lad.flatten(1).sum(1)


# %%
# ## Check it against the oracle
#
# `fastflow.testing.jacobian_logabsdet` is the naive `slogdet` of the autograd Jacobian; a
# layer's log-determinant must match it, and `inverse` must undo the forward map.
layer = Coupling(alternating_mask(4, 0), law=SinhArcsinhLaw(), hidden_features=16).double()
with torch.no_grad():  # a random conditioner output, so that the law is far from the identity
    for p in layer.parameters():
        p.normal_(0, 0.3)
x = torch.randn(8, 4, dtype=torch.float64)
y, lad = layer(x)
x_back, lad_inv = layer.inverse(y)
print("round trip error:", (x_back - x).abs().max().item())
print("log-det error vs autograd Jacobian:", (lad - jacobian_logabsdet(lambda v: layer(v)[0], x)).abs().max().item())
print("inverse log-det + forward log-det:", (lad + lad_inv).abs().max().item())
made = MaskedAutoregressive(4, SinhArcsinhLaw(), hidden_features=16)  # the same law, autoregressive
print(made(torch.randn(3, 4))[1].shape)

# %%
# ## Train a flow made of it
#
# `Flow(transform, base)` composes any list of transforms with a base distribution.
layers = []
for k in range(6):
    layers += [Coupling(alternating_mask(2, k % 2), law=SinhArcsinhLaw(), hidden_features=64), ReversePermutation(2)]
flow = Flow(layers, StandardNormal((2,)))
data = fastflow.data.load("moons", split="train")
opt = torch.optim.Adam(flow.parameters(), lr=2e-3)
for step in range(STEPS):
    loss = ml_step(flow, opt, data[torch.randint(len(data), (256,))], max_grad_norm=5.0)
with torch.no_grad():
    print(f"test log-likelihood {flow.log_prob(fastflow.data.load('moons', split='test')).mean().item():.3f} nats")
    n, lim = 150, 3.0
    g = torch.linspace(-lim, lim, n)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    p = flow.log_prob(grid).exp().reshape(n, n)
fig, ax = plt.subplots(figsize=(4, 4))
ax.imshow(p.numpy(), origin="lower", extent=[-lim, lim, -lim, lim], cmap="viridis")
ax.set_title("sinh-arcsinh coupling flow on moons")
ax.set_xticks([])
ax.set_yticks([])

# %%
# To make a law fast, give it a fused op and call that op in `__call__`, as `AffineLaw` calls
# `fastflow.ops.affine_coupling` (ARCHITECTURE.md, "How to add an op": the reference maths in
# `kernels/reference/`, a kernel per backend, and one `define(...)` in the op module, which
# generates the `torch.library` custom ops, their backward and every derivative mode; the
# conformance suite then tests it on every backend against the reference).
#
# ## Backends
#
# A backend is a kernel family with the devices and dtypes it takes and a probe that says why it
# cannot run here, each declared in its own kernel folder. `backend_status()` reports them;
# `resolve_backend(op, tensor)` is the choice `backend=None` makes for a tensor (the first of
# `triton`, `cuda`, `numba`, `torch`, `reference` that can run it, after the small-input routes).
for name, status in backend_status()["backends"].items():
    print(f"{name:10s} {'available  ' if status['available'] else 'unavailable'}  "
          f"{status['reason'] or status['description']}")
print("rq_spline on a (4096, 16) float32 CPU tensor ->", resolve_backend("rq_spline", torch.randn(4096, 16)))

# %%
# Adding one (ARCHITECTURE.md, "How to add a backend") is one kernel folder and one registry line:
#
# 1. `mypkg/__init__.py` declares the backend's facts: `BACKEND = Backend(name, devices, dtypes,
#    probe, description, ops={"rq_spline": "spline"}, ...)` (`fastflow/kernels/_facts.py`); the
#    probe returns the reason it cannot run here, or None; keep this module light, the kernels
#    are imported on first use;
# 2. `mypkg/spline.py` implements the launchers of each op it runs (the interface documented at
#    the bottom of `fastflow/kernels/reference/spline.py`);
# 3. `fastflow.backends.add_backend("mypkg")` registers it (last in the default order unless
#    `before=`); inside fastflow, its name in `_ORDER` in `backends.py`.
#
# The conformance suite then runs on it unchanged (`tests/ops/test_extra_backend.py` does this
# with a test-only backend that wraps the reference).
#
# ```python
# from fastflow.backends import add_backend
#
# add_backend("mypkg", before="reference")
# ```
