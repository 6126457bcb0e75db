"""Explicit SIMD for the Numba kernels where LLVM's vectorisers do not find the code we want.

:func:`sum8_runs` sums ``R`` runs of an array the way :func:`_sum8
<fastflow.kernels.numba.coupling._sum8>` sums one: eight float64 partials, partial ``l``
adding elements ``l, l+8, l+16, ...`` in order, the elements past the last multiple of eight
added to partial 0, then ``((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7))``. The partials
are one ``<8 x double>`` vector per run, so each step is one load, one widening and one vector
add per run, and the ``R`` runs' adds are independent, which hides the add latency: a lone
run is a chain of dependent adds. (The SLP vectoriser, given the same sums written as
scalar code for four runs, grouped the partials across runs and shuffled: 130 and 50 cycles
per 64-element float32 row, against ~12 here.) The results are bitwise those of the
scalar definition on every machine: the operations and their order are fixed, only their
packing differs; ``tests/ops/test_numba_math.py`` checks it.

As with ``_math``: numba's on-disk cache keys a kernel on its own source file only, so after
editing this module delete the ``__pycache__/*.nbi|*.nbc`` files of the kernels that use it.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_LANES = 8


def _make_sum8_runs(nruns: int):
    @intrinsic
    def sum8_runs(typingctx, v, o, n, d):
        """``(sum8(v, o + r*d, n) for r < nruns)`` as a tuple of float64; ``v`` a 1-D C-contiguous
        float32 or float64 array, ``o`` and ``d`` element offsets (unsigned), ``n`` the run
        length; no bounds checks (as numba's own indexing)."""
        # 1-D C-contiguous only: the runs are addressed from the data pointer, not through strides.
        if not (isinstance(v, types.Array) and v.ndim == 1 and v.layout == "C"
                and v.dtype in (types.float32, types.float64)):
            return None
        if not all(isinstance(a, types.Integer) for a in (o, n, d)):
            return None
        sig = types.UniTuple(types.float64, nruns)(v, o, n, d)

        def codegen(context, builder, signature, args):
            vty = signature.args[0]
            arr = context.make_array(vty)(context, builder, args[0])
            i64 = ir.IntType(64)
            o_, n_, d_ = (context.cast(builder, a, t, types.uint64) for a, t in zip(args[1:], signature.args[1:]))
            elt = context.get_data_type(vty.dtype)
            f64 = ir.DoubleType()
            vec_in = ir.VectorType(elt, _LANES)
            vec64 = ir.VectorType(f64, _LANES)
            align = context.get_abi_sizeof(elt)
            zero = ir.Constant(vec64, [0.0] * _LANES)
            accs = [cgutils.alloca_once_value(builder, zero) for _ in range(nruns)]
            bases = [builder.add(o_, builder.mul(d_, ir.Constant(i64, r))) for r in range(nruns)]
            n8 = builder.udiv(n_, ir.Constant(i64, _LANES))
            with cgutils.for_range(builder, n8) as loop:
                j = builder.mul(loop.index, ir.Constant(i64, _LANES))
                for acc, base in zip(accs, bases):
                    ptr = builder.gep(arr.data, [builder.add(base, j)])
                    x = builder.load(builder.bitcast(ptr, vec_in.as_pointer()), align=align)
                    if elt != f64:
                        x = builder.fpext(x, vec64)
                    builder.store(builder.fadd(builder.load(acc), x), acc)
            start = builder.mul(n8, ir.Constant(i64, _LANES))
            with cgutils.for_range(builder, n_, start=start) as tail:
                j = tail.index
                for acc, base in zip(accs, bases):
                    x = builder.load(builder.gep(arr.data, [builder.add(base, j)]))
                    if elt != f64:
                        x = builder.fpext(x, f64)
                    a = builder.load(acc)
                    lane0 = builder.fadd(builder.extract_element(a, ir.Constant(i64, 0)), x)
                    builder.store(builder.insert_element(a, lane0, ir.Constant(i64, 0)), acc)
            sums = []
            for acc in accs:
                a = builder.load(acc)
                p = [builder.extract_element(a, ir.Constant(i64, k)) for k in range(_LANES)]
                left = builder.fadd(builder.fadd(p[0], p[1]), builder.fadd(p[2], p[3]))
                right = builder.fadd(builder.fadd(p[4], p[5]), builder.fadd(p[6], p[7]))
                sums.append(builder.fadd(left, right))
            return context.make_tuple(builder, signature.return_type, sums)

        return sig, codegen

    return sum8_runs


sum8_runs4 = _make_sum8_runs(4)
sum8_runs1 = _make_sum8_runs(1)
