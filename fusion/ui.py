"""The Prefect UI as the front door: `fusion ui` runs Prefect's server (UI and API) beside a small
file server for run folders, so the reports an artifact links to open in the browser.

Browsers refuse `file://` links on an `http://` page, so the run-summary and scoring artifacts link
every file through the file server instead: `http://127.0.0.1:4201/files/<absolute path>`. The URL
names the file itself, not a folder the server was started on, so a link written by any run,
before or after `fusion ui` started, opens whenever the server runs. The server answers on
127.0.0.1 only, and only for files inside a run folder (a folder holding `run.json`) under the
folders it was given (`--root`, default: the current folder).

Prefect itself is started as `prefect server start`; this module never imports Prefect.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from fusion.errors import FusionError
from fusion.run import RUN_FILE

FILES_URL_ENV = "FUSION_FILES_URL"  # where pipelines say the file server answers (default below)
UI_PORT, FILES_PORT = 4200, 4201  # Prefect's default port, and the next one for the files
HOST = "127.0.0.1"
FILES_PREFIX = "/files"


def files_url() -> str:
    """The file server's base URL that artifact links use: $FUSION_FILES_URL or http://127.0.0.1:4201."""
    return os.environ.get(FILES_URL_ENV, f"http://{HOST}:{FILES_PORT}").rstrip("/")


def file_link(path: str | Path) -> str:
    """The URL at which `fusion ui`'s file server serves `path` (made absolute)."""
    return files_url() + FILES_PREFIX + urllib.parse.quote(Path(path).resolve().as_posix())


def markdown_link(text: str, path: str | Path) -> str:
    """A Markdown link to `path` through the file server (brackets in `text` escaped)."""
    label = text.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")
    return f"[{label}]({file_link(path)})"


def served_path(url_path: str, roots: list[Path]) -> Path:
    """The file a request path names, when the server may serve it; else FusionError saying why.

    Allowed: an existing file or folder under one of `roots` and inside a run folder (one holding
    `run.json`), symbolic links resolved first (a link cannot lead out).
    """
    path = urllib.parse.unquote(urllib.parse.urlsplit(url_path).path)
    if not path.startswith(FILES_PREFIX + "/"):
        raise FusionError("not found: file links look like /files/<absolute path>")
    target = Path(path[len(FILES_PREFIX):]).resolve()
    if not target.exists():
        raise FileNotFoundError(f"no such file: {target}")
    if not any(target.is_relative_to(root) for root in roots):
        raise PermissionError(f"{target} is outside the folders served ({', '.join(map(str, roots))}); "
                              "start `fusion ui --root FOLDER` with a folder above it")
    if any((folder / RUN_FILE).is_file() for folder in [target, *target.parents]):
        return target
    raise PermissionError(f"{target} is not inside a fusion run folder (one holding {RUN_FILE})")


class _RunFiles(SimpleHTTPRequestHandler):
    """Serves files of run folders read-only (GET and HEAD); directories are listed."""

    roots: list[Path] = []

    def send_head(self):  # noqa: D102 - SimpleHTTPRequestHandler's hook for GET and HEAD
        if self.path in ("/", ""):
            return self._page(HTTPStatus.OK, "fusion file server: the links of the Prefect UI's run artifacts open "
                                             "here (/files/&lt;absolute path&gt;, run folders only).")
        try:
            served_path(self.path, self.roots)
        except FileNotFoundError as e:
            return self._page(HTTPStatus.NOT_FOUND, str(e))
        except (PermissionError, FusionError) as e:
            return self._page(HTTPStatus.FORBIDDEN, str(e))
        return super().send_head()

    def translate_path(self, path: str) -> str:
        return str(served_path(path, self.roots))

    def _page(self, status: HTTPStatus, text: str):
        import html
        import io

        body = f"<!doctype html><meta charset='utf-8'><title>fusion files</title><p>{html.escape(text)}</p>".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")  # a rerun rewrites reports under the same name
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
        pass  # the terminal shows Prefect's server; requests need no log


class FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def stop(self) -> None:
        """Stop serving and free the port."""
        self.shutdown()
        self.server_close()


def serve_files(roots: list[str | Path], port: int = FILES_PORT, host: str = HOST) -> FileServer:
    """Start the file server for run folders under `roots` in a daemon thread; `.stop()` stops it."""
    resolved = [Path(r).resolve() for r in roots]
    for root in resolved:
        if not root.is_dir():
            raise FusionError(f"--root {root} is not a folder")
    handler = type("RunFiles", (_RunFiles,), {"roots": resolved})
    try:
        server = FileServer((host, port), partial(handler, directory="/"))
    except OSError as e:
        raise FusionError(f"cannot serve files on {host}:{port} ({e.strerror}); choose another --files-port "
                          f"and tell the pipelines: export {FILES_URL_ENV}=http://{host}:<port>") from e
    threading.Thread(target=server.serve_forever, name="fusion-files", daemon=True).start()
    return server


def prefect_healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether a Prefect API answers at `api_url` (…/api)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def start_prefect_server(port: int = UI_PORT, host: str = HOST) -> subprocess.Popen:
    """`prefect server start` on host:port, its UI told where the API is (PREFECT_UI_API_URL: without
    it, a server on another port than 4200 serves a UI that looks for its API on 4200)."""
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or shutil.which("prefect")
    if prefect is None:
        raise FusionError("the `prefect` command is not installed in this environment (pip install prefect)")
    api = f"http://{host}:{port}/api"
    env = {**os.environ, "PREFECT_UI_API_URL": api, "PREFECT_SERVER_API_HOST": host,
           "PREFECT_SERVER_API_PORT": str(port), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)  # the server's own settings must not point at another server
    return subprocess.Popen([prefect, "server", "start", "--host", host, "--port", str(port)], env=env,
                            stdin=subprocess.DEVNULL)


def wait_for_prefect(api_url: str, process: subprocess.Popen | None, timeout: float = 300.0) -> None:
    """Block until the API answers; FusionError when the server exits or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise FusionError(f"`prefect server start` exited with code {process.returncode} (see its output above)")
        if prefect_healthy(api_url):
            return
        time.sleep(0.5)
    raise FusionError(f"Prefect's server did not answer at {api_url} within {timeout:.0f} s")


def stop(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a server process: SIGTERM, then SIGKILL after `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
