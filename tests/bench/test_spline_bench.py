"""The spline suite's options: compiled peers, bins and extra cases (no timings asserted)."""

from __future__ import annotations

import pytest

from fastflow.bench import spline


def test_parse_cases_and_bins():
    assert spline._parse_cases("2,8,64@2**20") == [(2**20, 2), (2**20, 8), (2**20, 64)]
    with pytest.raises(ValueError, match="BINS@SIZE"):
        spline._parse_cases("2,8")
    with pytest.raises(ValueError, match="outside 2..1024"):
        spline._parse_bin("1")
    with pytest.raises(ValueError, match="not an integer"):
        spline._parse_bin("eight")


def test_rows_per_size_and_bins_with_a_compiled_peer():
    pytest.importorskip("numba")
    pytest.importorskip("zuko")
    rows = spline.run(sizes=(64,), bins=(3,), cases=[(40, 2)], repeats=2, impls=("numba", "zuko", "zuko+compile"),
                      modes=("forward", "forward+backward"))
    got = {(r["impl"], r["mode"], r["n"], r["k"]) for r in rows}
    assert got == {(i, m, n, k) for i in ("numba", "zuko", "zuko+compile") for m in ("forward", "forward+backward")
                   for n, k in ((64, 3), (40, 2))}
    for r in rows:
        assert "error" not in r, r
        assert r["repeats"] == 2 and r["ns_per_element"] > 0
        base = next(b for b in rows if b["impl"] == "zuko+compile" and (b["mode"], b["n"], b["k"]) ==
                    (r["mode"], r["n"], r["k"]))
        assert r["speedup_vs_zuko+compile"] == pytest.approx(base["median_s"] / r["median_s"])


def test_module_command_line_writes_the_json(tmp_path):
    pytest.importorskip("numba")
    import json

    assert spline.main(["--sizes", "32", "--bins", "2", "--repeats", "1", "--impls", "numba", "--modes", "forward",
                        "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("spline_*.json")
    payload = json.loads(path.read_text())
    assert payload["command"].startswith("python -m fastflow.bench.spline --sizes 32")
    assert [(r["impl"], r["n"], r["k"]) for r in payload["results"]] == [("numba", 32, 2)]


def test_fastflow_bench_takes_bins_and_sweep_for_the_spline_suite_only(capsys):
    from fastflow.cli.main import main

    assert main(["bench", "lu", "--bins", "2,8"]) == 2
    assert "--bins and --sweep apply to the spline suite only" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "spline", "--bins", "1"])
    assert "outside 2..1024" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "spline", "--sweep", "2,8"])
    assert "BINS@SIZE" in capsys.readouterr().err
