"""Files for the batch commands: atomic writes, and row-oriented reading of .npy/.npz/.csv data.

Rows are indexed from 0 in file order. For .csv, a first line with no numeric field at all is a
header (not a row) and its use is reported; a first line mixing numbers and anything else is a
row like any other (a bad one if it does not parse); ``header="yes"|"no"`` forces either reading.
Whitespace-only lines are not rows. ``.npy`` is memory-mapped, so files larger
than memory stream; ``.npz`` members cannot be memory-mapped (they are zip members) and are read
whole; ``.csv`` is streamed in chunks of lines.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
from dataclasses import dataclass, field
from io import BytesIO
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


# --------------------------------------------------------------------------- space and write errors

# A full disk, a full quota, a file-size limit: the user can fix these, so they are one line.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _fmt_bytes(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"  # pragma: no cover


def free_bytes(path: str | Path) -> int | None:
    """Free bytes (for this user) on the filesystem holding ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def check_free_space(path: str | Path, nbytes: int, what: str = "output") -> None:
    """Refuse, before any work, to write ``nbytes`` to ``path`` when its filesystem has less free."""
    free = free_bytes(Path(path).parent)
    if free is not None and nbytes > free:
        raise CLIError(f"{what} {path} needs {_fmt_bytes(nbytes)} but its filesystem has {_fmt_bytes(free)} free; "
                       "free some space or choose another location")


def write_error(path: str | Path, e: OSError) -> CLIError:
    """A one-line error for a failed write of ``path``, with the free space when the disk is full."""
    reason = e.strerror or str(e)
    if e.errno in DISK_FULL_ERRNOS:
        free = free_bytes(Path(path).parent)
        if free is not None:
            reason += f" ({_fmt_bytes(free)} free)"
    return CLIError(f"cannot write {path}: {reason}")


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def replace_into(tmp: str | Path, path: str | Path) -> Path:
    """``os.replace(tmp, path)``; on failure (an immutable or foreign file, a read-only folder) the
    temporary file is removed and the error is one line. ``path`` is left as it was."""
    tmp, path = Path(tmp), Path(path)
    try:
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise CLIError(f"cannot replace {path}: {e.strerror or e}; nothing was written") from None
    return path


def atomic_torch_save(obj, path: str | Path, keep_previous: str | Path | None = None) -> Path:
    """``torch.save`` to a temporary file, fsync, then ``os.replace``: a reader (or a restarted job
    after SIGKILL) sees the old file or the new one, never a torn one.

    ``keep_previous``: the file ``path`` held until now is kept under this name (a hard link, or a
    copy where links are not supported), so a later-damaged ``path`` has a good predecessor. At
    every moment ``path`` is whole (old or new)."""
    import torch

    path = Path(path)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        _unlink_quietly(tmp)
        if isinstance(e, RuntimeError) and not _is_write_failure(e):
            raise
        raise write_error(path, e if isinstance(e, OSError) else OSError(errno.EIO, str(e).splitlines()[0])
                          ) from None
    if keep_previous is not None and path.is_file():
        prev = Path(keep_previous)
        ptmp = tmp_path(prev)
        try:
            ptmp.unlink(missing_ok=True)
            try:
                os.link(path, ptmp)
            except OSError:
                shutil.copy2(path, ptmp)
        except OSError as e:
            _unlink_quietly(ptmp)
            _unlink_quietly(tmp)
            raise write_error(prev, e) from None
        replace_into(ptmp, prev)
    replace_into(tmp, path)
    _fsync_dir(path)
    return path


def _is_write_failure(e: RuntimeError) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("write", "no space", "file too large", "quota"))


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
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        _unlink_quietly(tmp)
        raise write_error(path, e) from None
    return replace_into(tmp, path)


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
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        _unlink_quietly(tmp)
        raise write_error(path, e) from None
    return replace_into(tmp, path)


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
# UTF-8, with or without the byte-order mark that spreadsheet exports put first (it is not data).
CSV_ENCODING = "utf-8-sig"


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
            with open(path, encoding=CSV_ENCODING) as f:
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
            with open(path, encoding=CSV_ENCODING) as f:
                lines = (ln for ln in f if ln.strip())
                if self.header:
                    next(lines)
                width = len(next(lines).split(","))
        self.row_shape = (int(width),)

    def _lines(self):
        with open(self.path, encoding=CSV_ENCODING) as f:
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


class NpyWriter:
    """A .npy file of known shape written with positioned writes (``os.pwrite``), not through a
    memory map: constant memory for any size, and a full disk is an ``OSError`` (ENOSPC) at the
    write that hits it, never a SIGBUS on a page store. The space is reserved up front where the
    filesystem can (``posix_fallocate``), so a disk that cannot hold the file fails before any work.

    ``write(row, array)`` puts ``array`` at row ``row``; ``close()`` flushes; ``abort()`` removes
    the file. Errors are :class:`CLIError` naming ``label`` (the output the user asked for)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype, label: str | Path | None = None):
        self.path = Path(path)
        self.label = Path(label) if label is not None else self.path
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        buf = BytesIO()
        np.lib.format.write_array_header_1_0(buf, header)
        self.header = buf.getvalue()
        self.nbytes = len(self.header) + self.shape[0] * self.row_bytes
        check_free_space(self.label, self.nbytes)
        self.fd = None
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
            self._pwrite(self.header, 0)
            try:
                os.posix_fallocate(self.fd, 0, self.nbytes)
            except AttributeError:  # not on this platform
                os.ftruncate(self.fd, self.nbytes)
            except OSError as e:
                if e.errno in DISK_FULL_ERRNOS:
                    raise
                os.ftruncate(self.fd, self.nbytes)  # a filesystem without fallocate: writes report ENOSPC
        except OSError as e:
            self.abort()
            raise write_error(self.label, e) from None

    def _pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def write(self, row: int, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array, dtype=self.dtype)
        try:
            self._pwrite(data.reshape(-1).view(np.uint8), len(self.header) + int(row) * self.row_bytes)
        except OSError as e:
            self.abort()
            raise write_error(self.label, e) from None

    def close(self) -> None:
        if self.fd is None:
            return
        try:
            os.fsync(self.fd)
        except OSError as e:
            self.abort()
            raise write_error(self.label, e) from None
        os.close(self.fd)
        self.fd = None

    def abort(self) -> None:
        """Close and remove the (partial) file; it is ours."""
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        _unlink_quietly(self.path)


def merge_shards(shards: list[Path], out: Path, chunk_rows: int = 1 << 16) -> Path:
    """Concatenate per-rank .npy shards (in rank order) into ``out``: written to a temporary file
    chunk by chunk, then renamed into place; the shards are removed (also when the merge fails)."""
    arrays = [np.load(p, mmap_mode="r") for p in shards]
    total = sum(len(a) for a in arrays)
    tmp = tmp_path(out)
    try:
        dst = NpyWriter(tmp, (total, *arrays[0].shape[1:]), arrays[0].dtype, label=out)
        row = 0
        for a in arrays:
            for i in range(0, len(a), chunk_rows):
                part = a[i:i + chunk_rows]
                dst.write(row, part)
                row += len(part)
        dst.close()
        del arrays
        replace_into(tmp, out)
    finally:
        for p in shards:
            _unlink_quietly(p)
    return out
