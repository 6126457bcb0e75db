"""
# Density estimation on 2-D toys

Fit three flow families of `fastflow.flows.build` (a neural spline flow, RealNVP and MAF) to four
of the embedded 2-D toy sets by maximum likelihood, and draw the fitted densities side by side
with the data. Everything is in the public API: `fastflow.data.load`, `fastflow.flows.build`,
`fastflow.flows.ml_step` and `Flow.log_prob`.
"""

# %%
# ## Settings
#
# `FASTFLOW_DOCS_QUICK=1` (set in CI) trains for a few steps only, so that the documentation
# builds in a few minutes on two CPU cores; the densities are then rough. The full settings are
# what you get from `bash scripts/docs.sh` or `python docs/tutorials/density_2d.py`.
# In quick mode the ops run on the pure-PyTorch `reference` backend (the `FASTFLOW_BACKEND`
# environment variable forces one for the whole process), which needs no compilation; otherwise
# each op picks the fastest backend that runs here: Numba on a CPU, Triton or CUDA on a GPU.
import os
import time

import matplotlib.pyplot as plt
import torch

import fastflow.data
from fastflow.flows import build, ml_step

QUICK = os.environ.get("FASTFLOW_DOCS_QUICK") == "1"
STEPS = 40 if QUICK else 2000
if QUICK:
    os.environ.setdefault("FASTFLOW_BACKEND", "reference")
TOYS = ["moons", "8gaussians", "checkerboard", "spirals"]
FAMILIES = {
    "nsf": dict(num_layers=4, hidden_features=64, num_bins=8, tail_bound=5.0),
    "realnvp": dict(num_layers=8, hidden_features=64),
    "maf": dict(num_layers=5, hidden_features=64),
}
torch.manual_seed(0)
print(f"{STEPS} steps per fit, FASTFLOW_BACKEND={os.environ.get('FASTFLOW_BACKEND')}")

# %%
# ## The data
#
# `fastflow.data.load(name, split)` returns a float32 tensor of shape `(N, 2)` for the toys
# (10 000 points from a fixed seed, split 80/10/10 into train/val/test).
fig, axes = plt.subplots(1, len(TOYS), figsize=(3 * len(TOYS), 3))
for ax, name in zip(axes, TOYS):
    x = fastflow.data.load(name, split="train")
    ax.scatter(x[:2000, 0], x[:2000, 1], s=1, alpha=0.5)
    ax.set_title(name)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
print(x.shape, x.dtype)

# %%
# ## Fitting
#
# One maximum-likelihood step is `ml_step(flow, optimizer, batch)`: the mean negative
# log-likelihood of the batch, its gradient and the optimizer step. The test log-likelihood is
# in nats per point.


def fit(family, name):
    data = fastflow.data.load(name, split="train")
    flow = build(family, (2,), **FAMILIES[family])
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
    for _ in range(STEPS):
        ml_step(flow, opt, data[torch.randint(len(data), (256,))], max_grad_norm=5.0)
        sched.step()
    flow.eval()
    with torch.no_grad():
        test_ll = flow.log_prob(fastflow.data.load(name, split="test")).mean().item()
    return flow, test_ll


flows, table = {}, []
for family in FAMILIES:
    for name in TOYS:
        t0 = time.perf_counter()
        flows[family, name], ll = fit(family, name)
        table.append((family, name, ll, time.perf_counter() - t0))
print(f"{'family':8s} {'data':13s} {'test log-lik':>12s} {'seconds':>8s}")
for family, name, ll, s in table:
    print(f"{family:8s} {name:13s} {ll:12.3f} {s:8.1f}")

# %%
# ## The gallery of fitted densities
#
# `flow.log_prob` of a grid of points gives the density; each row is a family, each column a toy
# (the first row is the data).
n = 80 if QUICK else 200
lim = 4.0
g = torch.linspace(-lim, lim, n)
grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
fig, axes = plt.subplots(1 + len(FAMILIES), len(TOYS), figsize=(2.6 * len(TOYS), 2.6 * (1 + len(FAMILIES))))
for j, name in enumerate(TOYS):
    x = fastflow.data.load(name, split="test")
    axes[0, j].hist2d(x[:, 0].numpy(), x[:, 1].numpy(), bins=n // 2, range=[[-lim, lim]] * 2, cmap="viridis")
    axes[0, j].set_title(name)
    for i, family in enumerate(FAMILIES, start=1):
        with torch.no_grad():
            p = flows[family, name].log_prob(grid).exp().reshape(n, n)
        axes[i, j].imshow(p.numpy(), origin="lower", extent=[-lim, lim, -lim, lim], cmap="viridis")
        if j == 0:
            axes[i, j].set_ylabel(family)
axes[0, 0].set_ylabel("data")
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
