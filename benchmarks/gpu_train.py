"""Whole-model training on the device: ``python benchmarks/gpu_train.py OUT.json [--dry-run]``.

The GPU suite's ``train`` phase (``benchmarks/gpu_suite.py``). For an NSF, a RealNVP and a MAF of
the sbi size (8 features, 5 transforms, hidden 64, batch 512) on CUDA:

1. **No host synchronisation inside any op**: one eager ``log_prob`` + backward of each model
   under ``torch.cuda.set_sync_debug_mode("error")`` (a sync raises);
2. **precision variants of the train step**: float32, ``torch.autocast`` float16 with a
   ``GradScaler``, ``torch.autocast`` bfloat16, each 30 steps from the same weights: losses finite,
   the 16-bit runs' final loss within 5% + 0.1 nats of the float32 run's (the conditioners round to
   2^-11 / 2^-8; the fused ops compute in float32);
3. **step times**: eager, ``fastflow.compile`` (default mode) and, with ``dynamic=False``,
   ``mode="reduce-overhead"`` (CUDA graphs), and zuko's NSF under ``torch.compile`` when zuko is
   installed; medians of interleaved rounds.

``--dry-run`` runs the same code on the CPU at a tiny size (bfloat16 autocast only; no sync
check, which is CUDA's), so CI exercises every line but the device-only ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SBI = {"features": 8, "num_layers": 5, "hidden_features": 64, "batch": 512, "steps": 30, "rounds": 15}
TINY = {"features": 4, "num_layers": 2, "hidden_features": 16, "batch": 64, "steps": 6, "rounds": 2}
MODELS = {"nsf": {"num_bins": 8, "tail_bound": 5.0}, "realnvp": {}, "maf": {}}


def _build(name, cfg, device):
    from fastflow.flows import build

    torch.manual_seed(0)
    return build(name, (cfg["features"],), num_layers=cfg["num_layers"], hidden_features=cfg["hidden_features"],
                 **MODELS[name]).to(device)


def _data(cfg, device):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(cfg["batch"], cfg["features"], generator=g)
    z[:, 1] = 0.5 * z[:, 1] + 0.4 * (z[:, 0] ** 2 - 1)
    return z.to(device)


def sync_check(name, cfg, device) -> dict:
    if device.type != "cuda":
        return {"model": name, "check": "no host sync in ops", "skipped": "CUDA only"}
    flow, x = _build(name, cfg, device), _data(cfg, device)
    flow.log_prob(x).mean().backward()  # warm: first-call allocations and kernel loads
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        flow.log_prob(x).mean().backward()
        ok, error = True, None
    except RuntimeError as exc:
        ok, error = False, str(exc)[:300]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return {"model": name, "check": "no host sync in ops", "ok": ok, "error": error}


def _train(flow, x, steps, device, dtype=None):
    from fastflow.flows import adam

    opt = adam(flow.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = -flow.log_prob(x).mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        losses.append(float(loss.detach()))
    return losses


def precision(name, cfg, device) -> list[dict]:
    x = _data(cfg, device)
    base = _build(name, cfg, device)
    ref = _train(copy.deepcopy(base), x, cfg["steps"], device)
    rows = [{"model": name, "precision": "float32", "losses": ref, "finite": all(map(math.isfinite, ref))}]
    variants = [torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    for dtype in variants:
        try:
            got = _train(copy.deepcopy(base), x, cfg["steps"], device, dtype)
            finite = all(map(math.isfinite, got))
            ok = finite and abs(got[-1] - ref[-1]) <= 0.05 * abs(ref[-1]) + 0.1
            rows.append({"model": name, "precision": f"autocast {str(dtype)[6:]}", "losses": got, "finite": finite,
                         "final_vs_float32": got[-1] - ref[-1], "ok": ok,
                         "grad_scaler": dtype == torch.float16})
        except Exception as exc:  # a failure is a result
            rows.append({"model": name, "precision": f"autocast {str(dtype)[6:]}", "ok": False,
                         "error": f"{type(exc).__name__}: {exc}"[:300]})
    return rows


def timings(cfg, device) -> list[dict]:
    import fastflow
    from fastflow.bench import time_interleaved

    x = _data(cfg, device)
    calls = {}
    for name in MODELS:
        for label, how in (("eager", None), ("fastflow.compile", {}),
                           ("fastflow.compile reduce-overhead", {"dynamic": False, "mode": "reduce-overhead"})):
            if how is not None and "reduce-overhead" in label and device.type != "cuda":
                continue
            flow = _build(name, cfg, device)
            opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
            if how is None:
                def step(flow=flow, opt=opt):
                    opt.zero_grad(set_to_none=True)
                    (-flow.log_prob(x).mean()).backward()
                    opt.step()
            else:
                fast = fastflow.compile(flow, **how)

                def step(fast=fast, opt=opt):
                    fast.train_step(opt, x)
            calls[f"{name} {label}"] = step
    try:
        import zuko

        torch.manual_seed(0)
        hidden = (cfg["hidden_features"],) * 2
        zf = zuko.flows.NSF(cfg["features"], transforms=cfg["num_layers"], hidden_features=hidden, bins=8).to(device)
        zloss = torch.compile(lambda: -zf().log_prob(x).mean())
        zopt = torch.optim.Adam(zf.parameters(), lr=1e-3)

        def zstep():
            zopt.zero_grad(set_to_none=True)
            zloss().backward()
            zopt.step()

        calls["zuko nsf-ar + torch.compile"] = zstep
    except ImportError:
        pass
    stats = time_interleaved(calls, str(device), repeats=cfg["rounds"], warmup=3)
    return [{"impl": k, **{kk: vv for kk, vv in v.items() if kk != "times"}} for k, v in stats.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    dry = args.dry_run
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    cfg = TINY if dry else SBI
    t0 = time.time()
    result = {"device": str(device), "dry_run": dry, "config": cfg, "torch": torch.__version__,
              "sync": [sync_check(n, cfg, device) for n in MODELS],
              "precision": [r for n in MODELS for r in precision(n, cfg, device)],
              "timings": timings(cfg, device)}
    result["wall_s"] = time.time() - t0
    Path(args.out).write_text(json.dumps(result, indent=2))
    bad = [r for r in result["sync"] + result["precision"] if r.get("ok") is False]
    for r in bad:
        print(f"FAILED: {r}")
    print(f"train: {len(result['timings'])} timings, {len(bad)} failed checks, {result['wall_s']:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
