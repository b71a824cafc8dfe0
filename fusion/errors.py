"""The small set of exceptions `fusion` raises for bad input (lifelines-style: one tiny module)."""

from __future__ import annotations


class FusionError(Exception):
    """Base class: every error caused by the user's input or environment."""


class CohortError(FusionError, ValueError):
    """A cohort folder is invalid. `problems` lists every problem found, one string each."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"cohort {source} has {len(self.problems)} problem(s):\n{lines}")


class SlideReadError(FusionError, OSError):
    """A slide cannot be opened or read; the message names the file and the reason."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read slide {path}: {reason}")


class RunError(FusionError, RuntimeError):
    """A run folder lacks what a step needs (e.g. features before training)."""
