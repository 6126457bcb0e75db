"""``torch.export`` of every registered model's log-density and sampler (issue 28).

In process: each exportable model, with and without context, log_prob and sampler, fixed and
dynamic batch, against the eager adapter on the same inputs. Across processes: the programs are
saved with ``torch.export.save`` and loaded in one fresh interpreter that imports only
``fastflow.ops``, which must give the same numbers. Without ``fastflow.ops`` the load fails naming
the custom op; ``fastflow.ops.load_exported`` names what is missing and what to do.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastflow.flows.export import LogProb, NotExportableError, Sampler, export_flow
from tests.flows._autocast_models import UNCONDITIONAL_ONLY, data, registered, shape_of, small_flow

ROOT = Path(__file__).resolve().parents[2]
EXPORTABLE = registered()  # every model, both programs
CONTEXT = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def _ctx(n, ctx, seed=2):
    return None if ctx is None else torch.randn(n, ctx, generator=torch.Generator().manual_seed(seed))


def _inputs(name, what, n, ctx, seed=3):
    g = torch.Generator().manual_seed(seed)
    first = data(name, n, seed=seed) if what == "log_prob" else torch.randn(n, *shape_of(name), generator=g)
    return first, _ctx(n, ctx, seed)


def _args(first, c):
    return (first,) if c is None else (first, c)  # an unconditional program takes one tensor


def _eager(flow, what, first, c):
    with torch.no_grad():
        return (LogProb if what == "log_prob" else Sampler)(flow)(first, c)


def _flow(name, ctx):
    return small_flow(name, ctx).eval()


def _cases():
    out = []
    for name in EXPORTABLE:
        for ctx in (None, CONTEXT):
            if ctx and name in UNCONDITIONAL_ONLY:
                continue
            for what in ("log_prob", "sample"):
                for dynamic in (False, True):
                    marks = []
                    label = f"{name}-{'ctx' if ctx else 'noctx'}-{what}-{'dynamic' if dynamic else 'fixed'}"
                    out.append(pytest.param(name, ctx, what, dynamic, marks=marks, id=label))
    return out


@pytest.mark.parametrize("name,ctx,what,dynamic", _cases())
def test_export_matches_eager(name, ctx, what, dynamic):
    flow = _flow(name, ctx)
    program = export_flow(flow, what, batch=4, dynamic_batch=dynamic, context=_ctx(4, ctx))
    run = program.module()
    for n in ((3, 9) if dynamic else (4,)):
        first, c = _inputs(name, what, n, ctx)
        got, want = run(*_args(first, c)), _eager(flow, what, first, c)
        torch.testing.assert_close(got, want)
        for t in (got if isinstance(got, tuple) else (got,)):
            assert t.shape[0] == n and torch.isfinite(t).all()
    if not dynamic:  # a fixed batch is a fixed batch
        first, c = _inputs(name, what, 5, ctx)
        with pytest.raises(Exception):
            run(*_args(first, c))


@pytest.mark.parametrize("name", ["nsf", "maf", "glow"])
def test_sampler_is_the_flows_own_sampling_for_normal_bases(name):
    flow = _flow(name, CONTEXT)
    c = _ctx(6, CONTEXT)
    torch.manual_seed(11)
    want_x, want_lp = flow.sample_and_log_prob(1, c)  # (6, 1, *shape): one sample per context row
    torch.manual_seed(11)
    eps = torch.randn(6, *shape_of(name))
    got_x, got_lp = _eager(flow, "sample", eps, c)
    torch.testing.assert_close(got_x, want_x[:, 0])
    torch.testing.assert_close(got_lp, want_lp[:, 0])


def test_logistic_base_sampler_gives_logistic_noise():
    flow = _flow("nice", None)
    eps = torch.randn(20000, 4, generator=torch.Generator().manual_seed(0))
    x, lp = _eager(flow, "sample", eps, None)
    assert torch.isfinite(x).all() and torch.isfinite(lp).all()
    # the base noise is standard logistic: mean 0, variance pi^2 / 3 (about 1% sampling error here)
    z = flow.transform_to_noise(x)
    assert abs(float(z.mean())) < 0.05 and abs(float(z.var()) / (torch.pi ** 2 / 3) - 1) < 0.05
    torch.testing.assert_close(lp, flow.log_prob(x), rtol=1e-4, atol=1e-4)


def test_resflow_with_a_random_log_det_estimator_says_why():
    from fastflow.nn.residual import ResidualBlock

    flow = _flow("resflow", None)
    for m in flow.modules():
        if isinstance(m, ResidualBlock):
            m.eval_estimator = "series"
    with pytest.raises(NotExportableError, match="random probes.*eval_estimator='exact'"):
        export_flow(flow, "log_prob")


@pytest.mark.parametrize("name,what", [("planar", "log_prob"), ("radial", "log_prob"), ("resflow", "sample")])
def test_iterative_inverses_give_nan_rows_not_errors_when_exported(name, what):
    """Eager raises on a non-finite input to a numerical inverse; an exported program cannot (no
    host sync), so that row is non-finite and the other rows are those of the batch without it."""
    flow = _flow(name, None)
    run = export_flow(flow, what, batch=4, dynamic_batch=True).module()
    first, _ = _inputs(name, what, 5, None, seed=4)
    bad = first.clone()
    bad[1, 0] = float("nan")
    got = run(bad)
    keep = [0, 2, 3, 4]
    want = _eager(flow, what, first[keep], None)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert not torch.isfinite(g[1]).all()
        torch.testing.assert_close(g[keep], w)


def test_bad_arguments():
    flow = _flow("nsf", None)
    with pytest.raises(ValueError, match="what="):
        export_flow(flow, "density")
    with pytest.raises(ValueError, match="batch"):
        export_flow(flow, "log_prob", batch=0)


def _save_programs(tmp_path):
    """Every exportable model once (log_prob, dynamic batch), and the samplers of a few,
    with and without context; returns the manifest the fresh process checks."""
    manifest = []
    for i, name in enumerate(EXPORTABLE):
        unconditional = name in UNCONDITIONAL_ONLY
        variants = [("log_prob", CONTEXT if i % 2 and not unconditional else None)]
        if name in ("nsf", "nice", "glow", "planar", "resflow", "cnf"):
            variants.append(("sample", None if i % 2 or unconditional else CONTEXT))
        for what, ctx in variants:
            flow = _flow(name, ctx)
            dynamic = True
            program = export_flow(flow, what, batch=4, dynamic_batch=dynamic, context=_ctx(4, ctx))
            stem = f"{name}-{what}-{'ctx' if ctx else 'noctx'}"
            torch.export.save(program, tmp_path / f"{stem}.pt2")
            cases = []
            for n in ((2, 7) if dynamic else (4,)):
                first, c = _inputs(name, what, n, ctx)
                cases.append({"inputs": _args(first, c), "expected": _eager(flow, what, first, c)})
            torch.save(cases, tmp_path / f"{stem}.io.pt")
            manifest.append(stem)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _fresh(code, cwd):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exported")
    return folder, _save_programs(folder)


def test_every_exportable_model_round_trips_in_a_fresh_process(saved):
    folder, manifest = saved
    assert {stem.split("-log_prob")[0] for stem in manifest if "-log_prob" in stem} == set(EXPORTABLE)
    result = _fresh("""
        import json, sys
        import torch
        import fastflow.ops
        checked = []
        for stem in json.load(open("manifest.json")):
            run = fastflow.ops.load_exported(stem + ".pt2").module()
            for case in torch.load(stem + ".io.pt"):
                torch.testing.assert_close(run(*case["inputs"]), case["expected"])
            checked.append(stem)
        print("CHECKED", len(checked))
    """, folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"CHECKED {len(manifest)}" in result.stdout


def test_importing_the_ops_loads_no_model_code():
    result = _fresh("""
        import sys
        import fastflow.ops
        print(sorted(m for m in sys.modules if m.startswith(("fastflow.flows", "fastflow.nn"))))
    """, ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", result.stdout


def test_loading_without_the_ops_names_the_custom_op(saved):
    folder, manifest = saved
    stem = next(s for s in manifest if s.startswith("nsf-"))  # a program with fused ops (cnf has none)
    result = _fresh(f"""
        import sys
        import torch
        torch.export.load("{stem}.pt2")
    """, folder)
    assert result.returncode != 0
    # torch's own message (our code is not imported there): it names the op and says to register it
    assert "torch.ops.fastflow." in result.stderr and "register" in result.stderr


def test_load_exported_names_ops_this_fastflow_lacks(tmp_path):
    """A program from a newer fastflow (an op this one does not define) fails with the op's name
    and what to do, not torch's generic deserialisation error."""
    made = _fresh("""
        import torch
        @torch.library.custom_op("fastflow::op_from_the_future", mutates_args=())
        def future(x: torch.Tensor) -> torch.Tensor:
            return x * 2
        future.register_fake(lambda x: torch.empty_like(x))
        class M(torch.nn.Module):
            def forward(self, x):
                return future(x) + 1
        torch.export.save(torch.export.export(M(), (torch.randn(3),)), "future.pt2")
    """, tmp_path)
    assert made.returncode == 0, made.stderr[-2000:]
    import fastflow.ops

    with pytest.raises(RuntimeError, match=r"fastflow::op_from_the_future.*import fastflow\.ops"):
        fastflow.ops.load_exported(tmp_path / "future.pt2")


def test_aotinductor_package_runs_from_its_file_in_a_fresh_process(tmp_path):
    """A compiled AOTInductor package of nsf's log_prob (dynamic batch), loaded by a process that
    imports only fastflow.ops, gives eager's numbers."""
    flow = _flow("nsf", None)
    program = export_flow(flow, "log_prob", batch=4, dynamic_batch=True)
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "nsf_aoti.pt2"))
    cases = []
    for n in (1, 5, 33):
        x, _ = _inputs("nsf", "log_prob", n, None, seed=n)
        cases.append({"inputs": (x,), "expected": _eager(flow, "log_prob", x, None)})
    torch.save(cases, tmp_path / "io.pt")
    result = _fresh(f"""
        import sys
        import torch
        import fastflow.ops
        run = torch._inductor.aoti_load_package({str(path)!r})
        for case in torch.load("io.pt"):
            torch.testing.assert_close(run(*case["inputs"]), case["expected"], rtol=1e-5, atol=1e-5)
        print("OK", sorted(m for m in sys.modules if m.startswith(("fastflow.flows", "fastflow.nn"))))
    """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK []" in result.stdout
