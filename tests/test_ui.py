"""`fusion ui`: Prefect's UI and the file server that opens the reports the run artifacts link to.

The end-to-end test starts `fusion ui` on free ports (its Prefect database in a temporary
PREFECT_HOME), records a run summary artifact from a flow in another process, opens the artifact
in headless Chromium in both of Prefect's UIs, and follows the patient report's link."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flows.pipeline import summary_markdown
from flows.scoring import _markdown as scoring_markdown
from fusion.ui import FILES_URL_ENV, file_link, serve_files

REPORT_TITLE = "Risk report P 001"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture()
def run_folders(tmp_path) -> Path:
    """A run folder with a report (a space in its name), its analysis and QC sheet; a file beside it
    that belongs to no run; a link from the run to that file."""
    run = tmp_path / "runs" / "r1"
    for sub in ("reports", "analysis", "tiles"):
        (run / sub).mkdir(parents=True)
    (run / "run.json").write_text('{"cohort": "/nowhere"}')
    (run / "reports" / "P 001.html").write_text(f"<!doctype html><title>{REPORT_TITLE}</title><h1>{REPORT_TITLE}</h1>")
    (run / "analysis" / "report.html").write_text("<h1>cohort</h1>")
    (run / "tiles" / "qc.html").write_text("<h1>QC</h1>")
    (tmp_path / "runs" / "secret.txt").write_text("not a run's")
    (run / "reports" / "link.txt").symlink_to(tmp_path / "runs" / "secret.txt")
    return run


def _summary(run: Path) -> dict:
    evaluation = {"c_index_mean": 0.7, "c_index_sd": 0.02}
    return {"run": str(run), "slides": 1, "tiles": 10, "slides_done": {"tile": 1, "extract": 1},
            "slides_skipped": {"tile": 0, "extract": 0}, "failed": [],
            "models": [{"model": "abmil", "retrained": True, "evaluation": evaluation}],
            "analysis": str(run / "analysis"), "reports": [str(run / "reports" / "P 001.html")]}


def test_file_server_serves_run_folders_only(run_folders, tmp_path, monkeypatch):
    port = _free_port()
    monkeypatch.setenv(FILES_URL_ENV, f"http://127.0.0.1:{port}")
    server = serve_files([tmp_path / "runs"], port)
    try:
        report = run_folders / "reports" / "P 001.html"
        with urllib.request.urlopen(file_link(report), timeout=10) as response:
            assert REPORT_TITLE in response.read().decode()
        assert _status(file_link(run_folders / "reports")) == 200  # a folder is listed
        assert _status(file_link(tmp_path / "runs" / "secret.txt")) == 403  # in the root, in no run
        assert _status(file_link(run_folders / "reports" / "link.txt")) == 403  # a link out of the run
        assert _status(f"http://127.0.0.1:{port}/files{run_folders}/../../../../../etc/passwd") in (403, 404)
        assert _status(file_link(run_folders / "reports" / "missing.html")) == 404
    finally:
        server.stop()
    other = serve_files([run_folders / "reports"], port)  # a root below the run folder serves its files only
    try:
        assert _status(file_link(run_folders / "reports" / "P 001.html")) == 200
        assert _status(file_link(run_folders / "analysis" / "report.html")) == 403
    finally:
        other.stop()


def test_artifacts_link_through_the_file_server(run_folders, monkeypatch):
    monkeypatch.setenv(FILES_URL_ENV, "http://127.0.0.1:4999")
    text = summary_markdown(_summary(run_folders))
    scoring = scoring_markdown({"batch": "b1", "predictions": "p.parquet", "failed": [],
                                "reports": [str(run_folders / "reports" / "P 001.html")]},
                               [{"patient_id": "P 001", "risk_percentile": 71.0}])
    for markdown in (text, scoring):
        assert "file://" not in markdown
        assert f"({file_link(run_folders / 'reports' / 'P 001.html')})" in markdown
    assert file_link(run_folders / "reports" / "P 001.html").startswith("http://127.0.0.1:4999/files/")
    assert f"({file_link(run_folders / 'tiles' / 'qc.html')})" in text
    assert f"({file_link(run_folders / 'analysis' / 'report.html')})" in text


FLOW = textwrap.dedent("""
    import json, sys
    from prefect import flow
    from flows.pipeline import _summary

    @flow(name="ui-test")
    def summarise(run: str) -> None:
        models = [{"model": "abmil", "summary": {"c_index_mean": 0.7}, "skipped": False,
                   "evaluation": {"c_index_mean": 0.7, "c_index_sd": 0.02}}]
        tiled = [{"slide_id": "S1", "status": "done", "n_tiles": 10}]
        _summary(run, tiled, tiled, models, reports=[run + "/reports/P 001.html"], analysis=True)

    summarise(sys.argv[1])
