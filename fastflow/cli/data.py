"""Training data for ``fastflow fit``: an embedded set (its own train/val/test splits) or a file
(.npy memory-mapped, .npz, .csv) split by a seeded permutation into train/val/test."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastflow.cli.errors import CLIError
from fastflow.cli.io import DATA_SUFFIXES, read_all, read_splits_npz


class Split:
    """Rows of ``array`` (a memory map or an in-memory array), optionally through ``index``."""

    def __init__(self, array, index: np.ndarray | None = None):
        self.array = array
        self.index = index

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else len(self.array)

    def rows(self, positions: np.ndarray) -> torch.Tensor:
        idx = positions if self.index is None else self.index[positions]
        return torch.from_numpy(np.ascontiguousarray(self.array[idx], dtype=np.float32))

    def range(self, a: int, b: int) -> torch.Tensor:
        if self.index is None:
            return torch.from_numpy(np.array(self.array[a:b], dtype=np.float32))  # a copy: the map is read-only
        return self.rows(np.arange(a, b))


@dataclass
class Data:
    train: Split
    val: Split
    test: Split
    shape: tuple[int, ...]
    info: dict


def _embedded_names() -> list[str] | None:
    try:
        import fastflow.data as fd
    except ImportError:
        return None
    try:
        return list(fd.names())
    except Exception:
        return None


def _looks_like_path(name: str) -> bool:
    return Path(name).suffix.lower() in DATA_SUFFIXES or "/" in name or Path(name).exists()


def load(cfg: dict, log=None) -> Data:
    name = cfg["data"]
    if not _looks_like_path(name):
        names = _embedded_names()
        if names is None:
            raise CLIError(f"config key 'data': {name!r} is not a file, and the embedded data sets "
                           "(fastflow.data) are not available")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise CLIError(f"config key 'data': {name!r} is neither an embedded data set "
                           f"({', '.join(names)}) nor a .npy/.npz/.csv file{hint}")
        import fastflow.data as fd

        parts = {s: np.ascontiguousarray(fd.load(name, split=s).detach().cpu().numpy(), dtype=np.float32)
                 for s in ("train", "val", "test")}
        shape = tuple(parts["train"].shape[1:])
        return Data(Split(parts["train"]), Split(parts["val"]), Split(parts["test"]), shape,
                    {"name": name, "kind": "embedded", "sizes": {k: len(v) for k, v in parts.items()},
                     "shape": list(shape)})
    path = Path(name)
    if path.suffix.lower() == ".npz" and path.is_file():
        splits = read_splits_npz(path)
        if splits is not None:
            shape = tuple(splits["train"].shape[1:])
            if any(tuple(v.shape[1:]) != shape for v in splits.values()):
                raise CLIError(f"data file {path}: train/val/test arrays have different row shapes")
            return Data(Split(splits["train"]), Split(splits["val"]), Split(splits["test"]), shape,
                        {"name": str(path), "kind": "file-splits", "sizes": {k: len(v) for k, v in splits.items()},
                         "shape": list(shape)})
    array = read_all(path, csv_header=cfg.get("csv_header", "auto"), log=log)
    n = len(array)
    # The split is a function of the seed alone, so a resumed run sees the same one.
    perm = np.random.default_rng([int(cfg["seed"]) & 0xFFFFFFFF, 0x5EED]).permutation(n)
    n_test = int(round(cfg["test_fraction"] * n))
    n_val = int(round(cfg["val_fraction"] * n))
    test_idx = np.sort(perm[:n_test])
    val_idx = np.sort(perm[n_test:n_test + n_val])
    train_idx = np.sort(perm[n_test + n_val:])
    shape = tuple(array.shape[1:])
    return Data(Split(array, train_idx), Split(array, val_idx), Split(array, test_idx), shape,
                {"name": str(path), "kind": "file", "rows": n,
                 "sizes": {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)},
                 "shape": list(shape), "memory_mapped": isinstance(array, np.memmap)})
