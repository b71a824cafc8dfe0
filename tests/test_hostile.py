"""Hostile input and faults (issue 13): each case is the attack or the fault, then the assertion that
nothing escaped the run folder, nothing already computed was lost, and one bad item failed alone.

The Prefect and serve cases are in test_hostile_flows.py; random inputs in test_fuzz.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import copy_small_cohort
from typer.testing import CliRunner

from fusion.cli import app
from fusion.cohort import load_cohort
from fusion.errors import CohortError, RunError
from fusion.run import RunLayout, open_run
from fusion.storage import Ledger

runner = CliRunner()


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and mtime: to show that nothing else was written."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _outside(tree_before: dict, tree_after: dict, run: Path) -> list[str]:
    """Files created or changed outside `run` between two snapshots."""
    changed = {k for k, v in tree_after.items() if tree_before.get(k) != v}
    return sorted(k for k in changed if not Path(k).is_relative_to(run))


def _one_error_line(result) -> str:
    """The command failed with one clear error line and no traceback; returns the line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture()
def small(tiny_cohort, tiny_run, tmp_path):
    """8 patients: cohort folder and a run with their tiles and features."""
    return copy_small_cohort(tiny_cohort, tiny_run, tmp_path)


# --- 1. Ids are not paths -------------------------------------------------------------------------------


