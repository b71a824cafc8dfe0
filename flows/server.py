"""A Prefect API for one command when none is configured (`PREFECT_API_URL` unset).

Prefect's own "ephemeral" server is a uvicorn child process that is stopped by an `atexit` hook:
a command killed with SIGKILL (or by the OOM killer) leaves it running, and under load its start
times out after 20 s. This one is started the same way but asks the kernel to stop it when its
parent dies (Linux `PR_SET_PDEATHSIG`), and waits up to `FUSION_PREFECT_START_TIMEOUT` seconds
(default 300) for it to answer.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

from fusion.errors import FusionError

START_TIMEOUT = float(os.environ.get("FUSION_PREFECT_START_TIMEOUT", "300"))

# Runs in the child before uvicorn: die with the parent (Linux), and exit if the parent is already gone.
_LAUNCH = """import os, signal, sys
ppid = int(sys.argv.pop(1))
if sys.platform.startswith("linux"):
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != ppid:
    sys.exit(0)
import runpy
sys.argv[0] = "uvicorn"
runpy.run_module("uvicorn", run_name="__main__")
"""


class PrefectStartError(FusionError, RuntimeError):
    """The local Prefect API did not start."""


@contextlib.contextmanager
def prefect_api(timeout: float = START_TIMEOUT) -> Iterator[str]:
    """Yield the Prefect API URL to use: the configured one, or a local server started for the block."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    with tempfile.TemporaryFile() as errors:
        server = subprocess.Popen(_command(port), env=_environment(), stdout=subprocess.DEVNULL, stderr=errors)
        try:
            _wait_healthy(server, url, timeout, errors)
            with temporary_settings(updates={PREFECT_API_URL: url}):
                try:
                    yield url
                finally:
                    _drain()
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _drain() -> None:
    """Send Prefect's queued logs and events while the server still answers (else: errors at exit)."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        for worker in (APILogWorker, EventsWorker):
            with contextlib.suppress(RuntimeError):  # a worker that never started
                result = worker.drain_all()
                if inspect.isawaitable(result):
                    await result

    with contextlib.suppress(Exception):  # best effort: never mask the command's own outcome
        run_coro_as_sync(drain())


def _command(port: int) -> list[str]:
    import prefect

    return [sys.executable, "-c", _LAUNCH, str(os.getpid()), "--app-dir", str(prefect.__module_path__.parent),
            "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]


def _environment() -> dict[str, str]:
    from prefect.settings import get_current_settings

    return {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True)}


def _wait_healthy(server: subprocess.Popen, url: str, timeout: float, errors) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            errors.seek(0)
            tail = errors.read().decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise PrefectStartError(f"the local Prefect server exited with code {server.returncode} ({tail[0]}); "
                                    "check PREFECT_HOME, or set PREFECT_API_URL to a running server")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(0.2)
    raise PrefectStartError(f"the local Prefect server did not answer within {timeout:.0f} s; raise "
                            "FUSION_PREFECT_START_TIMEOUT on a loaded machine, or set PREFECT_API_URL")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
