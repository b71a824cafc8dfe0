"""Atomic file writes and the run ledger: a reader never sees half a file.

Every artifact is written to a temporary file in the same folder and renamed into place, so a
process killed mid-write leaves either the old file or nothing, never a truncated one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success rename it onto `final`.

    The temporary name starts with '.' and ends with '.partial' so globbing for outputs
    never picks it up. On error the temporary file is removed and `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; artifacts are shared files
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_table(path: str | os.PathLike, table) -> Path:
    """A DataFrame as Parquet (`.parquet`/`.pq`) or CSV, without the index, written atomically."""
    with atomic_path(path) as tmp:
        if Path(path).suffix.lower() in {".parquet", ".pq"}:
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def hash_config(obj: Any) -> str:
    """A short stable hash of a JSON-able configuration (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike) -> str:
    """Cheap identity of a file's content: size, and a hash of its first and last MiB.

    Slides are gigabytes; hashing them whole on every rerun would cost more than tiling.
    Size plus head and tail catches replaced or truncated files in practice.
    """
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


class Ledger:
    """Append-only `ledger.jsonl`: one line per step per item (status, inputs hash, outputs, error).

    Lines are appended with a single `write` on a file opened in append mode, which POSIX keeps
    whole for lines of this size even with several threads or processes writing.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, step: str, item: str, status: str, **fields: Any) -> dict:
        entry = {"time": time.time(), "step": step, "item": item, "status": status, **fields}
        line = json.dumps(entry, sort_keys=True, default=_json_default) + "\n"
        with self.path.open("a") as f:
            f.write(line)
        return entry

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