def test_ids_that_are_paths_are_refused_at_validation_with_their_rows(small):
    cohort, _ = small
    patients = pd.read_csv(cohort / "patients.csv", dtype={"patient_id": str})
    slides = pd.read_csv(cohort / "slides.csv", dtype={"patient_id": str, "slide_id": str})
    old = patients.patient_id[0]
    patients.loc[0, "patient_id"] = "../../../tmp/x"  # line 2
    patients.loc[1, "patient_id"] = ".hidden"  # line 3
    patients.loc[2, "patient_id"] = "A" * 129  # line 4: too long
    slides.loc[slides.patient_id == old, "patient_id"] = "../../../tmp/x"
    slides.loc[0, "slide_id"] = "a/b"  # line 2
    slides.loc[1, "slide_id"] = "x..y"  # line 3
    patients.to_csv(cohort / "patients.csv", index=False)
    slides.to_csv(cohort / "slides.csv", index=False)
    genomics = pd.read_csv(cohort / "genomics.csv", dtype={"patient_id": str})
    genomics[genomics.patient_id != old].to_csv(cohort / "genomics.csv", index=False)

    result = runner.invoke(app, ["cohort", "validate", str(cohort)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "patients.csv line 2: patient_id '../../../tmp/x' is not a valid id" in text
    assert "patients.csv line 3: patient_id '.hidden' is not a valid id" in text
    assert "patients.csv line 4: patient_id 'AAAA" in text
    assert "slides.csv line 2: slide_id 'a/b' is not a valid id" in text
    assert "slides.csv line 3: slide_id 'x..y' is not a valid id: it contains '..'" in text


def test_ids_equal_but_for_case_are_refused(small):
    cohort, _ = small
    patients = pd.read_csv(cohort / "patients.csv", dtype={"patient_id": str})
    slides = pd.read_csv(cohort / "slides.csv", dtype={"patient_id": str, "slide_id": str})
    slides.loc[1, "slide_id"] = slides.slide_id[0].lower()
    slides.to_csv(cohort / "slides.csv", index=False)
    with pytest.raises(CohortError, match="slides.csv line 3: slide_id .* differs from .* only by case"):
        load_cohort(cohort)
    assert len(patients) == 8


def test_the_run_layout_never_hands_out_a_path_outside_the_run(tmp_path):
    layout = RunLayout(tmp_path / "run")
    for bad in ("../../x", "/etc/passwd", ".x", "a/b", ""):
        with pytest.raises(ValueError, match="not a valid id"):
            layout.tiles_h5(bad)
    with pytest.raises(ValueError):
        layout.features_h5("../morph", "S1")
    with pytest.raises(ValueError):
        layout.report_path("../../evil")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tiles").symlink_to(tmp_path / "elsewhere")  # a symlink planted in the run
    with pytest.raises(RunError, match="resolves outside the run folder"):
        layout.tiles_h5("S1")


# --- 3 and 4. A bad slide fails alone; what was derived from it is invalidated ------------------------------


def test_a_slide_missing_before_the_run_fails_alone(small):
    cohort, run = small
    slides = pd.read_csv(cohort / "slides.csv", dtype={"slide_id": str})
    gone = slides.slide_id[2]
    (cohort / slides.path[2]).unlink()
    before = _tree(cohort.parent)

    result = runner.invoke(app, ["tile", str(cohort), "--out", str(run), "--local"])
    assert result.exit_code == 0, result.output
    assert f"failed {gone}: slides.csv line 4: slide file not found" in " ".join(result.output.split())
    entries = Ledger(run / "ledger.jsonl").entries()
    assert [(e["item"], e["status"]) for e in entries if e["status"] == "failed"] == [(gone, "failed")]
    assert not any(e["status"] == "retrying" for e in entries)  # a missing file is not retried
    # its old tiles and features moved to RUN/stale/ (never read again), the others untouched
    assert not (run / "tiles" / f"{gone}.h5").exists() and (run / "stale" / "tiles" / f"{gone}.h5").exists()
    assert (run / "stale" / "features" / "morph" / f"{gone}.h5").exists()
    assert len(list((run / "tiles").glob("*.h5"))) == len(slides) - 1
    assert _outside(before, _tree(cohort.parent), run) == []

    strict = runner.invoke(app, ["tile", str(cohort), "--out", str(run), "--local", "--strict"])
    assert strict.exit_code == 1
    validate = runner.invoke(app, ["cohort", "validate", str(cohort)])
    assert validate.exit_code == 0 and "warning:" in validate.output
    assert runner.invoke(app, ["cohort", "validate", str(cohort), "--strict"]).exit_code == 2


def test_a_slide_that_became_unreadable_is_invalidated_and_training_goes_on(tiny_cohort, tiny_run, tmp_path):
    """After tiling, a slide file is damaged: the next tiling fails it alone and moves its tiles and
    features to RUN/stale/; training then runs on the other slides (nothing stale is read)."""
    from fusion.stages import train_stage
    from fusion.train.loop import TrainConfig

    cohort, run = copy_small_cohort(tiny_cohort, tiny_run, tmp_path, patients=24)
    slides = pd.read_csv(cohort / "slides.csv", dtype={"slide_id": str, "patient_id": str})
    bad = cohort / slides.path[0]
    bad.write_bytes(bad.read_bytes()[:5000])
    result = runner.invoke(app, ["tile", str(cohort), "--out", str(run), "--local"])
    assert result.exit_code == 0, result.output
    sid = slides.slide_id[0]
    assert (run / "stale" / "tiles" / f"{sid}.h5").exists() and not (run / "tiles" / f"{sid}.h5").exists()
    assert not (run / "features" / "morph" / f"{sid}.h5").exists()
    layout, c = open_run(run)
    summary = train_stage(layout, c, TrainConfig(folds=2, epochs=1, patience=1))
    if (slides.patient_id == slides.patient_id[0]).sum() == 1:
        assert slides.patient_id[0] in summary["patients_without_features"]


def test_a_slide_deleted_mid_run_fails_alone_and_is_not_retried(small, monkeypatch):
    import fusion.stages

    cohort, run = small
    slides = pd.read_csv(cohort / "slides.csv", dtype={"slide_id": str})
    victim = cohort / slides.path[3]
    real, calls = fusion.stages.tile_slide, []

    def tile_slide(path, slide_id, *args, **kwargs):  # the operator deletes a slide while the stage runs
        calls.append(slide_id)
        if len(calls) == 2:
            victim.unlink()
        return real(path, slide_id, *args, **kwargs)

    monkeypatch.setattr(fusion.stages, "tile_slide", tile_slide)
    shutil.rmtree(run / "tiles")
    result = runner.invoke(app, ["tile", str(cohort), "--out", str(run), "--local"])
    assert result.exit_code == 0, result.output
    entries = [e for e in Ledger(run / "ledger.jsonl").entries() if e["step"] == "tile"]
    assert [e["item"] for e in entries if e["status"] == "failed"] == [slides.slide_id[3]]
    assert calls.count(slides.slide_id[3]) == 1  # not retried
    assert sum(e["status"] == "done" for e in entries) == len(slides) - 1


# --- 5. Durable logs and artifacts ----------------------------------------------------------------------


def test_a_torn_ledger_line_is_skipped_counted_and_repaired(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.record("tile", "S1", "done")
    with (tmp_path / "ledger.jsonl").open("ab") as f:
        f.write(b'{"item": "S2", "status": "do')  # killed mid-write
    ledger.record("tile", "S3", "done")
    assert [e["item"] for e in ledger.entries()] == ["S1", "S3"] and ledger.torn == 1
    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["item"] == "S3"  # the new entry is whole, on its own line


def test_features_that_do_not_match_their_encoder_or_tiles_are_stale_and_redone(small):
    from fusion.stages import build_encoders, extract_one, extraction_is_current

    cohort, run = small
    layout, c = open_run(run)
    encoders = build_encoders(["morph"])
    sid, path = str(c.slides.slide_id[0]), str(c.slides.path[0])
    h5 = layout.features_h5("morph", sid)
    assert extraction_is_current(layout, sid, encoders) is not None
    with h5py.File(h5, "r") as f:
        good, attrs = f["features"][:], dict(f.attrs)
    for damage in ("rows", "dim", "truncated"):
        if damage == "truncated":
            h5.write_bytes(h5.read_bytes()[:3000])
        else:
            feats = good[:-1] if damage == "rows" else good[:, :-1]
            with h5py.File(h5, "w") as f:  # a file that claims to be current
                f.create_dataset("features", data=feats)
                f.create_dataset("coords", data=np.zeros((len(feats), 2), np.int64))
                for k, v in attrs.items():
                    f.attrs[k] = v
        assert extraction_is_current(layout, sid, encoders) is None, damage
        assert extract_one(layout, sid, path, encoders)["status"] == "done", damage
        with h5py.File(h5, "r") as f:
            assert f["features"].shape == good.shape, damage


def test_a_truncated_tiles_file_is_redone_not_a_failure(small):
    from fusion.stages import tile_one
    from fusion.wsi import TilingConfig

    cohort, run = small
    layout, c = open_run(run)
    sid, path = str(c.slides.slide_id[0]), str(c.slides.path[0])
    h5 = layout.tiles_h5(sid)
    rows = h5py.File(h5, "r")["coords"].shape[0]
    h5.write_bytes(h5.read_bytes()[:2000])
    assert tile_one(layout, sid, path, TilingConfig())["status"] == "done"
    assert h5py.File(h5, "r")["coords"].shape[0] == rows


def test_the_model_fingerprint_covers_config_json(tmp_path):
    from fusion.models import create_model
    from fusion.train.checkpoint import load_checkpoint, save_checkpoint

    model = create_model("abmil", in_dim=8, hidden=8)
    save_checkpoint(model, "abmil", {"in_dim": 8, "hidden": 8}, tmp_path, {"percentiles": [0.1, 0.5]})
    load_checkpoint(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["percentiles"] = [0.9, 0.95]  # a reader of the report would see other risk groups
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json was changed after training"):
        load_checkpoint(tmp_path)


# --- 7. Clean failure -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_refusing_disk_stops_with_one_line_and_nothing_half_written(small, monkeypatch, fault):
    """Full disk, read-only file system, permission denied (injected where every write ends: the
    rename of the finished temporary file; root ignores file modes, so they cannot be set up here)."""
    import fusion.storage

    cohort, run = small
    shutil.rmtree(run / "tiles")
    real_replace = os.replace

    def replace(src, dst):
        if "tiles" in str(dst):
            raise OSError(fault, os.strerror(fault), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(fusion.storage.os, "replace", replace)
    result = runner.invoke(app, ["tile", str(cohort), "--out", str(run), "--local"])
    line = _one_error_line(result)
    assert str(run / "tiles") in line
    assert {errno.ENOSPC: "disk is full", errno.EROFS: "read-only", errno.EACCES: "permission denied"}[fault] in line
    assert not list((run / "tiles").glob("*")) if (run / "tiles").exists() else True  # nothing half-written
    failed = [e for e in Ledger(run / "ledger.jsonl").entries() if e["status"] == "failed"]
    assert failed == []  # the disk, not a slide, was at fault


def test_semicolon_utf16_and_bom_tables(small):
    cohort, _ = small
    patients = pd.read_csv(cohort / "patients.csv", dtype={"patient_id": str})
    patients.to_csv(cohort / "patients.csv", index=False, sep=";")
    result = runner.invoke(app, ["cohort", "validate", str(cohort)])
    assert result.exit_code == 2 and "separated by semicolons, not commas" in " ".join(result.output.split())
    (cohort / "patients.csv").write_bytes(patients.to_csv(index=False).encode("utf-16"))
    result = runner.invoke(app, ["cohort", "validate", str(cohort)])
    assert result.exit_code == 2 and "UTF-16" in result.output
    (cohort / "patients.csv").write_bytes(b"\xef\xbb\xbf" + patients.to_csv(index=False).encode())  # Excel's BOM
    result = runner.invoke(app, ["cohort", "validate", str(cohort)])
    assert result.exit_code == 0, result.output


def test_table_paths_in_cohort_yaml_stay_in_the_cohort(small, tmp_path):
    cohort, _ = small
    shutil.copy(cohort / "patients.csv", tmp_path / "outside.csv")
    spec = yaml.safe_load((cohort / "cohort.yaml").read_text())
    spec["tables"]["patients"] = "../outside.csv"
    (cohort / "cohort.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(CohortError, match="tables.patients '../outside.csv' leaves the cohort folder"):
        load_cohort(cohort)


def test_a_damaged_run_json_is_one_line(small):
    _, run = small
    (run / "run.json").write_text('{"coh')
    line = _one_error_line(runner.invoke(app, ["extract", str(run)]))
    assert "run.json is damaged" in line
