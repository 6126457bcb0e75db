"""Density gallery and likelihood table of the residual, continuous, planar and radial families
beside NSF, from real (short) fits on the CPU (issue 17).

For each toy (moons, 8 Gaussians, checkerboard, spirals) and for the 64-D digits, every family is
trained from the same seed with Adam: NSF, Residual Flow and planar/radial by maximum likelihood
(resflow's loss is the unbiased Russian-roulette estimate), the CNF by conditional flow matching
(no ODE solve in training). Test log-likelihoods are then exact: resflow's eval log-det is the
Jacobian slogdet (D <= 64), the CNF's comes from dopri5 (rtol = atol = 1e-5) with the exact trace,
planar/radial invert each layer numerically. Digits are standardised with the training mean and
standard deviation and the log-likelihood is reported on the original ``[0, 1)`` scale (the
standardisation's log-det added back), in nats per image.

Writes ``benchmarks/results/families_gallery_cpu.png`` (rows: families, columns: toys),
``families_likelihoods_cpu.json`` and ``families_likelihoods_cpu.md``. The committed run took 12 minutes
on a shared two-core machine under a load of 3-5 from other jobs (the 10-step smoke run: 16 s), so
the training times in the table are indicative only; the log-likelihoods do not depend on the load.

    .venv/bin/python benchmarks/gallery_families.py            # FASTFLOW_GALLERY_SMOKE=1: a 10-step check
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import fastflow.data as data
from fastflow.bench import environment, save_figure
from fastflow.flows import build, training_loss

TOYS = ("moons", "8gaussians", "checkerboard", "spirals")
SMOKE = bool(os.environ.get("FASTFLOW_GALLERY_SMOKE"))
OUT = Path(__file__).parent / "results"

# family -> (build kwargs, objective, steps on a toy, steps on digits, learning rate)
FAMILIES = {
    "nsf": (dict(num_layers=4, hidden_features=64, num_blocks=2, num_bins=8, tail_bound=5.0), "nll", 400, 300, 3e-3),
    "resflow": (dict(num_layers=4, hidden_features=64, num_hidden=2), "nll", 300, 150, 5e-3),
    "cnf": (dict(hidden_features=64, num_layers=3, rtol=1e-5, atol=1e-5), "flow-matching", 1000, 1000, 3e-3),
    "planar": (dict(num_layers=16), "nll", 300, 200, 1e-2),
    "radial": (dict(num_layers=16), "nll", 300, 200, 1e-2),
}


def fit(family, train, steps, lr, batch=256, seed=0):
    kwargs, objective, *_ = FAMILIES[family]
    torch.manual_seed(seed)
    flow = build(family, tuple(train.shape[1:]), **kwargs)
    if family == "resflow":
        with torch.no_grad():
            flow(train[torch.randperm(len(train))[:512]])  # ActNorm's data init on a random batch
    opt = torch.optim.Adam(flow.parameters(), lr)
    g = torch.Generator().manual_seed(seed)
    steps = 10 if SMOKE else steps
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(train), (batch,), generator=g)
        loss = training_loss(flow, train[idx], objective)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 10.0)
        opt.step()
    return flow.eval(), time.perf_counter() - t0, steps


@torch.no_grad()
def log_prob(flow, x, batch=2048):
    return torch.cat([flow.log_prob(x[i:i + batch]) for i in range(0, len(x), batch)])


def grid_density(flow, lim=4.5, n=120):
    g = torch.linspace(-lim, lim, n)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    lp = log_prob(flow, pts)
    p = lp.exp().reshape(n, n)
    return p.numpy(), float(p.sum() * (g[1] - g[0]) ** 2)


def main():
    torch.set_num_threads(1)  # small tensors: one thread is faster than two contended ones
    rows, densities = [], {}
    t_all = time.perf_counter()
    for toy in TOYS:
        train, test = data.load(toy, "train"), data.load(toy, "test")
        gauss = torch.distributions.MultivariateNormal(train.mean(0), torch.cov(train.T))
        rows.append({"data": toy, "family": "gaussian (full covariance, ML)",
                     "test_ll": float(gauss.log_prob(test).mean()), "train_s": 0.0, "steps": 0})
        densities[(toy, "data")] = np.histogram2d(train[:, 0].numpy(), train[:, 1].numpy(), bins=120,
                                                  range=[[-4.5, 4.5], [-4.5, 4.5]])[0]
        for family, (_, objective, steps, _, lr) in FAMILIES.items():
            flow, secs, done = fit(family, train, steps, lr)
            ll = float(log_prob(flow, test).mean())
            dens, mass = grid_density(flow)
            densities[(toy, family)] = dens
            rows.append({"data": toy, "family": family, "objective": objective, "test_ll": ll, "train_s": secs,
                         "steps": done, "mass_on_plot_grid": mass})
            print(f"{toy:13s} {family:8s} test ll {ll:8.3f}  train {secs:6.1f}s  mass on the plot grid {mass:.3f}",
                  flush=True)
    train, test = data.load("digits", "train"), data.load("digits", "test")
    mu, sd = train.mean(0), train.std(0) + 1e-2
    std_train, std_test = (train - mu) / sd, (test - mu) / sd
    log_det = -float(torch.log(sd).sum())  # d(std)/dx of the standardisation, added back
    for family, (_, objective, _, steps, lr) in FAMILIES.items():
        flow, secs, done = fit(family, std_train, steps, lr)
        ll = float(log_prob(flow, std_test).mean()) + log_det
        rows.append({"data": "digits (64-D)", "family": family, "objective": objective, "test_ll": ll,
                     "train_s": secs, "steps": done})
        print(f"{'digits':13s} {family:8s} test ll {ll:8.3f}  train {secs:6.1f}s", flush=True)
    total = time.perf_counter() - t_all
    plot(densities)
    payload = {"suite": "families_gallery", "environment": environment("cpu"), "threads": 1, "smoke": SMOKE,
               "total_s": total, "families": {k: {"kwargs": v[0], "objective": v[1]} for k, v in FAMILIES.items()},
               "results": rows}
    (OUT / "families_likelihoods_cpu.json").write_text(json.dumps(payload, indent=2))
    (OUT / "families_likelihoods_cpu.md").write_text(table(rows))
    print(table(rows))
    print(f"total {total:.0f}s; wrote {OUT / 'families_gallery_cpu.png'} and the likelihood table")


def table(rows):
    datasets = list(dict.fromkeys(r["data"] for r in rows))
    families = list(dict.fromkeys(r["family"] for r in rows))
    by = {(r["data"], r["family"]): r for r in rows}
    lines = ["Test log-likelihood, nats per sample (higher is better); training time in seconds (CPU, 1 thread, "
             "a shared machine under load: indicative only).", "",
             "| family | " + " | ".join(datasets) + " |", "|---" * (len(datasets) + 1) + "|"]
    for f in families:
        cells = []
        for d in datasets:
            r = by.get((d, f))
            if r is None:
                cells.append("")
            else:
                cells.append(f"{r['test_ll']:.3f}" + (f" ({r['train_s']:.0f}s)" if r["steps"] else ""))
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(densities):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["data"] + list(FAMILIES)
    fig, axes = plt.subplots(len(cols), len(TOYS), figsize=(2.4 * len(TOYS), 2.4 * len(cols)))
    for j, toy in enumerate(TOYS):
        for i, fam in enumerate(cols):
            ax = axes[i, j]
            ax.imshow(densities[(toy, fam)].T, origin="lower", extent=[-4.5, 4.5, -4.5, 4.5], cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(toy, fontsize=10)
            if j == 0:
                ax.set_ylabel(fam, fontsize=10)
    fig.suptitle("fastflow families on 2-D toys (training histogram, then model densities)", fontsize=11)
    return save_figure(fig, OUT / "families_gallery_cpu.png", dpi=90)


if __name__ == "__main__":
    main()
