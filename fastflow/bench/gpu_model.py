"""``fastflow bench gpu-model``: a resource and roofline model of every GPU kernel, without a GPU.

Each Triton kernel is compiled for sm_90 from the launchers' own specs (the same
``triton.compile(ASTSource(...), GPUTarget("cuda", 90, 32))`` as the ahead-of-time test) and
each csrc/ kernel with ``nvcc -cubin -arch=sm_90`` when nvcc is on the PATH. From the cubin:

- registers per thread and stack (spill) bytes (``cuobjdump -res-usage``), shared memory;
- predicted occupancy on an H100/H200 SM (65,536 registers, 64 warps, 32 blocks, 228 KB shared
  memory; registers are allocated per warp in units of 256);
- the instruction mix from the SASS (``cuobjdump -sass``): FP32, FP64, MUFU (the special-function
  unit), global loads/stores, local-memory (spill) loads/stores, shuffles, everything else. The
  spline and coupling programs have no loop at the modelled sizes (one row tile), so a static
  count times the program's threads over its elements is the per-element count; the CUDA kernels
  loop over the bins at run time, so theirs is per loop body and marked ``static_only``;
- bytes per element: what the op must read and write (each input once, each output once; the
  spline's two derivative gathers counted as 32-byte sectors);
- predicted time at 2^24 elements on H100 SXM and H200: the largest of bytes / HBM bandwidth
  (scaled down where too few bytes are in flight per SM for Little's law), FP32, FP64 and MUFU
  instructions over their rates, and all instructions over the issue rate.

Rates are datasheet leads (H200.md, HOPPER.md); the device suite (``benchmarks/gpu_suite.py``)
measures the copy bandwidth and plots measured time against this prediction.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import torch

SUITE = "gpu-model"
N_MODEL = 2**24
TABLE_COLUMNS = ["op", "impl", "mode", "k", "dtype", "registers", "stack_bytes", "occupancy", "bytes_per_element",
                 "fp32_per_element", "mufu_per_element", "h100_pred_us", "h100_hbm_fraction", "bound"]

# Per-GPU leads: SMs, boost clock, HBM bandwidth (H200.md: 4.8 TB/s; H100 SXM 3.35 TB/s).
GPUS = {
    "H100 SXM": dict(sms=132, clock_hz=1.98e9, hbm_bytes_s=3.35e12),
    "H200": dict(sms=132, clock_hz=1.98e9, hbm_bytes_s=4.8e12),
}
SM = dict(regs=65536, max_warps=64, max_blocks=32, smem=228 * 1024, reg_unit=256,
          fp32_lanes=128, fp64_lanes=64, mufu_lanes=16, issue_lanes=128)
LATENCY_S = 700e-9  # DRAM latency lead for Little's law (bytes in flight needed = bandwidth x latency)

_CLASSES = {
    "fp32": {"FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSET", "FSETP", "FCHK", "FRND", "FSWZADD"},
    "fp64": {"DADD", "DMUL", "DFMA", "DSETP", "DMNMX"},
    "mufu": {"MUFU"},
    "global_load": {"LDG"},
    "global_store": {"STG", "RED", "ATOMG"},
    "local": {"LDL", "STL"},
    "shared": {"LDS", "STS", "LDSM"},
    "shuffle": {"SHFL"},
}
_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9]*)")


def instruction_mix(sass: str) -> dict:
    """Counts of each instruction class in a SASS listing (``cuobjdump -sass``)."""
    ops = Counter(m.group(1) for m in map(_SASS_LINE.search, sass.splitlines()) if m)
    ops.pop("NOP", None)
    out = {cls: sum(ops[o] for o in names) for cls, names in _CLASSES.items()}
    out["total"] = sum(ops.values())
    return out


def occupancy(registers: int, threads: int, smem: int = 0) -> dict:
    """Blocks and warps an SM holds for a kernel of ``registers`` per thread, ``threads`` per block."""
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(max(registers, 1) * 32 / SM["reg_unit"]) * SM["reg_unit"]
    by_regs = SM["regs"] // (per_warp * warps)
    by_smem = SM["smem"] // smem if smem else SM["max_blocks"]
    blocks = max(0, min(SM["max_blocks"], SM["max_warps"] // warps, by_regs, by_smem))
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps, "occupancy": blocks * warps / SM["max_warps"]}


def roofline(bytes_el: float, mix_el: dict, occ: dict, read_bytes_per_block: float, n: int = N_MODEL) -> dict:
    """Predicted time of ``n`` elements on each GPU and which bound sets it."""
    out = {}
    for gpu, g in GPUS.items():
        lanes = g["sms"] * g["clock_hz"]
        in_flight = occ["blocks_per_sm"] * read_bytes_per_block  # every load of a program issued up front
        need = g["hbm_bytes_s"] / g["sms"] * LATENCY_S
        bw = g["hbm_bytes_s"] * min(1.0, in_flight / need) if need else g["hbm_bytes_s"]
        times = {
            "memory": n * bytes_el / bw if bw else math.inf,
            "fp32": n * mix_el.get("fp32", 0) / (SM["fp32_lanes"] * lanes),
            "fp64": n * mix_el.get("fp64", 0) / (SM["fp64_lanes"] * lanes),
            "mufu": n * mix_el.get("mufu", 0) / (SM["mufu_lanes"] * lanes),
            "issue": n * mix_el.get("total", 0) / (SM["issue_lanes"] * lanes),
        }
        bound = max(times, key=times.get)
        t = times[bound]
        floor = n * bytes_el / g["hbm_bytes_s"]
        out[gpu] = {"pred_s": t, "bound": bound, "times_s": times, "hbm_floor_s": floor,
                    "hbm_fraction": floor / t if t else None, "bytes_in_flight_per_sm": in_flight,
                    "bytes_in_flight_needed": need}
    return out


# --------------------------------------------------------------------------------------------
# The kernels modelled: (op, mode, spec, elements per program, bytes per element, read bytes per program)
# --------------------------------------------------------------------------------------------


def _size(dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _spline_cases(ks=(8, 64), dtypes=(torch.float32, torch.float64)):
    from fastflow.kernels.triton import spline

    for dtype in dtypes:
        s = _size(dtype)
        for k in ks:
            gather = 2 * min((k - 1) * s, 32)  # two derivatives per element, one sector each
            for mode, inverse, backward in (("forward", False, False), ("inverse", True, False),
                                            ("backward", False, True)):
                spec = spline.launch_spec(k, dtype, inverse, backward)
                rows = dict(spec.constexprs)["BLOCK"]
                if backward:
                    read = (3 + 2 * k) * s + gather
                    nbytes = read + (1 + 2 * k + (k - 1)) * s
                else:
                    read = (1 + 2 * k) * s + gather
                    nbytes = read + 2 * s
                yield dict(op="rq_spline", mode=mode, k=k, dtype=dtype, spec=spec, elements=rows,
                           bytes_per_element=nbytes, read_per_program=rows * read)


def _coupling_cases(dtypes=(torch.float32, torch.float64)):
    from fastflow.kernels.triton import coupling

    f, b = 1024, 2**14  # one 1024-wide tile per row: the program runs its loop once
    contiguous = (f, f, 1)
    for dtype in dtypes:
        s = _size(dtype)
        for kind in ("exp", "softclamp", "sigmoid"):
            spec = coupling.coupling_spec("affine_fwd", dtype, b, 1, f, (contiguous,) * 3, kind, False)
            rows = dict(spec.constexprs)["ROWS"]
            yield dict(op=f"affine_coupling[{kind}]", mode="forward", k=None, dtype=dtype, spec=spec,
                       elements=rows * f, bytes_per_element=4 * s, read_per_program=rows * f * 3 * s)
            spec = coupling.coupling_spec("affine_bwd", dtype, b, 1, f, (contiguous, 1) + (contiguous,) * 3, kind,
                                          False)
            yield dict(op=f"affine_coupling[{kind}]", mode="backward", k=None, dtype=dtype, spec=spec,
                       elements=rows * f, bytes_per_element=5 * s, read_per_program=rows * f * 3 * s)
        spec = coupling.coupling_spec("additive_fwd", dtype, b, 1, f, (contiguous,) * 2, None, False)
        rows = dict(spec.constexprs)["ROWS"]
        yield dict(op="additive_coupling", mode="forward", k=None, dtype=dtype, spec=spec, elements=rows * f,
                   bytes_per_element=3 * s, read_per_program=rows * f * 2 * s)


def _lu_cases():
    from fastflow.kernels.triton import lu

    c, hw, b = 48, 1024, 64
    spec = lu.lu_spec("apply", c, torch.float32, False, dict(NTOT=b * hw, C=c, HW=hw, stride_ao=c, stride_ak=1))
    cx = dict(spec.constexprs)
    # one program: BN pixels x BO outputs, reading BN x C inputs; per output element
    per = cx["BN"] * min(cx["BO"], c)
    yield dict(op="lu_conv1x1", mode="forward", k=c, dtype=torch.float32, spec=spec, elements=per,
               bytes_per_element=2 * 4, read_per_program=cx["BN"] * c * 4, loops=True)


def _triton_rows(cases, cc=90):
    from fastflow.kernels.triton._aot import compile_spec, cubin_tool

    for case in cases:
        spec = case.pop("spec")
        kernel = compile_spec(spec, cc)
        usage = cubin_tool(kernel.asm["cubin"], "-res-usage")
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
        regs, stack, shared_static = int(m[1]), int(m[2]), int(m[3])
        smem = max(int(getattr(kernel.metadata, "shared", 0) or 0), shared_static)
        mix = instruction_mix(cubin_tool(kernel.asm["cubin"], "-sass"))
        threads = 32 * spec.num_warps
        yield _row(case, "triton", spec.label, regs, stack, smem, threads, mix, static_only=bool(case.pop("loops", 0)))


def _row(case, impl, label, regs, stack, smem, threads, mix, static_only):
    occ = occupancy(regs, threads, smem)
    per_el = {k: v * threads / case["elements"] for k, v in mix.items()}
    roof = roofline(case["bytes_per_element"], per_el, occ, case["read_per_program"])
    dtype = case["dtype"]
    return {
        "op": case["op"], "impl": impl, "mode": case["mode"], "n": N_MODEL, "k": case["k"],
        "dtype": str(dtype).replace("torch.", ""), "kernel": label, "registers": regs, "stack_bytes": stack,
        "shared_bytes": smem, "threads_per_block": threads, **occ, "sass_static": mix,
        "per_element": per_el, "static_only": static_only, "bytes_per_element": case["bytes_per_element"],
        "fp32_per_element": per_el["fp32"], "mufu_per_element": per_el["mufu"], "roofline": roof,
        "h100_pred_us": roof["H100 SXM"]["pred_s"] * 1e6, "h100_hbm_fraction": roof["H100 SXM"]["hbm_fraction"],
        "h200_pred_us": roof["H200"]["pred_s"] * 1e6, "h200_hbm_fraction": roof["H200"]["hbm_fraction"],
        "bound": roof["H100 SXM"]["bound"],
    }


def _cuda_rows(cc=90):
    """csrc/rq_spline.cu's float32 kernels through nvcc (when present), same flags as setup.py."""
    nvcc = shutil.which(os.environ.get("NVCC", "nvcc"))
    src = Path(__file__).resolve().parents[2] / "csrc" / "rq_spline.cu"
    if not nvcc or not src.exists():
        return []
    from fastflow.kernels.cuda.loader import BLOCK
    from fastflow.kernels.triton._aot import tool

    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "rq_spline.cubin"
        subprocess.run([nvcc, "-std=c++17", "-O3", "-ftz=true", "-I", str(src.parent), f"-arch=sm_{cc}", "-cubin",
                        "-o", str(cubin), str(src)], check=True, capture_output=True, text=True)
        usage = subprocess.run([tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        sass = subprocess.run([tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    found = re.findall(r"Function (\w+):\s*\n\s*REG:(\d+) STACK:(\d+)", usage)
    res = {f: (int(r), int(st)) for f, r, st in found}
    funcs = re.split(r"\n\s*Function : ", sass)
    mixes = {f.split("\n", 1)[0].strip(): instruction_mix(f) for f in funcs[1:]}
    rows = []
    for k in (8, 64):
        s = 4
        gather = 2 * min((k - 1) * s, 32)
        for mode, fn in (("forward", "rq_spline_fwd_f32"), ("inverse", "rq_spline_fwd_f32"),
                         ("backward", "rq_spline_bwd_f32")):
            if fn not in res:
                continue
            regs, stack = res[fn]
            backward = mode == "backward"
            read = ((3 + 2 * k) if backward else (1 + 2 * k)) * s + gather
            nbytes = read + ((1 + 2 * k + (k - 1)) * s if backward else 2 * s)
            case = dict(op="rq_spline", mode=mode, k=k, dtype=torch.float32, elements=BLOCK,
                        bytes_per_element=nbytes, read_per_program=BLOCK * read)
            # one element per thread, loops over K at run time: static counts are per loop body
            rows.append(_row(case, "cuda", fn, regs, stack, 0, BLOCK, mixes.get(fn, {"total": 0, "fp32": 0,
                                                                                     "mufu": 0}), True))
    return rows


def gpu_backend_order(rows) -> list[str]:
    """The model's GPU backend order for the spline: triton first unless the CUDA kernels are
    predicted more than 10% faster at float32 K=8 (forward and backward summed); the CUDA
    kernels' static-only instruction counts are excluded from their bound (memory and
    occupancy decide)."""
    def total(impl):
        sel = [r for r in rows if r["impl"] == impl and r["op"] == "rq_spline" and r["k"] == 8
               and r["dtype"] == "float32" and r["mode"] in ("forward", "backward")]
        if len(sel) < 2:
            return None
        t = 0.0
        for r in sel:
            times = r["roofline"]["H100 SXM"]["times_s"]
            t += times["memory"] if r["static_only"] else r["roofline"]["H100 SXM"]["pred_s"]
        return t

    tt, tc = total("triton"), total("cuda")
    if tc is not None and tt is not None and tc < 0.9 * tt:
        return ["cuda", "triton"]
    return ["triton", "cuda"]


def run(device="cpu", sizes=None, repeats=None, quick=False, **_):
    """Rows for ``fastflow bench``: one per kernel (no timing; ``device`` is ignored)."""
    ks = (8,) if quick else (8, 64)
    dtypes = (torch.float32,) if quick else (torch.float32, torch.float64)
    cases = list(_spline_cases(ks, dtypes)) + list(_coupling_cases(dtypes)) + ([] if quick else list(_lu_cases()))
    rows = list(_triton_rows(cases))
    if not quick:
        rows += _cuda_rows()
    order = gpu_backend_order(rows)
    for r in rows:
        r["median_s"] = None
        r["model_gpu_backend_order"] = order
    return rows


def after(rows, json_path):
    """The plot next to the JSON: predicted time per element on H100/H200 against the HBM floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastflow.bench import save_figure

    labels = [f"{r['impl']} {r['op']} {r['mode']}\n{r['dtype']}{'' if r['k'] is None else ' K=%d' % r['k']}"
              for r in rows]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.45 * len(rows) + 2), 5.0))
    xs = range(len(rows))
    for off, gpu, color in ((-0.2, "H100 SXM", "tab:blue"), (0.2, "H200", "tab:orange")):
        pred = [r["roofline"][gpu]["pred_s"] / N_MODEL * 1e9 for r in rows]
        floor = [r["roofline"][gpu]["hbm_floor_s"] / N_MODEL * 1e9 for r in rows]
        ax.bar([x + off for x in xs], pred, 0.4, color=color, alpha=0.8, label=f"{gpu} predicted")
        ax.scatter([x + off for x in xs], floor, marker="_", s=120, color="black",
                   label="HBM floor" if gpu == "H100 SXM" else None, zorder=3)
    ax.set_yscale("log")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.set_ylabel("predicted ns per element (2^24 elements)")
    ax.set_title("fastflow GPU kernels: roofline prediction from the sm_90 compile", fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return [save_figure(fig, Path(json_path).with_suffix(".png"), dpi=110)]
