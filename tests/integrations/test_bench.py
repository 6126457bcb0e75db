"""``fastflow bench integrations``: the harness's structure (no timings are asserted)."""

from __future__ import annotations

import pytest

from fastflow.bench import integrations as bench


def test_interleave_rotates_and_keeps_setup_untimed():
    order = []
    impls = {name: (lambda n=name: order.append(("setup", n)), lambda n=name: order.append(("call", n)))
             for name in ("a", "b", "c")}
    stats = bench.interleave(impls, rounds=4, warmup=1)
    assert all(stats[n]["rounds"] == 4 and len(stats[n]["times"]) == 4 for n in "abc")
    timed = [n for kind, n in order[6:] if kind == "call"]  # after the warm-ups (setup + 1 call each)
    assert timed == list("abc" "bca" "cab" "abc")
    # every timed call directly follows its own setup
    rest = order[6:]
    assert all(rest[i] == ("setup", rest[i + 1][1]) for i in range(0, len(rest), 2))


def test_interleave_reports_a_failure_and_goes_on():
    def boom():
        raise RuntimeError("no")

    stats = bench.interleave({"ok": (lambda: None, lambda: None), "bad": (lambda: None, boom)}, rounds=3, warmup=1)
    assert stats["bad"] == {"error": "RuntimeError: no"} and stats["ok"]["rounds"] == 3


def test_quick_run_rows():
    pytest.importorskip("zuko")
    rows = bench.run(quick=True, peers=["zuko"], sbi=False)
    cases = {(r["op"], r["mode"], r["impl"]) for r in rows}
    for kind in ("coupling", "autoregressive"):
        for case in ("train_step", "sample"):
            for impl in ("plain", "accelerated"):
                assert (f"zuko NSF {kind}", case, impl) in cases
        traj = next(r for r in rows if r["op"] == f"zuko NSF {kind}" and r["mode"] == "loss_trajectory")
        assert traj["finite"] and {"max_rel_deviation", "plain_vs_float64", "accelerated_vs_float64"} <= set(traj)
    assert all("paired_speedup" in r for r in rows if r["mode"] in ("train_step", "sample"))
