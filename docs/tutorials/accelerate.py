"""
# Accelerating an existing zuko or nflows model

Models built with [zuko](https://github.com/probabilists/zuko) or
[nflows](https://github.com/bayesiains/nflows) need no rewrite: `fastflow.integrations.zuko`
and `fastflow.integrations.nflows` route those libraries' rational-quadratic spline evaluation
to fastflow's fused spline op (`fastflow.ops.rq_spline` with the library's own parameterisation).
`accelerate()` works for models built before or after the call, is reference counted, and can be
scoped with `with`; `restore()` puts the originals back.
"""

# %%
import os
import time

import matplotlib.pyplot as plt
import torch
import zuko

import fastflow.integrations.nflows as ffn
import fastflow.integrations.zuko as ffz

QUICK = os.environ.get("FASTFLOW_DOCS_QUICK") == "1"
REPEATS = 3 if QUICK else 20
BATCH = 1024 if QUICK else 4096
torch.manual_seed(0)


def median_time(fn, repeats=REPEATS):
    fn()  # warm-up (the first fastflow call on a CPU compiles its Numba kernels)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# %%
# ## zuko
#
# A zuko neural spline flow, conditioned on a 4-D context, built the usual way:
flow = zuko.flows.NSF(features=8, context=4, transforms=3, bins=8, hidden_features=(128, 128))
x, c = torch.randn(BATCH, 8), torch.randn(BATCH, 4)

with torch.no_grad():
    before = flow(c).log_prob(x)


def zuko_step():
    loss = -flow(c).log_prob(x).mean()
    loss.backward()


t_zuko = median_time(zuko_step)

# %%
# Switch it on. The same model object now runs its splines through the fused op; its
# log-densities agree with zuko's own to float32 rounding.
handle = ffz.accelerate()
print("accelerated:", ffz.is_accelerated())
with torch.no_grad():
    after = flow(c).log_prob(x)
print(f"max |log p difference| = {(after - before).abs().max().item():.2e}")
t_ff = median_time(zuko_step)
samples = flow(c[:3]).sample((2,))  # sampling inverts the spline with the same op
print("samples:", tuple(samples.shape))
handle.close()  # or ffz.restore(); or scope it: `with ffz.accelerate(): ...`
print("accelerated after close():", ffz.is_accelerated())

# %%
# ## nflows
#
# The same for nflows: every spline transform with linear tails (and the bounded splines) of
# models built before or after the call.
from nflows.distributions import StandardNormal  # noqa: E402
from nflows.flows import Flow  # noqa: E402
from nflows.transforms import (  # noqa: E402
    CompositeTransform,
    PiecewiseRationalQuadraticCouplingTransform,
    ReversePermutation,
)
from nflows.nn.nets import ResidualNet  # noqa: E402


def net(i, o):
    return ResidualNet(i, o, hidden_features=128, num_blocks=2)


layers = []
for k in range(4):
    mask = torch.arange(8) % 2 == k % 2
    layers += [PiecewiseRationalQuadraticCouplingTransform(mask.int(), net, num_bins=8, tails="linear",
                                                           tail_bound=3.0), ReversePermutation(8)]
nflow = Flow(CompositeTransform(layers), StandardNormal([8]))


def nflows_step():
    loss = -nflow.log_prob(x).mean()
    loss.backward()


with torch.no_grad():
    before = nflow.log_prob(x)
t_nflows = median_time(nflows_step)
with ffn.accelerate():
    with torch.no_grad():
        after = nflow.log_prob(x)
    t_nflows_ff = median_time(nflows_step)
print(f"max |log p difference| = {(after - before).abs().max().item():.2e}")

# %%
# ## Step times
#
# One forward + backward pass of the whole model on a batch of `BATCH` rows (medians, measured while
# these docs were built, on the build machine's CPU; the conditioner networks are unchanged,
# so the gain is what the splines took).
for name, a, b in (("zuko NSF", t_zuko, t_ff), ("nflows NSF", t_nflows, t_nflows_ff)):
    print(f"{name:10s}  own {1e3 * a:7.1f} ms   accelerated {1e3 * b:7.1f} ms   x{a / b:.2f}")
fig, ax = plt.subplots(figsize=(5, 3))
labels = ["zuko", "zuko + fastflow", "nflows", "nflows + fastflow"]
ax.bar(labels, [1e3 * t for t in (t_zuko, t_ff, t_nflows, t_nflows_ff)], color=["C0", "C1", "C0", "C1"])
ax.set_ylabel("ms per training step")
ax.tick_params(axis="x", labelsize=8)
