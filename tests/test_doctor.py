"""`fusion doctor`: every check done for real (Chromium prints, Prefect's server starts, encoders are
built from their weights), every model and baseline listed with what it reads, and a failure named
with what to do and a non-zero exit."""

import os
import socket
import subprocess
import sys

import pytest
import yaml

from fusion.models import available_models
from fusion.train.baselines import BASELINES
from fusion.train.loop import model_inputs


def _doctor(args: list[str], env: dict, cwd) -> subprocess.CompletedProcess:
    # COLUMNS: rich wraps table cells to the terminal; wide enough that each row stays on one line
    return subprocess.run([sys.executable, "-m", "fusion.cli", "doctor", *args], env={**env, "COLUMNS": "400"},
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def _row(output: str, name: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(f"│ {name} "))


def _config(tmp_path, cohort, **fields) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"cohort": str(cohort), "run": str(tmp_path / "run"), **fields}))
    return str(path)


@pytest.mark.slow
def test_doctor_passes_on_this_machine_and_lists_every_model(tiny_cohort, tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)  # the embedded server, as a pipeline without a server would use
    config = _config(tmp_path, tiny_cohort, report={"pdf": True},
                     models=[{"model": "abmil"}, {"model": "coxnet"}])
    done = _doctor([config], env, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    for check in ("python", "openslide", "torch", "chromium", "working folder", "prefect", "cohort",
                  "model abmil", "model coxnet", "encoder morph", "run folder"):
        assert "│ ok " in _row(done.stdout, check), check
    assert "printed a PDF" in _row(done.stdout, "chromium")
    assert "embedded server started" in _row(done.stdout, "prefect")
    for name in [*available_models(), *BASELINES]:
        row = _row(done.stdout, name)
        assert ", ".join(model_inputs(name)) in row
        assert ("baseline" if name in BASELINES else "network") in row
        assert ("yes" in row) == (name in ("abmil", "coxnet"))


def test_doctor_names_what_fails_and_exits_non_zero(tiny_cohort, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "FUSION_CHROMIUM": "/nonexistent/chromium"}
    config = _config(tmp_path, tiny_cohort, report={"pdf": True},
                     extract={"encoders": ["morph", "uni@/nonexistent/uni.bin"]})
    done = _doctor([config], env, tmp_path)
    assert done.returncode == 1
    assert "fail" in _row(done.stdout, "prefect") and f"PREFECT_API_URL=http://127.0.0.1:{port}/api" in done.stdout
    assert "fail" in _row(done.stdout, "chromium") and "FUSION_CHROMIUM" in _row(done.stdout, "chromium")
    assert "fail" in _row(done.stdout, "encoder uni@/nonexistent/uni.bin") and "weights not found" in done.stdout
    assert "│ ok " in _row(done.stdout, "encoder morph")
    assert "3 check(s) failed" in done.stderr

    bad = _doctor([_config(tmp_path, tiny_cohort, models=[{"model": "abmill"}])], env, tmp_path)
    assert bad.returncode == 2 and "Unknown model 'abmill'; available: abmil" in bad.stderr
