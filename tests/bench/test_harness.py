"""The benchmark harness: interleaved timing, paired ratios, and the coupling suite's rows."""

from __future__ import annotations

import math
import statistics

import pytest

from fastflow.bench import paired_ratio, time_interleaved


def test_time_interleaved_alternates_and_reports_each_call():
    log = []
    calls = {name: (lambda name=name: log.append(name)) for name in ("a", "b", "c")}
    stats = time_interleaved(calls, repeats=4, warmup=1)
    assert list(stats) == ["a", "b", "c"]
    assert log[:3] == ["a", "b", "c"]  # warm-up, once each
    rounds = [log[3 + 3 * r: 6 + 3 * r] for r in range(4)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]  # rotating order
    for st in stats.values():
        assert st["repeats"] == 4 and len(st["times"]) == 4
        assert st["min_s"] <= st["median_s"] == statistics.median(st["times"]) <= st["max_s"]


def test_time_interleaved_keeps_going_when_a_call_fails():
    state = {"n": 0}

    def flaky():
        state["n"] += 1
        if state["n"] > 2:
            raise RuntimeError("out of memory")

    stats = time_interleaved({"ok": lambda: None, "flaky": flaky, "broken": lambda: 1 / 0}, repeats=5, warmup=1)
    assert stats["ok"]["repeats"] == 5
    assert stats["flaky"] == {"error": "RuntimeError: out of memory"}
    assert stats["broken"]["error"].startswith("ZeroDivisionError")


def test_paired_ratio_is_the_median_of_round_ratios():
    base, other = [1.0, 10.0, 3.0], [1.0, 2.0, 3.0]
    assert paired_ratio(base, other) == 1.0  # round ratios 1, 5, 1; the ratio of medians is 1.5
    assert paired_ratio(base, other) != statistics.median(base) / statistics.median(other)


def test_coupling_suite_rows_and_ratios():
    pytest.importorskip("numba")
    from fastflow.bench import coupling

    rows = coupling.run(sizes=(64,), repeats=3, impls=("numba", "eager"), modes=("forward", "forward+backward"),
                        ops=("affine_coupling",))
    assert {(r["impl"], r["mode"]) for r in rows} == {(i, m) for i in ("numba", "eager")
                                                      for m in ("forward", "forward+backward")}
    for r in rows:
        assert "error" not in r, r
        assert r["n"] == 64 and r["d"] == coupling.D and r["repeats"] == 3 and len(r["times"]) == 3
        if r["impl"] == "eager":
            assert r["speedup_vs_eager"] == 1.0 and r["paired_vs_eager"] == 1.0
        else:
            eager = next(e for e in rows if e["impl"] == "eager" and e["mode"] == r["mode"])
            assert r["speedup_vs_eager"] == pytest.approx(eager["median_s"] / r["median_s"])
            assert r["paired_vs_eager"] == pytest.approx(paired_ratio(eager["times"], r["times"]))


def test_spline_and_lu_suites_time_their_implementations_side_by_side():
    pytest.importorskip("numba")
    from fastflow.bench import add_ratios, lu, spline

    rows = spline.run(sizes=(256,), repeats=2, impls=("numba", "reference"), modes=("forward", "forward+backward"))
    assert {(r["impl"], r["mode"]) for r in rows} == {(i, m) for i in ("numba", "reference")
                                                      for m in ("forward", "forward+backward")}
    rows += lu.run(sizes=(4096,), repeats=2, ops=("lu_linear",), modes=("inverse",),
                   impls_only=("numba", "reference", "torch_eager"))
    for r in rows:
        assert "error" not in r, r
        assert r["repeats"] == 2 and len(r["times"]) == 2 and r["ns_per_element"] > 0
    spline_rows = add_ratios([r for r in rows if r["op"] == "rq_spline"])
    ref = {r["mode"]: r["median_s"] for r in spline_rows if r["impl"] == "reference"}
    for r in spline_rows:
        assert r["speedup_vs_reference"] == pytest.approx(ref[r["mode"]] / r["median_s"])
    assert {r["impl"] for r in rows if r["op"] == "lu_linear"} == {"numba", "reference", "torch_eager"}


def test_plot_speedups_draws_every_group_from_the_rows(tmp_path):
    pytest.importorskip("matplotlib")
    from fastflow.bench import plot_speedups, speedup_bars

    rows = [{"op": op, "mode": mode, "n": 64, "impl": impl, "median_s": t}
            for op in ("affine_coupling_softclamp", "rescale") for mode in ("forward", "forward+backward")
            for impl, t in (("eager", 2.0), ("numba", 1.0), ("compile", 4.0))]
    rows.append({"op": "rescale", "mode": "inverse", "n": 64, "impl": "numba", "error": "RuntimeError: x"})
    rows.append({"op": "orphan", "mode": "forward", "n": 64, "impl": "numba", "median_s": 1.0})  # no baseline
    groups, bars = speedup_bars(rows, "eager")
    assert groups == [(op, mode, 64) for op in ("affine_coupling_softclamp", "rescale")
                      for mode in ("forward", "forward+backward")]
    assert bars == {"numba": [(i, 2.0) for i in range(4)], "compile": [(i, 0.5) for i in range(4)]}
    path = plot_speedups(rows, tmp_path / "chart.png", "eager", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_overhead_fit_recovers_a_known_line():
    from fastflow.bench.overhead import fit_line

    ns = [256, 512, 1024, 2048]
    a, b, worst = fit_line(ns, [30e-6 + 20e-9 * n for n in ns])
    assert abs(a - 30e-6) < 1e-12 and abs(b - 20e-9) < 1e-15 and worst < 1e-9


def test_overhead_suite_rows():
    """Every declared op gets timed rows at each size and a fixed-cost row per mode."""
    from fastflow.bench import overhead
    from fastflow.ops._samples import SPECS

    rows = overhead.run(quick=True, ops=("rq_spline", "lu_linear"))
    assert {r["op"] for r in rows} == {"rq_spline", "lu_linear", overhead.BASELINE}
    assert set(SPECS) >= {"rq_spline", "lu_linear"}
    for op in ("rq_spline", "lu_linear", overhead.BASELINE):
        for mode in ("forward", "forward+backward"):
            timed = [r for r in rows if r["op"] == op and r["mode"] == mode]
            assert len(timed) == 2 and all(r["median_s"] > 0 and "error" not in r for r in timed)
            fixed = [r for r in rows if r["op"] == op and r["mode"] == f"{mode} fixed"]
            assert len(fixed) == 1 and math.isfinite(fixed[0]["fixed_cost_us"])
            assert math.isclose(fixed[0]["over_baseline_us"] + next(
                r["fixed_cost_us"] for r in rows if r["op"] == overhead.BASELINE and r["mode"] == f"{mode} fixed"),
                fixed[0]["fixed_cost_us"], rel_tol=1e-9)
