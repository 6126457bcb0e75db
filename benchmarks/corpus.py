"""A behaviour corpus of a checkout: record it before a refactor, again after, and compare bitwise.

    PYTHONPATH=. python benchmarks/corpus.py record OUT.pt      # in the tree to record
    python benchmarks/corpus.py compare BEFORE.pt AFTER.pt      # bitwise, key by key

What is recorded (CPU; the Triton kernels under ``TRITON_INTERPRET=1``, which this script sets):

- every declared op (``fastflow.ops._samples.SPECS``) x the default choice (``backend=None``,
  routes included) and every backend that runs here x every dtype that backend takes among
  float32/float64 x every declared option x forward/inverse: the outputs
  and the gradients of a fixed random functional of them with respect to every gradient input;
- every registered model (the tests' small configurations), with and without a large batch that
  reaches the fused kernels: ``log_prob`` of a fixed batch and every parameter's gradient, and a
  sample from a fixed seed.

Keys are stable names, so a refactor that moves code but not numbers gives an empty difference.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch  # noqa: E402


def _specs():
    import fastflow.ops  # noqa: F401  (declares the ops)

    try:  # where the declarations live moved (issue 26); the corpus reads either tree
        from fastflow.ops._samples import SPECS
    except ImportError:
        from fastflow.ops._spec import SPECS
    return SPECS


def _runnable(name):
    from fastflow.backends import BACKENDS

    b = BACKENDS[name]
    if "cpu" in b.devices or "any" in b.devices:
        return b.probe() is None
    return b.cpu_when is not None and b.cpu_when()


def _ops(out: dict) -> None:
    from fastflow.backends import BACKENDS

    for spec in _specs().values():
        for backend in (None, *spec.backends):  # None: the default choice, routes included
            if backend is not None and not _runnable(backend):
                continue
            dtypes = [d for d in (torch.float32, torch.float64) if backend is None or d in BACKENDS[backend].dtypes
                      or d in BACKENDS[backend].op_dtypes.get(spec.op, ())]
            for dtype in dtypes:
                for i, option in enumerate(spec.options):
                    for inverse in (False, True):
                        way = "inv" if inverse else "fwd"
                        key = f"op/{spec.name}/{backend or 'default'}/{str(dtype)[6:]}/o{i}/{way}"
                        gen = torch.Generator().manual_seed(1234)
                        tensors, kwargs = spec.example(spec.shapes[0], dtype, "cpu", gen, **option)
                        idx = [spec.inputs.index(n) for n in spec.grad_inputs]
                        tensors = [t.detach().requires_grad_() if j in idx else t for j, t in enumerate(tensors)]
                        try:
                            outs = spec.fn(*tensors, inverse=inverse, backend=backend, **kwargs)
                        except Exception as exc:  # a backend that declines a case: record that it does
                            out[key] = f"{type(exc).__name__}: {exc}"
                            continue
                        w = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outs]
                        loss = sum((o * wi).sum() for o, wi in zip(outs, w))
                        grads = torch.autograd.grad(loss, [tensors[j] for j in idx], allow_unused=True)
                        out[key] = [o.detach() for o in outs] + [g for g in grads]


def _models(out: dict) -> None:
    sys.path.insert(0, os.getcwd())
    from tests.flows._autocast_models import data, registered, small_flow

    for name in registered():
        for n in (64, 2048):
            if n > 64 and name in ("cnf", "resflow", "planar", "radial"):
                continue  # no fused op inside; the small batch covers them
            flow = small_flow(name).double() if n == 64 and name not in ("glow", "realnvp-image") else small_flow(name)
            x = data(name, n).to(next(flow.parameters()).dtype)
            lp = flow.log_prob(x)
            params = [p for p in flow.parameters() if p.requires_grad]
            grads = torch.autograd.grad(lp.mean(), params, allow_unused=True)
            torch.manual_seed(7)
            with torch.no_grad():
                s = flow.sample(8)
            out[f"model/{name}/{n}"] = [lp.detach(), *grads, s]


def record(path: str) -> None:
    torch.manual_seed(0)
    out: dict = {}
    _ops(out)
    _models(out)
    torch.save(out, path)
    print(f"{len(out)} entries -> {path}")


def _bits(t):
    """The tensor's bytes (so that NaNs and signed zeros compare as stored)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _same(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x is None or y is None:
            if x is not y:
                return False
        elif x.dtype != y.dtype or x.shape != y.shape or not torch.equal(_bits(x), _bits(y)):
            return False
    return True


def compare(a_path: str, b_path: str) -> int:
    a, b = torch.load(a_path), torch.load(b_path)
    missing = sorted(set(a) - set(b))
    extra = sorted(set(b) - set(a))
    differ = sorted(k for k in set(a) & set(b) if not _same(a[k], b[k]))
    print(f"{len(set(a) & set(b))} common entries: {len(differ)} differ; {len(missing)} only before, "
          f"{len(extra)} only after")
    for k in differ[:50]:
        print("  differs:", k)
    for k in missing[:20]:
        print("  only before:", k)
    for k in extra[:20]:
        print("  only after:", k)
    return 1 if differ or missing else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "record":
        record(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
