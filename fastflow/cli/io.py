"""Files for the batch commands: atomic writes, and row-oriented reading of .npy/.npz/.csv data.

Rows are indexed from 0 in file order. For .csv, a first line with no numeric field at all is a
header (not a row) and its use is reported; a first line mixing numbers and anything else is a
row like any other (a bad one if it does not parse); ``header="yes"|"no"`` forces either reading.
Whitespace-only lines are not rows. ``.npy`` is memory-mapped, so files larger
than memory stream; ``.npz`` members cannot be memory-mapped (they are zip members) and are read
whole; ``.csv`` is streamed in chunks of lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from fastflow.cli.errors import CLIError

DATA_SUFFIXES = (".npy", ".npz", ".csv")


# --------------------------------------------------------------------------- atomic writes


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


def tmp_path(path: Path) -> Path:
    """``.NAME.tmp-HOST-PID`` beside ``path``: whose it is, so a later run can tell a stale one."""
    return path.with_name(f".{path.name}.tmp-{_host()}-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or we cannot tell: keep the file
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary files a killed run of ours left for ``path`` (``.NAME.tmp-HOST-PID``,
    or ``.NAME.tmp-PID`` from before hosts were recorded): only files of this host whose process
    is gone. Files of other hosts or of live processes are left alone. Returns what was removed."""
    path = Path(path)
    pattern = re.compile(r"^\." + re.escape(path.name) + r"\.tmp-(?:(?P<host>[A-Za-z0-9-]+)-)?(?P<pid>[0-9]+)$")
    removed = []
    try:
        candidates = list(path.parent.iterdir()) if path.parent.is_dir() else []
    except OSError:
        return removed
    here = _host()
    for cand in candidates:
        m = pattern.match(cand.name)
        if not m or (m.group("host") not in (None, here)):
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid() or _pid_alive(pid) or not cand.is_file() or cand.is_symlink():
            continue
        try:
            cand.unlink()
            removed.append(cand)
        except OSError:
            pass
    return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj, path: str | Path, keep_previous: str | Path | None = None) -> Path:
    """``torch.save`` to a temporary file, fsync, then ``os.replace``: a reader (or a restarted job
    after SIGKILL) sees the old file or the new one, never a torn one.

    ``keep_previous``: the file ``path`` held until now is kept under this name (a hard link, or a
    copy where links are not supported), so a later-damaged ``path`` has a good predecessor. At
    every moment ``path`` is whole (old or new)."""
    import torch

    path = Path(path)
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous is not None and path.is_file():
        prev = Path(keep_previous)
        ptmp = tmp_path(prev)
        ptmp.unlink(missing_ok=True)
        try:
            os.link(path, ptmp)
        except OSError:
            shutil.copy2(path, ptmp)
        os.replace(ptmp, prev)
    os.replace(tmp, path)
    _fsync_dir(path)
    return path


def file_fingerprint(path: str | Path, chunk: int = 1 << 22) -> dict:
    """``{"size": bytes, "sha256": hex}`` of a file, hashed in a stream (constant memory)."""
    path = Path(path)
    h = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while True:
                block = f.read(chunk)
                if not block:
                    break
                h.update(block)
                size += len(block)
    except OSError as e:
        raise CLIError(f"cannot read data file {path}: {e.strerror or e}") from None
    return {"size": size, "sha256": h.hexdigest()}


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    tmp = tmp_path(path)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_json(path: str | Path, payload) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def atomic_save_npy(path: str | Path, array: np.ndarray) -> Path:
    path = Path(path)
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_output_file(path: str | Path, overwrite: bool, inputs: tuple = ()) -> Path:
    """Validate an output ``.npy`` path before any work: not one of ``inputs``, not an existing
    file unless ``overwrite``, in a folder that exists (created if needed) and is writable. Stale
    temporary files of a killed earlier run for this output are removed."""
    path = Path(path)
    if path.suffix != ".npy":
        raise CLIError(f"output {path} must be a .npy file")
    for src in inputs:
        if src is not None and _same_file(path, Path(src)):
            raise CLIError(f"output {path} is the input file {src}; writing it would destroy the input; choose "
                           "another --out")
    if path.is_dir():
        raise CLIError(f"output {path} is a directory")
    if path.exists() and not overwrite:
        raise CLIError(f"output {path} exists; pass --overwrite to replace it")
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CLIError(f"cannot create the folder of output {path}: {e.strerror or e}") from None
    if not parent.is_dir():
        raise CLIError(f"cannot write output {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"cannot write output {path}: folder {parent} is not writable")
    remove_stale_temps(path)
    return path


# --------------------------------------------------------------------------- reading rows


@dataclass
class BadRows:
    """Bad rows found while reading: index -> reason. Never dropped silently."""

    rows: dict[int, str] = field(default_factory=dict)

    def add(self, index: int, reason: str) -> None:
        self.rows.setdefault(int(index), reason)

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self, limit: int = 10) -> str:
        items = sorted(self.rows.items())
        head = ", ".join(f"{i} ({r})" for i, r in items[:limit])
        more = f" and {len(items) - limit} more" if len(items) > limit else ""
        return f"{len(items)} bad row(s): {head}{more}"


