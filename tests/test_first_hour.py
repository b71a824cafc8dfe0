"""A newcomer's mistakes and an operator's inbox (issue 18, items 2 and 3): a mistyped path is one line
before any machinery starts and binds nothing; names get a "did you mean"; the inbox never drops a
patient silently; abandoned temporary files are swept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import copy_small_cohort

from fusion.cohort import load_cohort
from fusion.errors import CohortError, RunError
from fusion.storage import Ledger, atomic_path, sweep_partials

HEAVY = ("prefect", "torch", "sksurv")


def _cli(args: list[str], cwd: Path) -> tuple[int, str, list[str]]:
    """Run `fusion ARGS` in a fresh interpreter: (exit code, stderr, heavy libraries it imported)."""
    probe = (f"import sys\nfrom fusion.cli import app\ncode = 0\ntry:\n    app({args!r})\n"
             "except SystemExit as e:\n    code = e.code\n"
             f"print('result', code, ','.join(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "COLUMNS": "200"})
    last = done.stdout.strip().splitlines()[-1].split(" ")
    return int(last[1]), done.stderr, [m for m in (last[2] if len(last) > 2 else "").split(",") if m]


@pytest.fixture()
def cohort(tiny_cohort, tmp_path) -> Path:
    """Two patients of the tiny cohort, with their slide files."""
    return copy_small_cohort(tiny_cohort, tiny_cohort, tmp_path, patients=2, with_run=False)[0]


# --- 2. Errors before machinery ---------------------------------------------------------------------------------

def test_a_mistyped_cohort_is_one_line_before_prefect_and_binds_nothing(cohort, tmp_path):
    """`fusion tile` (the Prefect path) and `fusion pipeline`: the error line names the closest folder, Prefect
    is not even imported, the run folder is not created; the corrected command then works on the same --out."""
    code, stderr, heavy = _cli(["tile", "cohrot", "--out", "runs/r1"], tmp_path)
    assert code == 2 and heavy == []
    assert stderr.strip().splitlines() == [f"error: cohort {tmp_path / 'cohrot'}: the folder does not exist "
                                           f"(did you mean {cohort}?)"]
    assert not (tmp_path / "runs").exists()

    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump({"cohort": "cohrot", "run": "runs/p1", "models": [{"model": "clinical_cox"}]}))
    code, stderr, heavy = _cli(["pipeline", str(config)], tmp_path)
    assert code == 2 and "prefect" not in heavy
    assert stderr.strip().splitlines() == [f"error: cohort {tmp_path / 'cohrot'}: the folder does not exist "
                                           f"(did you mean {cohort}?)"]
    assert not (tmp_path / "runs").exists()

    code, stderr, heavy = _cli(["tile", "cohort", "--out", "runs/r1", "--local"], tmp_path)
    assert code == 0, stderr
    assert heavy == []  # tiling needs neither torch nor scikit-survival (issue 17)
    assert json.loads((tmp_path / "runs" / "r1" / "run.json").read_text()) == {"cohort": str(cohort)}


def test_the_pipeline_checks_what_its_config_names_before_prefect(cohort, tmp_path):
    base = {"cohort": str(cohort), "run": "runs/p1", "models": [{"model": "abmil"}]}
    cases = [({"extract": {"encoders": ["morh"]}}, "extract.encoders: unknown encoder 'morh' (did you mean 'morph'?)"),
             ({"report": {"model": "abmli"}}, "report.model: 'abmli' is not a model of this config (abmil) "
                                              "(did you mean 'abmil'?)"),
             ({"report": {"patients": ["P000"]}}, "report.patients: 'P000' is not a patient of")]
    for extra, expected in cases:
        config = tmp_path / "p.yaml"
        config.write_text(yaml.safe_dump({**base, **extra}))
        code, stderr, heavy = _cli(["pipeline", str(config)], tmp_path)
        assert code == 2 and "prefect" not in heavy
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], stderr
        assert not (tmp_path / "runs").exists()  # check first, bind after


def test_a_run_bound_to_a_folder_that_never_existed_is_bound_again(cohort, tmp_path):
    """A run folder that an earlier version bound to a mistyped path holds nothing: the corrected command
    binds it. A run bound to a real cohort, or holding outputs, still refuses another cohort."""
    from fusion.run import start_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"cohort": str(tmp_path / "cohrot")}))
    layout, _ = start_run(run, cohort)
    assert json.loads((run / "run.json").read_text()) == {"cohort": str(cohort)}
    assert [e["status"] for e in layout.ledger.entries()] == ["rebound"]

    other = tmp_path / "other"
    other.mkdir()
    (other / "cohort.yaml").write_text((cohort / "cohort.yaml").read_text())
    for name in ("patients.csv", "slides.csv", "genomics.csv"):
        (other / name).write_text((cohort / name).read_text())
    with pytest.raises(RunError, match="belongs to cohort"):
        start_run(run, other)  # bound to a real cohort
    (run / "run.json").write_text(json.dumps({"cohort": str(tmp_path / "gone")}))
    (run / "tiles").mkdir()
    with pytest.raises(RunError, match="belongs to cohort"):
        start_run(run, cohort)  # it holds outputs of another cohort


def test_mistyped_columns_keys_and_folders_name_the_closest_real_one(cohort, tmp_path):
    spec = yaml.safe_load((cohort / "cohort.yaml").read_text())
    spec["clinical"] = {"agee": "numeric", "grade": "categorical"}
    spec["outcome"]["time"] = "os_month"
    (cohort / "cohort.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(CohortError) as info:
        load_cohort(cohort)
    assert ("patients.csv: missing column 'os_month' (named by outcome.time in cohort.yaml) "
            "(did you mean 'os_months'?)") in info.value.problems
    assert "patients.csv: missing column 'agee' (named by clinical in cohort.yaml) (did you mean 'age'?)" \
        in info.value.problems

    spec["tabels"] = spec.pop("tables")
    (cohort / "cohort.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(CohortError, match=r"tabels: Extra inputs are not permitted \(did you mean 'tables'\?\)"):
        load_cohort(cohort)

    with pytest.raises(CohortError) as info:  # the parent folder given instead of the cohort
        load_cohort(cohort.parent)
    assert str(info.value) == (f"cohort {cohort.parent}: cohort.yaml not found in {cohort.parent} "
                               f"(did you mean {cohort}?)")


# --- Temporary files of killed processes ------------------------------------------------------------------------

_WRITER = """import sys, time
from fusion.storage import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half")
    print(tmp, flush=True)
    time.sleep(600)
