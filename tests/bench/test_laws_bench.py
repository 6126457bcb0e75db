"""The laws suite (``fastflow bench laws``): its rows, ratios and the peers' failures recorded as
results (no timings asserted)."""

from __future__ import annotations

import pytest

from fastflow.bench import laws


def test_rows_for_every_implementation_and_mode():
    pytest.importorskip("numba")
    pytest.importorskip("zuko")
    modes = ("forward", "forward+backward")  # (compiling zuko's bisection inverse takes a minute)
    rows = laws.run(sizes=(96,), repeats=2, modes=modes)
    got = {(r["op"], r["impl"], r["mode"], r["n"]) for r in rows}
    impls = ("numba", "reference", "zuko", "zuko+compile")
    assert got == {(op, i, m, 96) for op in laws.LAWS for i in impls for m in modes}
    for r in rows:
        if "error" in r:  # a peer that cannot run a mode is a result, with its reason
            assert r["impl"] == "zuko+compile" and r["mode"] == "forward+backward", r
            continue
        assert r["repeats"] == 2 and r["ns_per_element"] > 0
        base = next(b for b in rows if b["impl"] == "zuko" and (b["op"], b["mode"]) == (r["op"], r["mode"]))
        assert r["speedup_vs_zuko"] == pytest.approx(base["median_s"] / r["median_s"])


@pytest.mark.parametrize("name", sorted(laws.LAWS))
def test_the_timed_calls_compute_what_they_say(name):
    # the suite's own inputs through our op and the peer agree (what the ratios compare)
    pytest.importorskip("zuko")
    import torch

    law = laws.LAWS[name]
    x, params = law.inputs(200, "cpu", torch.float64)
    ours = law.ours(x, params, False, None)
    theirs = law.peer(x, params, False)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-9)
    back = law.ours(ours[0], params, True, None)[0]
    torch.testing.assert_close(back, x, rtol=0, atol=1e-11)
