"""``fastflow info`` names every backend with its ops and states the small-batch coupling rule."""

from __future__ import annotations

import json

from fastflow.cli.main import main
from fastflow.backends import SMALL_CPU_ELEMS


def test_info_lists_backends_ops_and_small_batch_rule(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    numba = next(line for line in text.splitlines() if line.strip().startswith("numba"))
    for op in ("affine_coupling", "rq_spline", "lu_conv1x1", "actnorm_conv1x1"):
        assert op in numba
    assert f"at most {SMALL_CPU_ELEMS}" in text
    assert "lu_conv1x1: compiled factor algebra up to 32 channels" in text  # the registry's note, not a constant
    assert main(["info", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert "lu_linear" in status["backends"]["numba"]["ops"]
