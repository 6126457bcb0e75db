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


def test_glasflow_and_sbi_rows(monkeypatch):
    """Floors where a fused law is (and only there), the trajectories within 1e-4, an NPE run
    per estimator with the same per-epoch losses accelerated."""
    pytest.importorskip("glasflow")
    pytest.importorskip("sbi")
    import fastflow.integrations.sbi as ffs

    monkeypatch.setattr(bench, "WARMUP", 1)
    monkeypatch.setattr(bench, "TRAJECTORY_STEPS", 10)

    rows = bench._peer_rows("glasflow", "coupling", 1, False)
    rows += bench._peer_rows("glasflow", "realnvp", 1, False, fused=False)
    for name in ("zuko_nsf", "zuko_maf"):
        rows += bench._peer_rows("sbi", name, 1, False, make=lambda name=name: bench._sbi(name),
                                 fused=ffs.ESTIMATORS[name].op is not None)
    rows += bench._npe_rows("nsf", quick=True, rounds=1)
    impls = {(r["op"], r["mode"], r["impl"]) for r in rows}
    floor = "floor: spline a no-op"
    for op, fused in (("glasflow CouplingNSF", True), ("glasflow RealNVP", False), ("sbi zuko_nsf", True),
                      ("sbi zuko_maf", False)):
        for case in ("train_step", "sample"):
            assert {(op, case, "plain"), (op, case, "accelerated")} <= impls
            assert ((op, case, floor) in impls) == fused
        traj = [r for r in rows if r["op"] == op and r["mode"] == "loss_trajectory"]
        assert (len(traj) == 1 and traj[0]["within_1e_4"]) if fused else not traj
    npe = {r["impl"]: r for r in rows if r["mode"] == "npe_run"}
    assert set(npe) == {"plain", "accelerated", floor}
    assert npe["accelerated"]["loss_max_rel_deviation"] <= 1e-4 and npe["plain"]["epochs"] == 2
    assert not [r for r in rows if "error" in r]


def test_estimators_option_runs_only_those_and_floors_the_polynomial_laws(monkeypatch):
    """``estimators=``: those sbi estimators only (no peer models, no NPE runs); the floor of a
    polynomial-law estimator replaces its fused law too (so it differs from accelerated)."""
    pytest.importorskip("sbi")
    monkeypatch.setattr(bench, "WARMUP", 1)
    monkeypatch.setattr(bench, "TRAJECTORY_STEPS", 3)
    import fastflow.ops

    seen = []
    real_on = bench._Floor.on

    def on(self):
        real_on(self)
        seen.append(fastflow.ops.bernstein is bench._Floor._noop_law)

    monkeypatch.setattr(bench._Floor, "on", on)
    rows = bench.run(repeats=1, estimators=["zuko_bpf"])
    ops = {r["op"] for r in rows} - {"source"}
    assert ops == {"sbi zuko_bpf"}
    assert {"plain", "accelerated", "floor: spline a no-op"} <= {r["impl"] for r in rows}
    assert seen and all(seen)
    assert fastflow.ops.bernstein is not bench._Floor._noop_law  # put back


@pytest.mark.parametrize("args,message", [
    (["integrations", "--estimators", "zuko_glow"], "unknown sbi estimator"),
    (["laws", "--estimators", "zuko_bpf"], "applies to the integrations suite only"),
])
def test_cli_refuses_bad_estimator_options(tmp_path, capsys, args, message):
    from tests.bench._cli import bench_exit_code

    code = bench_exit_code(tmp_path, args)
    out = capsys.readouterr()
    assert code == 2 and message in out.out + out.err