def nonfinite_rows(chunk: np.ndarray) -> np.ndarray:
    """Row positions (within the chunk) holding NaN or Inf."""
    flat = chunk.reshape(len(chunk), -1)
    return np.flatnonzero(~np.isfinite(flat).all(axis=1))


def _open_error(path: Path, e: Exception) -> CLIError:
    reason = getattr(e, "strerror", None) or str(e)
    return CLIError(f"cannot read data file {path}: {reason}")


class RowSource:
    """Uniform chunked row access to a data file: ``len``, ``width``/``row_shape`` and
    ``chunks(start, stop, size)`` yielding ``(first_row, float array, BadRows)``."""

    path: Path
    n_rows: int
    row_shape: tuple[int, ...]

    def __len__(self) -> int:
        return self.n_rows

    def chunks(self, start: int, stop: int, size: int) -> Iterator[tuple[int, np.ndarray, BadRows]]:
        raise NotImplementedError


class ArraySource(RowSource):
    """A .npy (memory-mapped) or .npz member (in memory)."""

    def __init__(self, path: Path, array: np.ndarray):
        if array.ndim < 1:
            raise CLIError(f"data file {path} holds a scalar, expected rows")
        if array.ndim == 1:
            array = array.reshape(-1, 1)
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise CLIError(f"data file {path} has dtype {array.dtype}, expected numbers")
        self.path = path
        self.array = array
        self.n_rows = int(array.shape[0])
        self.row_shape = tuple(int(s) for s in array.shape[1:])

    def chunks(self, start, stop, size):
        for a in range(start, stop, size):
            b = min(a + size, stop)
            chunk = np.array(self.array[a:b], dtype=np.float32)  # a private copy, never the read-only map
            bad = BadRows()
            for i in nonfinite_rows(chunk):
                bad.add(a + int(i), "NaN/Inf")
            yield a, chunk, bad


CSV_HEADER_CHOICES = ("auto", "yes", "no")


class CsvSource(RowSource):
    """Comma-separated numbers, streamed. The width is the first data row's, or ``width``.

    ``header``: ``"auto"`` (a first line with no numeric field is a header), ``"yes"`` (the first
    line is a header) or ``"no"`` (every line is a row). ``header_line`` is the header taken, if any.
    """

    def __init__(self, path: Path, width: int | None = None, header: str = "auto"):
        if header not in CSV_HEADER_CHOICES:
            raise CLIError(f"csv header mode {header!r}: expected one of {', '.join(CSV_HEADER_CHOICES)}")
        self.path = path
        self.header = False
        self.header_line: str | None = None
        n = 0
        first = None
        try:
            with open(path) as f:
                for line in f:
                    if not line.strip():
                        continue
                    if first is None:
                        first = line
                        if header == "yes" or (header == "auto" and _no_numeric_field(line)):
                            self.header = True
                            self.header_line = line.strip()
                            continue
                    n += 1
        except (OSError, UnicodeDecodeError) as e:
            raise _open_error(path, e) from None
        self.n_rows = n
        if width is None:
            if n == 0:
                raise CLIError(f"data file {path} has no data rows")
            with open(path) as f:
                lines = (ln for ln in f if ln.strip())
                if self.header:
                    next(lines)
                width = len(next(lines).split(","))
        self.row_shape = (int(width),)

    def _lines(self):
        with open(self.path) as f:
            lines = (ln for ln in f if ln.strip())
            if self.header:
                next(lines, None)
            yield from lines

    def chunks(self, start, stop, size):
        width = self.row_shape[0]
        it = self._lines()
        for _ in range(start):
            next(it)
        row = start
        while row < stop:
            block = []
            for _ in range(min(size, stop - row)):
                block.append(next(it))
            yield row, *_parse_block(block, row, width)
            row += len(block)


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _no_numeric_field(line: str) -> bool:
    """A header line: not one of its comma-separated fields is a number."""
    return not any(_is_number(t) for t in line.split(","))


def header_notice(src: RowSource) -> str | None:
    """The line to report when a CSV's first line was taken as a header."""
    line = getattr(src, "header_line", None)
    if line is None:
        return None
    shown = line if len(line) <= 80 else line[:77] + "..."
    return (f"{src.path}: first line taken as a header ({shown!r}), not a row; pass --csv-header no to read it "
            "as a row")