"""


def _writer(final: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(final)], stdout=subprocess.PIPE, text=True)
    return proc, Path(proc.stdout.readline().strip())


def test_partials_of_killed_processes_are_swept_and_live_ones_kept(cohort, tmp_path):
    from fusion.run import start_run

    run = tmp_path / "run"
    killed, killed_tmp = _writer(run / "tiles" / "A.h5")
    alive, alive_tmp = _writer(run / "tiles" / "B.h5")
    try:
        killed.send_signal(signal.SIGKILL)  # as the OOM killer does: no clean-up runs
        killed.wait()
        untagged_old = run / "features" / "morph" / ".C.h5.x1y2z3w4.partial"  # made before names had a pid
        untagged_new = run / "features" / "morph" / ".D.h5.a1b2c3d4.partial"
        untagged_old.parent.mkdir(parents=True)
        untagged_old.write_bytes(b"old")
        untagged_new.write_bytes(b"new")
        two_days_ago = time.time() - 2 * 86400
        os.utime(untagged_old, (two_days_ago, two_days_ago))

        assert killed_tmp.exists() and alive_tmp.exists()
        layout, _ = start_run(run, cohort)  # a stage starts
        assert not killed_tmp.exists() and not untagged_old.exists()
        assert alive_tmp.exists() and untagged_new.exists()  # a live writer's file, and one too recent to judge
        swept = [e for e in layout.ledger.entries() if e["step"] == "cleanup"]
        assert sorted(swept[0]["removed"]) == sorted(str(p.relative_to(run)) for p in (killed_tmp, untagged_old))
        assert sweep_partials(run) == []
    finally:
        alive.kill()
        alive.wait()
    assert sweep_partials(run) == [alive_tmp]


def test_a_finished_write_leaves_no_partial(tmp_path):
    with atomic_path(tmp_path / "x.json") as tmp:
        tmp.write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


# --- 3. The inbox is never silent -------------------------------------------------------------------------------

def _drop(cohort: Path, inbox: Path, ids: list[str]) -> None:
    """Copy these patients of `cohort` (rows and slide files) into the inbox."""
    import shutil

    inbox.mkdir(exist_ok=True)
    for name in ("patients.csv", "slides.csv", "genomics.csv"):
        rows = pd.read_csv(cohort / name, dtype={"patient_id": str, "slide_id": str})
        rows = rows[rows.patient_id.isin(ids)]
        old = inbox / name
        if old.exists() and len(pd.read_csv(old)):
            rows = pd.concat([pd.read_csv(old, dtype={"patient_id": str, "slide_id": str}), rows])
        rows.to_csv(old, index=False)
        if name == "slides.csv":
            for rel in rows.path:
                (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(cohort / rel, inbox / rel)


def test_a_patient_scored_before_is_refused_with_its_reason_and_training_ids_warn(cohort, tmp_path):
    """Library level, without Prefect: intake refuses a patient the ledger says was scored and released,
    takes in a leftover of a crashed night (taken in, not released), and warns on training ids."""
    from fusion.scoring import intake_inbox, release_inbox, released_patients

    inbox, scoring = tmp_path / "inbox", tmp_path / "scoring"
    ids = sorted(pd.read_csv(cohort / "patients.csv", dtype={"patient_id": str}).patient_id)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    _drop(cohort, inbox, ids[:1])
    first = intake_inbox(inbox, scoring, cohort, "b1", released=released_patients(ledger))
    assert first.arrived == ids[:1] and first.failed == {}
    assert "also a patient of the training cohort" in first.warnings[ids[0]]

    # The night crashed before the release: the patient is still in the inbox, and is not refused.
    again = intake_inbox(inbox, scoring, cohort, "b2", released=released_patients(ledger))
    assert again.failed == {} and again.arrived == []
    assert release_inbox(inbox, {ids[0]}, ledger, "b2") == ids[:1]

    # Dropped in again after its release, with a new patient beside it: refused, the other taken in.
    _drop(cohort, inbox, ids[:2])
    third = intake_inbox(inbox, scoring, cohort, "b3", released=released_patients(ledger))
    assert list(third.scored_before) == ids[:1] and third.arrived == ids[1:2]
    assert "already scored (batch b2)" in third.failed[ids[0]]
    assert ids[0] in (inbox / "failed" / "b3" / "reason.txt").read_text()
    assert ids[0] not in set(pd.read_csv(inbox / "patients.csv", dtype={"patient_id": str}).patient_id)


def test_an_inbox_with_slides_but_no_patients_table_is_an_error(cohort, tmp_path):
    from fusion.scoring import intake_inbox

    inbox = tmp_path / "inbox"
    _drop(cohort, inbox, ["P0000"])
    (inbox / "patients.csv").unlink()
    with pytest.raises(CohortError, match="patients.csv: file not found"):
        intake_inbox(inbox, tmp_path / "scoring", cohort, "b1")


def test_a_missing_inbox_is_one_line_before_prefect(cohort, tmp_path):
    model = tmp_path / "run" / "models" / "abmil" / "fold-0"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (tmp_path / "inbox").mkdir()
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump({"cohort": str(cohort), "run": "run", "models": [{"model": "abmil"}],
                                      "serve": {"inbox": "inbx", "workdir": "scoring"}}))
    code, stderr, heavy = _cli(["serve", str(config), "--once"], tmp_path)
    assert code == 2 and "prefect" not in heavy
    assert stderr.strip().splitlines() == [
        f"error: serve.inbox: the inbox folder {tmp_path / 'inbx'} does not exist (did you mean {tmp_path / 'inbox'}?);"
        f" create it (mkdir -p {tmp_path / 'inbx'}) or correct `serve.inbox` in {config}"]


def test_synth_ids_for_new_patients(tmp_path):
    from fusion.synth import SynthConfig, synthesize_cohort

    out = synthesize_cohort(tmp_path / "new", SynthConfig(patients=2, slide_px=1024, workers=1, id_prefix="N",
                                                          id_offset=250))
    assert list(pd.read_csv(out / "patients.csv").patient_id) == ["N0250", "N0251"]
    assert json.loads((out / "truth" / "config.json").read_text())["id_prefix"] == "N"
    with pytest.raises(ValueError, match="--id-prefix '../' makes patient ids that cannot be used"):
        synthesize_cohort(tmp_path / "bad", SynthConfig(patients=2, id_prefix="../"))
    assert not (tmp_path / "bad").exists()


def test_serve_model_best_is_the_best_network_with_weights(tmp_path):
    """`serve.model: best` picks the survival network with the highest fold-mean C; a baseline with a
    higher C keeps no weights to score with and is passed over; no network at all is one clear error."""
    from fusion.pipeline_config import PipelineConfigError
    from fusion.preflight import _best_trained_network

    models = tmp_path / "models"
    for name, c, weights in (("abmil", 0.71, True), ("coattn", 0.74, True), ("coxnet", 0.80, False)):
        (models / name / "fold-0").mkdir(parents=True)
        (models / name / "cv_metrics.json").write_text(json.dumps({"task": "survival", "c_index_mean": c}))
        if weights:
            (models / name / "fold-0" / "model.safetensors").write_bytes(b"")
    assert _best_trained_network(models, "demo.yaml") == "coattn"
    for name in ("abmil", "coattn"):
        (models / name / "fold-0" / "model.safetensors").unlink()
    with pytest.raises(PipelineConfigError, match="serve.model: best: no trained survival network"):
        _best_trained_network(models, "demo.yaml")


def test_encoders_the_config_pretrains_are_known_before_they_exist(cohort, tmp_path):
    """`pretrain:` makes its encoders before extraction, so extract.encoders may name them; an encoder
    neither built in nor pretrained by the config is still refused."""
    from fusion.pipeline_config import PipelineConfigError, load_pipeline_config
    from fusion.preflight import check_pipeline

    config = tmp_path / "p.yaml"
    base = {"cohort": str(cohort), "run": "run", "models": [{"model": "abmil", "encoder": "morph+mocov3"}]}
    config.write_text(yaml.safe_dump({**base, "pretrain": [{"method": "mocov3"}],
                                      "extract": {"encoders": ["morph", "mocov3"]}}))
    check_pipeline(load_pipeline_config(config))
    config.write_text(yaml.safe_dump({**base, "pretrain": [{"method": "mocov3"}],
                                      "extract": {"encoders": ["morph", "mocov3", "dino"]}}))
    with pytest.raises(PipelineConfigError, match="extract.encoders: unknown encoder 'dino'"):
        check_pipeline(load_pipeline_config(config))
