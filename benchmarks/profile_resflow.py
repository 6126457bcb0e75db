"""Profile of one Residual-Flow and one CNF training step on the CPU (issue 17, item 4: fuse only
what wins). Writes ``benchmarks/results/resflow_profile_cpu.json``: the step times and the share of
self CPU time per aten op, grouped into matrix products, elementwise maths and the rest.

    .venv/bin/python benchmarks/profile_resflow.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import fastflow.data as data
from fastflow.bench import environment
from fastflow.flows import build, training_loss

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::mv", "aten::dot"}
ELEMENTWISE = {"aten::mul", "aten::div", "aten::add", "aten::sub", "aten::sigmoid", "aten::sigmoid_backward",
               "aten::softplus", "aten::softplus_backward", "aten::tanh", "aten::tanh_backward", "aten::neg",
               "aten::pow", "aten::exp", "aten::add_", "aten::mul_", "aten::addcmul_", "aten::addcdiv_"}


def _case(name):
    torch.manual_seed(0)
    train = data.load("digits", "train")
    if name == "resflow":
        flow = build("resflow", (64,), num_layers=4, hidden_features=128, num_hidden=2)
        with torch.no_grad():
            flow(train[::4][:256])
        objective = "nll"
    else:
        flow = build("cnf", (64,), hidden_features=128, num_layers=2, method="rk4", step_size=0.125)
        objective = "nll"  # through the ODE with the Hutchinson trace (flow matching has no ODE to profile)
    opt = torch.optim.Adam(flow.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)

    def step():
        idx = torch.randint(0, len(train), (256,), generator=g)
        loss = training_loss(flow, train[idx], objective)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def profile_step(name, n=5):
    step = _case(name)
    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    step_s = (time.perf_counter() - t0) / n
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    ops = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    share = {"matmul": 0.0, "elementwise": 0.0}
    for key, t, _ in ops:
        if key in MATMUL:
            share["matmul"] += t / total
        elif key in ELEMENTWISE:
            share["elementwise"] += t / total
    share["other"] = 1.0 - share["matmul"] - share["elementwise"]
    top = sorted(ops, key=lambda o: -o[1])[:12]
    return {"model": name, "step_s": step_s, "share_of_self_cpu": share,
            "top_ops": [{"op": k, "self_cpu_share": t / total, "calls_per_step": c / n} for k, t, c in top]}


def main():
    torch.set_num_threads(1)
    out = {"environment": environment("cpu"), "threads": 1,
           "cases": [profile_step("resflow"), profile_step("cnf")]}
    path = Path(__file__).parent / "results" / "resflow_profile_cpu.json"
    path.write_text(json.dumps(out, indent=2))
    for c in out["cases"]:
        shares = {k: round(v, 3) for k, v in c["share_of_self_cpu"].items()}
        print(c["model"], f"{c['step_s'] * 1e3:.1f} ms/step", shares)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
