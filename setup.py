"""Build script. A plain install is pure Python; with FASTFLOW_CUDA_ARCHS set (e.g. "80;90") and
nvcc on PATH, the CUDA kernels in csrc/ are compiled ahead of time into a fatbin shipped inside
the package, which the CUDA backend prefers to run-time compilation.

- ``csrc/*.cu`` and ``csrc/*.cuh`` are copied into the built package as ``fastflow/csrc/`` (what
  the run-time NVRTC path compiles in an installed package) and into sdists.
- ``FASTFLOW_CUDA_ARCHS="80;90"`` (``;``, ``,`` or spaces between compute capabilities, e.g.
  ``80``, ``86``, ``90``, ``100``): one ``fastflow/kernels/cuda/<op>.<digest>.<archs>.ptx<max>.fatbin``
  per ``csrc/<op>.cu``, holding SASS for every listed arch and PTX for the highest (which the
  driver can JIT for newer GPUs). The name format and the digest are those of
  ``fastflow/kernels/cuda/loader.py``, which picks the fatbin only when it matches the device and
  the shipped sources.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py as _build_py
from setuptools.command.sdist import sdist as _sdist

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
HEADER = "fastflow.cuh"
ENV = "FASTFLOW_CUDA_ARCHS"
# -ftz=true matches CuPy's NVRTC options, so the ahead-of-time and run-time kernels compute the same.
NVCC_FLAGS = ["-std=c++17", "-O3", "-ftz=true"]

_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.MULTILINE)


def _csrc_files() -> list[Path]:
    return sorted(p for p in CSRC.glob("*") if p.suffix in (".cu", ".cuh")) if CSRC.is_dir() else []


def parse_archs(value: str) -> list[int]:
    """``"80;90"`` -> ``[80, 90]``; raises ValueError naming the bad entry."""
    archs = []
    for item in re.split(r"[;,\s]+", value.strip()):
        if not item:
            continue
        a = item.lower().removeprefix("sm_").removeprefix("compute_")
        if not re.fullmatch(r"[1-9][0-9]", a) and not re.fullmatch(r"1[0-9]{2}", a):
            raise ValueError(
                f"{ENV}={value!r}: {item!r} is not a compute capability; expected numbers such as "
                f"'80;86;90' (major*10 + minor, no 'a'/'f' suffixes)"
            )
        if int(a) < 50:
            raise ValueError(f"{ENV}={value!r}: sm_{a} is older than any GPU the CUDA 12/13 toolkits target")
        archs.append(int(a))
    if not archs:
        raise ValueError(f"{ENV}={value!r} lists no architectures; unset it for a pure-Python build")
    return sorted(set(archs))


def _source_text(op: str) -> str:
    """``<op>.cu`` with local includes pasted in: the text whose digest names the fatbin (the
    loader computes the same from the shipped sources)."""
    seen: set[str] = set()

    def expand(name: str) -> str:
        text = (CSRC / name).read_text()

        def sub(m):
            inc = m.group(1)
            if inc in seen:
                return f"// {inc}: already included"
            seen.add(inc)
            return f"// ---- begin {inc}\n{expand(inc)}\n// ---- end {inc}"

        return _INCLUDE_RE.sub(sub, text)

    return expand(f"{op}.cu")


def build_fatbins(out_dir: Path, archs: list[int], nvcc: str) -> list[Path]:
    """Compile each ``csrc/<op>.cu`` into ``out_dir``; returns the fatbins written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    gencode = []
    for a in archs:
        code = f"[sm_{a},compute_{a}]" if a == archs[-1] else f"sm_{a}"
        gencode += ["-gencode", f"arch=compute_{a},code={code}"]
    written = []
    for src in sorted(CSRC.glob("*.cu")):
        op = src.stem
        digest = hashlib.sha256(_source_text(op).encode()).hexdigest()[:16]
        name = f"{op}.{digest}.{'-'.join(map(str, archs))}.ptx{archs[-1]}.fatbin"
        for old in out_dir.glob(f"{op}.*.fatbin"):  # a stale build of another source or arch list
            old.unlink()
        cmd = [nvcc, *NVCC_FLAGS, "-fatbin", "-I", str(CSRC), *gencode, "-o", str(out_dir / name), str(src)]
        print("fastflow: " + shlex.join(cmd), flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(
                f"fastflow: nvcc failed on {src.name} (exit {res.returncode}):\n{res.stdout}{res.stderr}"
            )
        written.append(out_dir / name)
    return written


def _aot_archs() -> tuple[list[int], str] | None:
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    archs = parse_archs(value)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError(
            f"{ENV}={value!r} asks for ahead-of-time CUDA kernels, but nvcc is not on PATH; install the "
            f"CUDA toolkit (or add its bin/ to PATH), or unset {ENV} for a pure-Python build"
        )
    return archs, nvcc


class build_py(_build_py):
    """Ship csrc/ as fastflow/csrc/; with FASTFLOW_CUDA_ARCHS, also build the fatbins."""

    def run(self):
        aot = _aot_archs()  # validate before building anything
        super().run()
        editable = getattr(self, "editable_mode", False)
        if not editable:
            dst = Path(self.build_lib) / "fastflow" / "csrc"
            dst.mkdir(parents=True, exist_ok=True)
            for f in _csrc_files():
                self.copy_file(str(f), str(dst / f.name))
        if aot is None:
            if not editable:  # a plain build ships no binaries, not even one an earlier build left in build/
                for old in (Path(self.build_lib) / "fastflow" / "kernels" / "cuda").glob("*.fatbin"):
                    old.unlink()
        else:
            archs, nvcc = aot
            # An editable install imports the source tree, so the fatbins go there (*.fatbin is
            # git-ignored); a regular build puts them in the wheel's package folder.
            base = ROOT if editable else Path(self.build_lib)
            build_fatbins(base / "fastflow" / "kernels" / "cuda", archs, nvcc)


class sdist(_sdist):
    """Put csrc/ into source distributions, so that a wheel built from one ships the sources."""

    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        dst = Path(base_dir) / "csrc"
        dst.mkdir(parents=True, exist_ok=True)
        for f in _csrc_files():
            self.copy_file(str(f), str(dst / f.name))


setup(cmdclass={"build_py": build_py, "sdist": sdist})
