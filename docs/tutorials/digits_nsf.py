"""
# A neural spline flow on digits

The 8x8 grey-level digits (64 dimensions, dequantised to `[0, 1)`) with a coupling neural spline
flow (Durkan et al., 2019): `build("nsf", (64,))`, trained by maximum likelihood; then the test
log-likelihood on the usual integer scale and samples drawn with `Flow.sample`.
"""

# %%
import os

import matplotlib.pyplot as plt
import torch

import fastflow.data
from fastflow.flows import build, ml_step

QUICK = os.environ.get("FASTFLOW_DOCS_QUICK") == "1"
STEPS = 30 if QUICK else 3000
if QUICK:  # no kernel compilation for a 30-step run; unset, the fastest backend here is used
    os.environ.setdefault("FASTFLOW_BACKEND", "reference")
torch.manual_seed(0)

train = fastflow.data.load("digits", split="train")   # (1438, 64) float32 in [0, 1)
test = fastflow.data.load("digits", split="test")
print(train.shape, train.dtype, float(train.min()), float(train.max()))

# %%
# ## The model
#
# The spline's tail bound covers the data once it is centred: `tail_bound=3.0` on `x - 0.5`
# scaled by 4, a fixed affine map whose log-determinant we add back (`64 * log 4`).
scale = 4.0
flow = build("nsf", (64,), num_layers=5, hidden_features=128, num_blocks=2, num_bins=8, tail_bound=3.0)
print(sum(p.numel() for p in flow.parameters()), "parameters")


def log_prob(x):
    return flow.log_prob((x - 0.5) * scale) + 64 * torch.log(torch.tensor(scale))


opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
losses = []
for step in range(STEPS):
    batch = train[torch.randint(len(train), (128,))]
    losses.append(ml_step(flow, opt, (batch - 0.5) * scale, max_grad_norm=5.0) - 64 * torch.log(torch.tensor(scale)))
    sched.step()

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot([float(v) for v in losses])
ax.set_xlabel("step")
ax.set_ylabel("train NLL (nats, [0,1) scale)")

# %%
# ## Test log-likelihood
#
# `fastflow.data.dequantization_log_det("digits")` (`-64 log 17`) converts the density of the
# dequantised `[0, 1)` values into one on the integer levels `0..16` (a lower bound on the
# log-probability of the discrete digits), the scale on which digits results are usually quoted.
flow.eval()
with torch.no_grad():
    ll = log_prob(test).mean().item()
ll_int = ll + fastflow.data.dequantization_log_det("digits")
print(f"test log-likelihood: {ll:.2f} nats ([0,1) scale), {ll_int:.2f} nats (integer scale), "
      f"{-ll_int / (64 * torch.log(torch.tensor(2.0)).item()):.3f} bits/dim")

# %%
# ## Samples
#
# `flow.sample(n)` draws `(n, 64)` reparameterised samples; next to them, real test digits.
with torch.no_grad():
    samples = (flow.sample(32) / scale + 0.5).clamp(0, 1)
fig, axes = plt.subplots(4, 16, figsize=(12, 3.2))
for k, ax in enumerate(axes.flat):
    img = samples[k] if k < 32 else test[k - 32]
    ax.imshow(img.reshape(8, 8).numpy(), cmap="gray_r", vmin=0, vmax=1)
    ax.axis("off")
fig.suptitle("top two rows: samples; bottom two rows: test digits")
