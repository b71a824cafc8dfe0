"""Hostile input and faults under Prefect (issue 13): the serve inbox, slides lost mid-run, and a
killed command's Prefect server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import copy_small_cohort
from prefect.testing.utilities import prefect_test_harness
from test_serve import INBOX_PATIENTS, trained_setup  # noqa: F401 - a fixture

from fusion.storage import Ledger


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=300):
        yield


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture()
def hostile_inbox(trained_setup, tiny_cohort, tmp_path):  # noqa: F811 - the imported fixture
    """The served inbox of test_serve (3 good patients) plus: a patient whose id climbs out of the
    folder, a patient whose slide path points outside the inbox, and a corrupt slide."""
    inbox = tmp_path / "inbox"
    patients = pd.read_csv(inbox / "patients.csv", dtype={"patient_id": str})
    slides = pd.read_csv(inbox / "slides.csv", dtype={"patient_id": str, "slide_id": str})
    genomics = pd.read_csv(inbox / "genomics.csv", dtype={"patient_id": str})
    source = pd.read_csv(tiny_cohort / "slides.csv", dtype={"patient_id": str, "slide_id": str})
    spare = source.iloc[-1]
    shutil.copy(tiny_cohort / spare.path, tmp_path / "secret.tiff")  # a file outside the inbox
    shutil.copy(tiny_cohort / spare.path, inbox / "slides" / "climb.tiff")
    extra_patients = patients.head(2).assign(patient_id=["../escaped-patient", "PX_OUT"])
    extra_slides = pd.DataFrame({"slide_id": ["../../../escaped", "SX_OUT"],
                                 "patient_id": ["../escaped-patient", "PX_OUT"],
                                 "path": ["slides/climb.tiff", "../secret.tiff"]})
    corrupt = inbox / slides.path.iloc[0]
    corrupt.write_bytes(corrupt.read_bytes()[:5000])
    pd.concat([patients, extra_patients]).to_csv(inbox / "patients.csv", index=False)
    pd.concat([slides, extra_slides]).to_csv(inbox / "slides.csv", index=False)
    genomics.to_csv(inbox / "genomics.csv", index=False)
    return {"config": trained_setup, "inbox": inbox, "corrupt_patient": slides.patient_id.iloc[0],
            "good": sorted(set(patients.patient_id) - {slides.patient_id.iloc[0]})}


def test_the_inbox_refuses_hostile_items_alone_and_keeps_files_until_scored(hostile_inbox, tmp_path, monkeypatch):
    from flows.scoring import score_inbox

    inbox, config = hostile_inbox["inbox"], str(hostile_inbox["config"])
    secret = (tmp_path / "secret.tiff").read_bytes()
    with prefect_test_harness(server_startup_timeout=300):
        # A crash while scoring: nothing has left the inbox, so nothing is lost.
        import fusion.train.predict

        def broken(*args, **kwargs):
            raise RuntimeError("simulated crash while scoring")

        monkeypatch.setattr(fusion.train.predict, "predict_patients", broken)
        before = _files(inbox)
        with pytest.raises(RuntimeError, match="simulated crash"):
            score_inbox(config)  # (the bad items were already refused, before the crash)
        after = _files(inbox)
        for good in hostile_inbox["good"]:
            assert good in pd.read_csv(inbox / "patients.csv", dtype={"patient_id": str}).patient_id.tolist()
        kept = [name for name in before if name.startswith("slides/") and name in after]
        assert len(kept) >= len(hostile_inbox["good"])  # the good patients' slide files are still there
        monkeypatch.undo()

        result = score_inbox(config)  # the next night finishes the work
    assert result["failed_patients"] == {}  # refused on the first night, before its crash
    reasons = "\n".join(p.read_text() for p in sorted((inbox / "failed").glob("*/reason.txt")))
    failed = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in reasons.splitlines()}
    assert set(failed) == {"../escaped-patient", "PX_OUT", hostile_inbox["corrupt_patient"]}
    assert "is not a valid id" in failed["../escaped-patient"]
    assert "leaves the cohort folder" in failed["PX_OUT"]
    assert "slide" in failed[hostile_inbox["corrupt_patient"]]
    scores = pd.read_parquet(tmp_path / "scoring" / "run" / "predictions" / "abmil.parquet")
    assert sorted(scores.patient_id) == hostile_inbox["good"]
    scoring = pd.read_csv(tmp_path / "scoring" / "cohort" / "patients.csv", dtype={"patient_id": str})
    assert sorted(scoring.patient_id) == hostile_inbox["good"]  # the corrupt patient was taken back out

    # nothing escaped: no file named by an id outside its folder, the outside file untouched and not copied
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "escaped.tiff").exists()
    assert not list(tmp_path.glob("escaped*")) and not list((tmp_path / "scoring").rglob("*escaped*"))
    assert (tmp_path / "secret.tiff").read_bytes() == secret
    # the inbox is empty of what was done; what failed is in failed/<batch>/ with the reason
    assert pd.read_csv(inbox / "patients.csv").empty
    moved = pd.concat([pd.read_csv(p, dtype={"patient_id": str}) for p in (inbox / "failed").glob("*/patients.csv")])
    assert sorted(moved.patient_id) == sorted(failed)
    assert list((inbox / "failed").glob("*/slides/climb.tiff"))  # inbox files of failed patients moved with them


def test_a_slide_deleted_while_the_tile_flow_runs_fails_alone(tiny_cohort, tiny_run, tmp_path, prefect_server,
                                                              monkeypatch):
    import fusion.stages
    from flows.tiling import tile_cohort

    cohort, _ = copy_small_cohort(tiny_cohort, tiny_run, tmp_path, with_run=False)
    slides = pd.read_csv(cohort / "slides.csv", dtype={"slide_id": str})
    (cohort / slides.path[0]).unlink()  # missing before the run: failed at planning, no task
    victim, real, calls = cohort / slides.path[4], fusion.stages.tile_slide, []

    def tile_slide(path, slide_id, *args, **kwargs):
        calls.append(slide_id)
        if len(calls) == 2:
            victim.unlink()  # deleted while the stage runs
        return real(path, slide_id, *args, **kwargs)

    monkeypatch.setattr(fusion.stages, "tile_slide", tile_slide)
    results = tile_cohort(str(cohort), str(tmp_path / "run"), slides_per_task=1)
    status = {r["slide_id"]: r["status"] for r in results}
    assert status.pop(slides.slide_id[0]) == "failed" and status.pop(slides.slide_id[4]) == "failed"
    assert set(status.values()) == {"done"}
    assert slides.slide_id[0] not in calls and calls.count(slides.slide_id[4]) == 1  # no task, no retry
    entries = Ledger(tmp_path / "run" / "ledger.jsonl").entries()
    assert not any(e["status"] == "retrying" for e in entries)


def _children(pid: int) -> list:
    import psutil

    return psutil.Process(pid).children(recursive=True)


def test_a_killed_command_leaves_no_prefect_server_behind(tiny_cohort, tiny_run, tmp_path):
    """`fusion tile` without PREFECT_API_URL starts its own Prefect server; SIGKILL the command while
    it runs and the server goes with it."""
    import psutil

    cohort, _ = copy_small_cohort(tiny_cohort, tiny_run, tmp_path, with_run=False)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    proc = subprocess.Popen([sys.executable, "-m", "fusion.cli", "tile", str(cohort), "--out", str(tmp_path / "run")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, servers = time.time() + 300, []
    while time.time() < deadline and not servers and proc.poll() is None:
        servers = [p for p in _children(proc.pid) if "uvicorn" in " ".join(p.cmdline())]
        time.sleep(0.5)
    assert servers, "the command should have started a Prefect server"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(servers, timeout=30)
    for p in alive:  # do not leave it running even when the test fails
        p.kill()
    assert not alive, "the Prefect server outlived the killed command"


@pytest.fixture()
def small_disk(tmp_path):
    """A 256 KiB tmpfs mounted at tmp_path/disk (root only; skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _one_error(output: str) -> str:
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    return errors[0]


def test_a_full_disk_and_a_read_only_run_folder_are_one_line(tiny_cohort, tiny_run, tmp_path, small_disk):
    """Real faults, not injected: the run folder on a 256 KiB file system fills up while `fusion tile`
    runs under Prefect; then the same file system, remounted read-only, refuses `fusion extract`.
    Each ends in one error line naming the path and what to do, exit 2, no traceback, and every file
    left in the run folder is complete."""
    import h5py

    cohort, _ = copy_small_cohort(tiny_cohort, tiny_run, tmp_path, patients=24, with_run=False)
    run = small_disk / "run"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    full = subprocess.run([sys.executable, "-m", "fusion.cli", "tile", str(cohort), "--out", str(run)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert full.returncode == 2, full.stdout[-2000:] + full.stderr[-2000:]
    line = _one_error(full.stdout + full.stderr)
    assert "the disk is full" in line and str(run) in line and "free space" in line
    assert not list(run.rglob("*.partial"))
    for h5 in run.rglob("*.h5"):  # what is there is whole
        with h5py.File(h5, "r") as f:
            assert f["coords"].shape[1] == 2

    assert subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True).returncode == 0
    read_only = subprocess.run([sys.executable, "-m", "fusion.cli", "extract", str(run)], env=env,
                               capture_output=True, text=True, timeout=900)
    assert read_only.returncode == 2, read_only.stdout[-2000:] + read_only.stderr[-2000:]
    line = _one_error(read_only.stdout + read_only.stderr)
    assert "read-only" in line and str(run) in line
