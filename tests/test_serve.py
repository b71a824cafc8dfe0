"""`fusion serve`: a deployment served with a cron schedule against a real `prefect server`,
triggered once; the inbox's patients are scored, leave the inbox, and are not scored twice."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fusion.run import open_run
from fusion.stages import train_stage
from fusion.storage import Ledger
from fusion.train.loop import TrainConfig

PREFECT = str(Path(sys.executable).parent / "prefect")
INBOX_PATIENTS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(env: dict, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(env["PREFECT_API_URL"] + path, data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _wait(what: str, check, timeout: float, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}")
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _stop(proc: subprocess.Popen, sig=signal.SIGINT) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture()
def prefect_server(tmp_path):
    """`prefect server start` on a free port of 127.0.0.1, its database in tmp; yields the env to use."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    port = _free_port()
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait("prefect server", lambda: _api(env, "/health"), 120, server)
        yield env
    finally:
        _stop(server, signal.SIGTERM)
        log.close()


@pytest.fixture()
def trained_setup(tiny_cohort, tiny_run, tmp_path) -> Path:
    """A training run with a small abmil, an inbox holding 3 patients, and the config naming both."""
    run = tmp_path / "train-run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("models", "ledger.jsonl", "folds.*"))
    layout, cohort = open_run(run)
    train_stage(layout, cohort, TrainConfig(folds=2, epochs=2, patience=2))

    inbox = tmp_path / "inbox"
    (inbox / "slides").mkdir(parents=True)
    patients = pd.read_csv(tiny_cohort / "patients.csv", dtype={"patient_id": str}).head(INBOX_PATIENTS)
    slides = pd.read_csv(tiny_cohort / "slides.csv", dtype={"patient_id": str, "slide_id": str})
    slides = slides[slides.patient_id.isin(patients.patient_id)].copy()
    for row in slides.itertuples():
        shutil.copy(tiny_cohort / row.path, inbox / "slides" / Path(row.path).name)
    slides["path"] = ["slides/" + Path(p).name for p in slides.path]
    slides.to_csv(inbox / "slides.csv", index=False)
    patients.to_csv(inbox / "patients.csv", index=False)
    genomics = pd.read_csv(tiny_cohort / "genomics.csv", dtype={"patient_id": str})
    genomics[genomics.patient_id.isin(patients.patient_id)].to_csv(inbox / "genomics.csv", index=False)

    config = {"cohort": str(tiny_cohort), "run": str(run), "models": [{"model": "abmil", "folds": 2}],
              "serve": {"inbox": "inbox", "workdir": "scoring", "model": "abmil", "reports": False}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_served_deployment_scores_the_inbox(prefect_server, trained_setup, tmp_path):
    env = prefect_server
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen([sys.executable, "-m", "fusion.cli", "serve", str(trained_setup), "--cron", "0 2 * * *"],
                             env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deployment = _wait("the deployment", lambda: _api(env, "/deployments/filter", {}), 120, serve)[0]
        assert deployment["name"] == "nightly-scoring"
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 2 * * *"]

        run = subprocess.run([PREFECT, "deployment", "run", "fusion-score-inbox/nightly-scoring", "--watch",
                              "--watch-timeout", "300"], env=env, capture_output=True, text=True, timeout=330)
        served = (tmp_path / "serve.log").read_text()[-3000:]
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + served
    finally:
        _stop(serve)
        log.close()

    scores = pd.read_parquet(tmp_path / "scoring" / "run" / "predictions" / "abmil.parquet")
    assert len(scores) == INBOX_PATIENTS and scores.risk_percentile.notna().all() and (scores.folds == 2).all()
    assert pd.read_csv(tmp_path / "inbox" / "patients.csv").empty  # taken out of the inbox
    assert not list((tmp_path / "inbox" / "slides").iterdir())
    assert len(pd.read_csv(tmp_path / "scoring" / "cohort" / "patients.csv")) == INBOX_PATIENTS


def test_scoring_twice_scores_nothing_twice(trained_setup, tmp_path):
    """Two scorings in a row (embedded server, `fusion serve --once` path): the second finds nothing;
    reports are written for the new patients."""
    pytest.importorskip("fusion.report.patient")
    from prefect.testing.utilities import prefect_test_harness

    from flows.scoring import score_inbox

    config = yaml.safe_load(trained_setup.read_text())
    config["serve"]["reports"] = True
    trained_setup.write_text(yaml.safe_dump(config))
    inbox = tmp_path / "inbox"
    dropped = {name: (inbox / name).read_bytes() for name in ("patients.csv", "slides.csv", "genomics.csv")}
    slides = {p.name: p.read_bytes() for p in (inbox / "slides").iterdir()}
    with prefect_test_harness(server_startup_timeout=120):
        first = score_inbox(str(trained_setup))
        second = score_inbox(str(trained_setup))
        for name, content in {**dropped, **{f"slides/{k}": v for k, v in slides.items()}}.items():
            (inbox / name).write_bytes(content)  # the same patients dropped in again
        third = score_inbox(str(trained_setup))
    assert len(first["patients"]) == INBOX_PATIENTS and sorted(first["arrived"]) == sorted(first["patients"])
    assert sorted(Path(p).stem for p in first["reports"]) == sorted(first["patients"])
    # the inbox's patients are patients of the training cohort too: each is scored with a warning
    assert sorted(first["warnings"]) == sorted(first["patients"])
    assert second["patients"] == []
    assert len(pd.read_parquet(tmp_path / "scoring" / "run" / "predictions" / "abmil.parquet")) == INBOX_PATIENTS
    # dropped in again after their release: refused, each with its reason and a ledger line, never silently
    assert third["patients"] == [] and sorted(third["scored_before"]) == sorted(first["patients"])
    assert all(f"already scored (batch {first['batch']})" in why for why in third["failed_patients"].values())
    refused = [e for e in Ledger(tmp_path / "scoring" / "run" / "ledger.jsonl").entries() if e["status"] == "refused"]
    assert sorted(e["item"] for e in refused) == sorted(first["patients"])
    assert pd.read_csv(inbox / "patients.csv").empty
    assert len(pd.read_csv(inbox / "failed" / third["batch"] / "patients.csv")) == INBOX_PATIENTS


def test_scoring_encodes_new_patients_with_the_training_runs_pretrained_encoders(tmp_path):
    """A model on 'morph+mocov3' scores new patients only if they are encoded by the weights it was
    trained on: the scoring run gets a copy of the training run's pretrained encoder (and a fresh copy
    when those weights change), registered encoders are left alone."""
    from fusion.run import RunLayout
    from fusion.scoring import share_encoders

    training, scoring = RunLayout(tmp_path / "train"), RunLayout(tmp_path / "score")
    source = training.encoder_dir("mocov3")
    source.mkdir(parents=True)
    (source / "config.json").write_text('{"method": "mocov3"}')
    (source / "model.safetensors").write_bytes(b"weights-1")
    scoring.root.mkdir()
    assert share_encoders(training, scoring, "morph+mocov3") == ["mocov3"]
    assert (scoring.encoder_dir("mocov3") / "model.safetensors").read_bytes() == b"weights-1"
    assert not scoring.encoder_dir("morph").exists()
    assert share_encoders(training, scoring, "morph+mocov3") == []  # same weights: kept
    (source / "model.safetensors").write_bytes(b"weights-2")
    assert share_encoders(training, scoring, "morph+mocov3") == ["mocov3"]
    assert (scoring.encoder_dir("mocov3") / "model.safetensors").read_bytes() == b"weights-2"
    assert not list(scoring.root.glob("encoders/*.partial"))
