"""The small set of exceptions `fusion` raises for bad input (lifelines-style: one tiny module)."""

from __future__ import annotations


class FusionError(Exception):
    """Base class: every error caused by the user's input or environment."""


class CohortError(FusionError, ValueError):
    """A cohort folder is invalid. `problems` lists every problem found, one string each."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        if len(self.problems) == 1:  # one problem, one line
            super().__init__(f"cohort {source}: {self.problems[0]}")
            return
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"cohort {source} has {len(self.problems)} problems:\n{lines}")


class SlideReadError(FusionError, OSError):
    """A slide cannot be opened or read; the message names the file and the reason."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read slide {path}: {reason}")


class RunError(FusionError, RuntimeError):
    """A run folder lacks what a step needs (e.g. features before training)."""


class StorageError(FusionError, OSError):
    """The run's storage refuses a write (full disk, read-only folder, no permission): no item is at
    fault and every further write would fail the same way, so the stage stops with this one line."""

    def __init__(self, path: str, reason: str, advice: str):
        self.path, self.reason, self.advice = str(path), reason, advice
        super().__init__(f"{reason}: {path}; {advice}")


_FULL = {28, 122}  # ENOSPC, EDQUOT
_READ_ONLY = 30  # EROFS
_DENIED = {1, 13}  # EPERM, EACCES


def storage_error(error: BaseException, root: str | None = None) -> StorageError | None:
    """`error` as a StorageError when it says the disk is full, read-only or denies us a write
    (denials only for paths under `root`, when given: a slide we may not read is that slide's
    problem); else None."""
    import errno as _errno
    from pathlib import Path

    if isinstance(error, StorageError):
        return error
    if not isinstance(error, OSError):
        return None
    code = error.errno
    text = str(error).lower()
    if code is None:  # h5py and some libraries drop errno but keep the system's message
        code = 28 if "no space left" in text else 30 if "read-only file system" in text else None
    path = error.filename or root or "the run folder"
    if code in _FULL:
        return StorageError(path, "the disk is full (or over quota)", "free space there, or use a run folder on "
                            "another disk (--out), then run the same command again")
    if code == _READ_ONLY:
        return StorageError(path, "the file system is read-only", "use a writable run folder (--out)")
    if code in _DENIED and error.filename is not None:
        inside = root is None or Path(error.filename).resolve().is_relative_to(Path(root).resolve())
        if inside:
            return StorageError(path, f"permission denied ({_errno.errorcode.get(code, code)})",
                                "give this user access to it (or use another run folder, --out)")
    return None
