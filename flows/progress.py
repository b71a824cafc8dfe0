"""Rich progress bars for the flows' slides, tiles and epochs, when a terminal command runs them.

The CLI opens `show_progress()` around a flow; the flows call `bar()` wherever they wait on work.
Without an open display (Prefect worker, deployment, tests) `bar()` does nothing. While bars are
shown, Prefect's console log handler prints through the same rich console, so log lines scroll
above the bars instead of tearing them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_current: Progress | None = None


class Bar:
    """One progress bar; `advance` is safe from task threads. A Bar without a display is a no-op.

    The bar appears with its first `advance`/`update`: a stage found up to date (nothing to do)
    never shows a bar, only its log line saying so."""

    def __init__(self, progress: Progress | None, description: str, total: float | None):
        self._progress = progress
        self._description, self._total = description, total
        self._id = None
        self._lock = threading.Lock()

    def _task(self):
        with self._lock:
            if self._id is None:
                self._id = self._progress.add_task(self._description, total=self._total)
            return self._id

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task(), n)

    def update(self, **fields) -> None:
        if self._progress is not None:
            self._progress.update(self._task(), **fields)

    @property
    def shown(self) -> bool:
        """Whether the bar has appeared (some work was counted)."""
        return self._id is not None


def bar(description: str, total: float | None) -> Bar:
    """A new bar on the open display, or a no-op bar (also when there is nothing to count)."""
    return Bar(_current if total != 0 else None, description, total)


@contextlib.contextmanager
def show_progress(console: Console | None = None) -> Iterator[Progress]:
    """Show bars for the flows run inside the block, with Prefect's log lines printed above them."""
    global _current
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False)
    saved = [(h, h.console) for h in _prefect_console_handlers()]
    outer = _current
    with progress:
        for h, _ in saved:
            h.console = progress.console
            h.setFormatter(_OneLine(h.formatter))
        _current = progress
        try:
            yield progress
        finally:
            _current = outer
            for h, c in saved:
                h.console = c
                if isinstance(h.formatter, _OneLine):
                    h.setFormatter(h.formatter.inner)


class _OneLine(logging.Formatter):
    """On the terminal a failure is one line (the command prints the error itself); the traceback
    still reaches Prefect's API and UI, and shows here with FUSION_DEBUG=1."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and not os.environ.get("FUSION_DEBUG"):
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return self.inner.format(record)


def _prefect_console_handlers() -> list:
    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(name) for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "")]
    found = [h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)]
    if not found:  # Prefect configures its handlers on first use; do it now so they can be redirected
        setup_logging()
        found = [h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)]
    return found
