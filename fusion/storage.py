"""Atomic file writes and the run ledger: a reader never sees half a file.

Every artifact is written to a temporary file in the same folder and renamed into place, so a
process killed mid-write leaves either the old file or nothing, never a truncated one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success rename it onto `final`.

    The temporary name starts with '.' and ends with '.partial' so globbing for outputs
    never picks it up; it names this machine and process, so a later stage can tell a file left
    by a killed process from one still being written (`sweep_partials`). On error (a full disk
    included) the temporary file is removed and `final` is untouched. `durable` also flushes the
    file and its folder to the disk before returning, for results whose loss after a power cut
    would lose data (scores of an inbox).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.{_HOST}-{os.getpid()}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; artifacts are shared files
    try:
        yield tmp_path
        if durable:
            _fsync(tmp_path)
        os.replace(tmp_path, final)
        if durable:
            _fsync(final.parent)
    finally:
        with contextlib.suppress(OSError):  # a read-only or vanished folder: nothing more to clean
            tmp_path.unlink(missing_ok=True)


def _machine_tag() -> str:
    """This machine as temporary names show it: its host name and process-id namespace, hashed (two
    containers may share a host name but never a pid namespace, and a pid means something only in its own)."""
    namespace = ""
    with contextlib.suppress(OSError):
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    return hashlib.sha256(f"{socket.gethostname()}/{namespace}".encode()).hexdigest()[:10]


_HOST = _machine_tag()
_PARTIAL = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.partial$")
# A temporary file that does not say which process made it (another machine's, or one made before
# names carried the process) is only taken as abandoned when nothing has written to it for this long.
PARTIAL_MAX_AGE = 24 * 3600.0


def sweep_partials(root: str | os.PathLike, max_age: float = PARTIAL_MAX_AGE) -> list[Path]:
    """Delete the temporary files under `root` that no live process will finish; returns them.

    A process killed mid-write (SIGKILL, the OOM killer, a power cut) leaves its `.partial` file
    behind. One made on this machine is abandoned when its process is gone; any other is abandoned
    once nothing has written to it for `max_age` seconds (its maker may be alive on another host).
    """
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    now = time.time()
    for path in root.rglob(".*.partial"):
        with contextlib.suppress(OSError):  # gone meanwhile (its writer finished), or not ours to delete
            if path.is_file() and _abandoned(path, now, max_age):
                path.unlink()
                removed.append(path)
    return removed


def _abandoned(path: Path, now: float, max_age: float) -> bool:
    match = _PARTIAL.match(path.name)
    if match and match["host"] == _HOST:
        return not _alive(int(match["pid"]))
    return now - path.stat().st_mtime > max_age


def _alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (a reused id counts as alive: safe)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str, durable: bool = False) -> Path:
    """`text` (UTF-8) written atomically to `path`."""
    with atomic_path(path, durable) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_table(path: str | os.PathLike, table, durable: bool = False) -> Path:
    """A DataFrame as Parquet (`.parquet`/`.pq`) or CSV, without the index, written atomically."""
    with atomic_path(path, durable) as tmp:
        if Path(path).suffix.lower() in {".parquet", ".pq"}:
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, durable: bool = False) -> Path:
    """`obj` as indented JSON with sorted keys, written atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n", durable)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in `path`; a damaged file raises ValueError naming it (a torn copy, an edit gone wrong)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged (not valid JSON: {e}); restore it or make it again") from None


def read_parquet(path: str | os.PathLike, **kwargs):
    """The table in `path`; a damaged file raises ValueError naming it."""
    import pandas as pd

    try:
        return pd.read_parquet(path, **kwargs)
    except (OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path} is damaged (not a readable Parquet file: {e}); restore it or make it again") from None


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
    whole for lines of this size even with several threads or processes writing. A process killed
    mid-write (or a full disk) can still leave a torn last line: readers skip such lines and count
    them (`torn`), and the next writer ends the torn line first so its own entry stays whole.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.torn = 0  # lines the last `entries()` call could not read

    def record(self, step: str, item: str, status: str, **fields: Any) -> dict:
        """Append one entry; returns it."""
        entry = {"time": time.time(), "step": step, "item": item, "status": status, **fields}
        line = (json.dumps(entry, sort_keys=True, default=_json_default) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab+") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a torn last line: end it, so it stays one bad line, not two
                    line = b"\n" + line
            f.write(line)
        return entry

    def entries(self) -> list[dict]:
        """Every readable entry, in order; unreadable (torn) lines are skipped and counted in `torn`."""
        self.torn = 0
        if not self.path.exists():
            return []
        out = []
        for raw in self.path.read_bytes().splitlines():
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = None
            if isinstance(entry, dict):
                out.append(entry)
            else:
                self.torn += 1
        return out
