"""
# Sampling an unnormalised target by reverse KL

Given only an unnormalised log-density `log p~(x)` (no samples), fit a flow `q` by minimising the
reverse KL divergence `E_q[log q(x) - log p~(x)]` with reparameterised samples of the flow
(`Flow.sample_and_log_prob` is differentiable in the flow's parameters). This is variational
inference, as in Rezende & Mohamed (2015). The estimate of `log Z` comes from importance
sampling with the fitted flow as proposal.
"""

# %%
import math
import os

import matplotlib.pyplot as plt
import torch

from fastflow.flows import build, reverse_kl_step

QUICK = os.environ.get("FASTFLOW_DOCS_QUICK") == "1"
STEPS = 80 if QUICK else 3000
if QUICK:
    os.environ.setdefault("FASTFLOW_BACKEND", "reference")
torch.manual_seed(0)


def target_log_prob(x):
    """A banana-shaped density times a two-mode ring, unnormalised: (B, 2) -> (B,)."""
    x1, x2 = x[..., 0], x[..., 1]
    banana = -0.5 * (x1 / 2.0) ** 2 - 0.5 * ((x2 - 0.25 * x1**2 + 1.0) / 0.5) ** 2
    modes = torch.logsumexp(torch.stack([-2.0 * (x1 - 2.0) ** 2, -2.0 * (x1 + 2.0) ** 2]), 0)
    return banana + 0.5 * modes


# %%
# ## Fitting
#
# `reverse_kl_step(flow, opt, target_log_prob, n)` draws `n` samples, evaluates the loss and
# steps the optimiser. Annealing `beta` from small to 1 (a tempered target `p~^beta`) helps the
# flow find both modes before it commits to one.
flow = build("nsf", (2,), num_layers=4, hidden_features=64, tail_bound=6.0)
opt = torch.optim.Adam(flow.parameters(), lr=2e-3)
losses = []
for step in range(STEPS):
    beta = min(1.0, 0.2 + step / (0.5 * STEPS))
    losses.append(reverse_kl_step(flow, opt, target_log_prob, 256, beta=beta, max_grad_norm=5.0))
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(losses)
ax.set_xlabel("step")
ax.set_ylabel("reverse KL + log Z (nats)")

# %%
# ## Samples against the target, and log Z
#
# With the flow as an importance-sampling proposal, `log Z ~ log mean exp(log p~(x) - log q(x))`
# for `x ~ q`; the effective sample size says how good a proposal it is.
flow.eval()
with torch.no_grad():
    xs, log_q = flow.sample_and_log_prob(20000)
    log_w = target_log_prob(xs) - log_q
    log_z = torch.logsumexp(log_w, 0) - math.log(len(log_w))
    ess = torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)) / len(log_w)
n, lim = 200, 6.0
g = torch.linspace(-lim, lim, n)
grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
exact_log_z = torch.logsumexp(target_log_prob(grid), 0) + 2 * math.log(2 * lim / (n - 1))
print(f"log Z: importance sampling {log_z.item():.3f}, grid quadrature {exact_log_z.item():.3f}; "
      f"ESS {100 * ess.item():.1f} %")
fig, axes = plt.subplots(1, 2, figsize=(8, 4))
axes[0].imshow(target_log_prob(grid).exp().reshape(n, n).numpy(), origin="lower",
               extent=[-lim, lim, -lim, lim], cmap="viridis")
axes[0].set_title("target p~(x)")
axes[1].hist2d(xs[:, 0].numpy(), xs[:, 1].numpy(), bins=100, range=[[-lim, lim]] * 2, cmap="viridis")
axes[1].set_title("samples of the fitted flow")
for ax in axes:
    ax.set_xticks([])
    ax.set_yticks([])
