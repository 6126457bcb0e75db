"""
# A conditional flow

A flow with `context_features=k` models `p(x | c)`: the context `c`, a `(B, k)` tensor, is an
extra input of every conditioner. Here one neural spline flow learns three 2-D densities at
once, the context being the one-hot label of the toy set a point comes from.
"""

# %%
import os

import matplotlib.pyplot as plt
import torch

import fastflow.data
from fastflow.flows import build, ml_step

QUICK = os.environ.get("FASTFLOW_DOCS_QUICK") == "1"
STEPS = 60 if QUICK else 3000
if QUICK:
    os.environ.setdefault("FASTFLOW_BACKEND", "reference")
torch.manual_seed(0)

TOYS = ["moons", "circles", "pinwheel"]
xs = [fastflow.data.load(name, split="train") for name in TOYS]
x = torch.cat(xs)                                                      # (N, 2)
labels = torch.cat([torch.full((len(v),), i) for i, v in enumerate(xs)])
context = torch.nn.functional.one_hot(labels, len(TOYS)).float()      # (N, 3)
print(x.shape, context.shape)

# %%
# ## Training
#
# `log_prob(x, context)` and `ml_step(flow, opt, x, context)` take the context row by row.
flow = build("nsf", (2,), context_features=len(TOYS), num_layers=4, hidden_features=64, tail_bound=4.0)
opt = torch.optim.Adam(flow.parameters(), lr=2e-3)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
for step in range(STEPS):
    i = torch.randint(len(x), (512,))
    loss = ml_step(flow, opt, x[i], context[i], max_grad_norm=5.0)
    sched.step()
print(f"final training NLL {loss:.3f} nats")

# %%
# ## One density per context
#
# The same flow evaluated on a grid under each context, and `sample(n, context)` with a context
# vector `(k,)` (all `n` samples under it). With a batch of contexts `(B, k)`, `sample` returns
# `(B, n, 2)`.
flow.eval()
n, lim = (80 if QUICK else 200), 4.0
g = torch.linspace(-lim, lim, n)
grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
fig, axes = plt.subplots(2, len(TOYS), figsize=(3 * len(TOYS), 6))
with torch.no_grad():
    for j, name in enumerate(TOYS):
        c = torch.eye(len(TOYS))[j]
        p = flow.log_prob(grid, c.expand(len(grid), -1)).exp().reshape(n, n)
        axes[0, j].imshow(p.numpy(), origin="lower", extent=[-lim, lim, -lim, lim], cmap="viridis")
        axes[0, j].set_title(f"p(x | {name})")
        s = flow.sample(2000, c)
        axes[1, j].scatter(s[:, 0], s[:, 1], s=1, alpha=0.5)
        axes[1, j].set_xlim(-lim, lim)
        axes[1, j].set_ylim(-lim, lim)
        axes[1, j].set_title(f"samples | {name}")
    print("batch of contexts:", tuple(flow.sample(5, torch.eye(len(TOYS))).shape))
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal")
