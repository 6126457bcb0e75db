"""``fastflow bench models``: the suite runs end to end at the tiny size (every library, eager and
compiled, and the floor), its rows say what they timed, and the CLI refuses what it cannot run."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("zuko")
pytest.importorskip("nflows")


def test_models_suite_runs_every_implementation(tmp_path):
    from fastflow.bench import models

    rows = models.run(quick=True, models=["realnvp"], explain=True)
    src, timed = rows[0], rows[1:]
    assert src["op"] == "source" and "load_before" in src
    assert {(r["case"], r["impl"]) for r in timed} == {(c, i) for c in models.CASES for i in models.IMPLS}
    for r in timed:
        assert "error" not in r, r
        assert r["median_s"] > 0 and r["rounds"] == 2
        assert r["params"] == timed[0]["params"]  # the same architecture in every library
        if r["case"] == "train_step":
            assert r["loss_finite"]
            if r["impl"].endswith("+ compile"):
                assert r["compiled_loss_rel_diff"] < 1e-4  # the compiled function is the eager one
        else:
            assert r["samples_finite"]
    ff = {r["case"]: r for r in timed if r["impl"] == "fastflow + compile"}
    assert ff["train_step"]["compiled_with"].startswith("fastflow.compile")
    assert (ff["train_step"]["graphs"], ff["train_step"]["graph_breaks"]) == (1, 0)
    base = next(r for r in timed if r["impl"] == models.BASELINE and r["case"] == "train_step")
    assert math.isclose(base["paired_speedup_vs_zuko_compile"], 1.0)
    table = models.markdown(rows)
    assert "| tiny | realnvp | train_step |" in table
    paths = models.after(rows, tmp_path / "models.json")
    assert paths[0].read_text().count("| tiny |") == 2


def test_floor_replaces_every_law():
    import torch

    from fastflow.bench.models import NoOpLaw, floor_of
    from fastflow.flows import build

    flow = build("nsf", (4,), num_layers=2, hidden_features=8, num_blocks=1, num_bins=4)
    floor = floor_of(flow)
    laws = [m.law for m in floor.modules() if hasattr(m, "law")]
    assert laws and all(isinstance(law, NoOpLaw) for law in laws)
    x = torch.randn(5, 4)
    # identity laws: the floor's density is the base density (the permutations keep it)
    want = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(1)
    torch.testing.assert_close(floor.log_prob(x), want)
    with pytest.raises(ValueError, match="no layer with a law"):
        floor_of(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("args,message", [
    (["models", "--model-sizes", "huge"], "unknown model size"),
    (["models", "--models", "glow"], "unknown model"),
    (["spline", "--models", "maf"], "apply to the models suite only"),
    (["models", "--sizes", "1024"], "--model-sizes"),
])
def test_cli_refuses_bad_model_options(tmp_path, capsys, args, message):
    from tests.bench._cli import bench_exit_code

    code = bench_exit_code(tmp_path, args)
    out = capsys.readouterr()
    assert code == 2 and message in out.out + out.err