""")


def _open_link_in_chromium(artifact_pages: list[str], shots: str | None) -> list[str]:
    """For each UI page of the artifact: click the patient report's link; the titles of the pages it opened."""
    from playwright.sync_api import sync_playwright

    from fusion.report.pdf import launch

    titles = []
    with sync_playwright() as p:
        browser = launch(p)
        try:
            for i, url in enumerate(artifact_pages):
                context = browser.new_context(viewport={"width": 1280, "height": 800})
                page = context.new_page()
                page.goto(url)
                link = page.get_by_role("link", name="P 001", exact=True)
                link.wait_for(timeout=60_000)
                assert link.get_attribute("href").startswith("http://127.0.0.1:")
                if shots:
                    page.screenshot(path=f"{shots}/ui-artifact-{i}.png")
                if link.get_attribute("target") == "_blank":  # the V1 UI opens links in a new tab
                    with context.expect_page() as opened:
                        link.click()
                    report = opened.value
                else:
                    link.click()
                    report = page
                report.wait_for_load_state()
                titles.append(report.locator("h1").inner_text())
                context.close()
        finally:
            browser.close()
    return titles


def test_ui_opens_a_report_linked_from_the_run_artifact(run_folders, tmp_path):
    port, files_port = _free_port(), _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    api = f"http://127.0.0.1:{port}/api"
    log = (tmp_path / "ui.log").open("w")
    ui = subprocess.Popen([sys.executable, "-m", "fusion.cli", "ui", "--port", str(port), "--files-port",
                           str(files_port), "--root", str(tmp_path / "runs")], env=env, stdout=log,
                          stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while _status_or_none(f"{api}/health") != 200:
            assert ui.poll() is None and time.time() < deadline, (tmp_path / "ui.log").read_text()[-3000:]
            time.sleep(0.5)
        flow_env = {**env, "PREFECT_API_URL": api, FILES_URL_ENV: f"http://127.0.0.1:{files_port}"}
        done = subprocess.run([sys.executable, "-c", FLOW, str(run_folders)], env=flow_env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

        request = urllib.request.Request(f"{api}/artifacts/filter", data=b"{}",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            artifact = next(a for a in json.loads(response.read()) if a["key"] == "fusion-run-summary")
        pages = [f"http://127.0.0.1:{port}/v2/artifacts/artifact/{artifact['id']}",  # the UI `/` leads to
                 f"http://127.0.0.1:{port}/artifacts/artifact/{artifact['id']}"]  # and the older one
        assert _open_link_in_chromium(pages, os.environ.get("FUSION_SCREENSHOTS")) == [REPORT_TITLE] * 2
    finally:
        if ui.poll() is None:
            ui.send_signal(signal.SIGINT)  # Ctrl-C stops both servers
            ui.wait(timeout=60)
        log.close()
    assert _status_or_none(f"{api}/health") is None
    assert _status_or_none(f"http://127.0.0.1:{files_port}/") is None


def _status_or_none(url: str) -> int | None:
    try:
        return _status(url)
    except OSError:
        return None