def _parse_block(lines: list[str], first: int, width: int) -> tuple[np.ndarray, BadRows]:
    out = np.full((len(lines), width), np.nan, dtype=np.float32)
    bad = BadRows()
    tokens = [ln.split(",") for ln in lines]
    good = [i for i, t in enumerate(tokens) if len(t) == width]
    for i, t in enumerate(tokens):
        if len(t) != width:
            bad.add(first + i, f"{len(t)} values, expected {width}")
    try:
        if good:
            out[good] = np.array([tokens[i] for i in good], dtype=np.float64)
    except ValueError:  # a token that is not a number: find which rows, one by one
        for i in good:
            try:
                out[i] = np.array(tokens[i], dtype=np.float64)
            except ValueError:
                bad.add(first + i, "not a number")
    for i in nonfinite_rows(out):
        bad.add(first + int(i), "NaN/Inf")
    return out, bad


def open_rows(path: str | Path, npz_key: str | None = None, csv_header: str = "auto") -> RowSource:
    """Open a data file for chunked row reading (``.npy`` memory-mapped)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise CLIError(f"data file {path}: unsupported format {suffix or '(no suffix)'!r}; expected .npy, .npz or .csv")
    if not path.is_file():
        raise CLIError(f"cannot read data file {path}: no such file")
    if suffix == ".csv":
        return CsvSource(path, header=csv_header)
    try:
        if suffix == ".npy":
            return ArraySource(path, np.load(path, mmap_mode="r", allow_pickle=False))
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            key = npz_key or next((k for k in ("x", "data", "test") if k in keys), keys[0] if keys else None)
            if key is None:
                raise CLIError(f"data file {path} is an empty .npz")
            if key not in keys:
                raise CLIError(f"data file {path} has no array {key!r} (has {', '.join(keys)})")
            return ArraySource(path, z[key])
    except CLIError:
        raise
    except Exception as e:  # corrupt header, pickled object array, truncated file, ...
        raise _open_error(path, e) from None


def read_splits_npz(path: Path) -> dict[str, np.ndarray] | None:
    """A .npz with ``train``/``val``/``test`` arrays is taken as already split."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if {"train", "val", "test"} <= set(z.keys()):
                return {k: np.asarray(z[k], dtype=np.float32) for k in ("train", "val", "test")}
    except Exception as e:
        raise _open_error(path, e) from None
    return None


def read_all(path: str | Path, chunk: int = 65536, csv_header: str = "auto", log=None) -> np.ndarray:
    """All rows of a data file for training: a memory map for .npy (checked for NaN/Inf in
    chunks), an in-memory float32 array otherwise. Bad rows are an error listing their indices.
    ``log(msg)`` is told when a CSV header was taken."""
    src = open_rows(path, csv_header=csv_header)
    notice = header_notice(src)
    if notice and log is not None:
        log(notice)
    bad = BadRows()
    if isinstance(src, ArraySource):
        for _, _, b in src.chunks(0, len(src), chunk):
            bad.rows.update(b.rows)
        data = src.array if src.array.ndim > 1 else src.array.reshape(-1, 1)
    else:
        parts = []
        for _, arr, b in src.chunks(0, len(src), chunk):
            parts.append(arr)
            bad.rows.update(b.rows)
        data = np.concatenate(parts) if parts else np.zeros((0, *src.row_shape), np.float32)
    if len(bad):
        raise CLIError(f"data file {src.path}: {bad.summary()}; fix or remove these rows")
    if len(src) == 0:
        raise CLIError(f"data file {src.path} has no rows")
    return data


# --------------------------------------------------------------------------- sharded outputs


def shard_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f".{out.name}.part{rank:05d}-of-{world:05d}.npy")


def open_npy_writer(path: Path, shape: tuple[int, ...], dtype) -> np.memmap:
    """A .npy file opened for writing in place (``open_memmap``): constant memory for any size."""
    try:
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
    except OSError as e:
        Path(path).unlink(missing_ok=True)
        raise CLIError(f"cannot write {path}: {e.strerror or e}") from None


def merge_shards(shards: list[Path], out: Path, chunk_rows: int = 1 << 16) -> Path:
    """Concatenate per-rank .npy shards (in rank order) into ``out``: written to a temporary file
    through a memory map, chunk by chunk, then ``os.replace``; the shards are removed."""
    arrays = [np.load(p, mmap_mode="r") for p in shards]
    total = sum(len(a) for a in arrays)
    tmp = tmp_path(out)
    dst = open_npy_writer(tmp, (total, *arrays[0].shape[1:]), arrays[0].dtype)
    row = 0
    for a in arrays:
        for i in range(0, len(a), chunk_rows):
            part = a[i:i + chunk_rows]
            dst[row:row + len(part)] = part
            row += len(part)
    dst.flush()
    del dst, arrays
    os.replace(tmp, out)
    for p in shards:
        p.unlink(missing_ok=True)
    return out
