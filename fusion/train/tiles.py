"""A patient's tile features left on disk: read from the run's features .h5 files when a batch needs them.

A whole-slide cohort does not fit in memory as float32 (24 patients of 10^5 tiles of 384 features are
3.7 GB; a TCGA-sized cohort ~150 GB), so `load_bags` hands out `H5Bag`s instead of arrays once the cohort
is larger than a byte budget. An `H5Bag` behaves like the [N, D] float32 array it stands for where the
training code reads it: `len`, `shape`, `ndim`, `bag[rows]` (only those rows are read), `np.asarray(bag)`
(all of them), `bag.mean(0)` (streamed). Each read opens its files and lets them go, so nothing stays
mapped between batches (and a forked worker never shares a handle).

Files written by `write_features` hold one contiguous, unfiltered dataset: those rows are read through a
memory map of the dataset's bytes (a sorted subset of 1,024 rows out of 10^5 in ~1 ms, 5x h5py's point
selection); chunked or compressed files (imported features) are read through h5py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

BLOCK_ROWS = 32_768  # rows per read when a whole bag is streamed (hash, mean): ~50 MB of float32 at 384-D


def _read_file(path: Path, rows: np.ndarray | slice) -> np.ndarray:
    """float32 rows of the `features` dataset of one file: a sorted index array or a slice."""
    with h5py.File(path, "r") as f:
        ds = f["features"]
        offset = ds.id.get_offset() if ds.chunks is None else None
        if offset is None:  # chunked, compressed or empty: h5py reads (indices must increase)
            return np.asarray(ds[rows], np.float32).reshape(-1, ds.shape[1])
        shape, dtype = ds.shape, ds.dtype
    mapped = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    try:
        return mapped[rows].astype(np.float32)
    finally:
        del mapped  # unmap now: pages touched by this read do not stay in the process


class H5Bag:
    """[N, D] float32 tile features of one patient, read on demand from per-slide, per-encoder .h5 files.

    `slides` holds, per slide in bag order, the files of each encoder (same tiles, same order; their
    features are joined column-wise); `lengths` the number of tiles of each slide.
    """

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, slides: list[tuple[Path, ...]], lengths: list[int], dim: int):
        if len(slides) != len(lengths):
            raise ValueError(f"H5Bag: {len(slides)} slides but {len(lengths)} lengths")
        self.slides = [tuple(Path(p) for p in s) for s in slides]
        self.lengths = [int(n) for n in lengths]
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.shape = (int(self.starts[-1]), int(dim))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"H5Bag({self.shape[0]} tiles x {self.shape[1]}, {len(self.slides)} slide(s))"

    @property
    def nbytes(self) -> int:
        """Bytes of the float32 array this bag stands for."""
        return self.shape[0] * self.shape[1] * 4

    def read(self, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 features of the given rows (sorted, unique bag indices), or of every row."""
        if rows is None:
            return self._rows_of_span(0, len(self))
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.shape[1]), np.float32)
        # Each slide's share of the rows is a contiguous stretch of `rows` (they are sorted).
        cuts = np.searchsorted(rows, self.starts)
        for s, files in enumerate(self.slides):
            lo, hi = cuts[s], cuts[s + 1]
            if hi > lo:
                out[lo:hi] = self._join(files, rows[lo:hi] - self.starts[s])
        return out

    def _rows_of_span(self, start: int, stop: int) -> np.ndarray:
        """float32 rows start..stop (bag indices) read as slices of each slide's files."""
        parts = []
        for s, files in enumerate(self.slides):
            lo, hi = max(start, self.starts[s]), min(stop, self.starts[s + 1])
            if hi > lo:
                parts.append(self._join(files, slice(int(lo - self.starts[s]), int(hi - self.starts[s]))))
        return np.concatenate(parts, 0) if parts else np.zeros((0, self.shape[1]), np.float32)

    @staticmethod
    def _join(files: tuple[Path, ...], rows: np.ndarray | slice) -> np.ndarray:
        parts = [_read_file(p, rows) for p in files]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, 1)

    def __getitem__(self, key) -> np.ndarray:
        """`bag[rows]` (any integer indices, read sorted, returned in the order asked) or `bag[a:b]`."""
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            return self._rows_of_span(start, stop)[::step] if step > 0 else self.read()[key]
        rows = np.asarray(key)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = np.where(rows < 0, rows + len(self), rows).astype(np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"{self!r}: row index out of range")
        unique, inverse = np.unique(rows, return_inverse=True)
        got = self.read(unique)
        return got if len(unique) == len(rows) and (np.diff(rows) > 0).all() else got[inverse.reshape(-1)]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.read()
        return out if dtype is None else out.astype(dtype, copy=False)

    def blocks(self, rows: int = BLOCK_ROWS) -> Iterator[np.ndarray]:
        """The bag's float32 rows in consecutive blocks (a bounded amount in memory at a time)."""
        for start in range(0, len(self), rows):
            yield self._rows_of_span(start, min(start + rows, len(self)))

    def mean(self, axis: int = 0) -> np.ndarray:
        """Per-feature mean over the tiles (streamed; accumulated in float64)."""
        if axis != 0:
            raise ValueError("H5Bag.mean: only axis=0 (over tiles)")
        total = np.zeros(self.shape[1], np.float64)
        for block in self.blocks():
            total += block.sum(0, dtype=np.float64)
        return (total / max(1, len(self))).astype(np.float32)


def as_array(features) -> np.ndarray:
    """A bag's features as an in-memory float32 array (reads an `H5Bag`; an array is returned as is)."""
    return features if isinstance(features, np.ndarray) else np.asarray(features)


__all__ = ["H5Bag", "as_array"]
