"""The Prefect flow end to end on the tiny cohort, and a rerun that redoes nothing."""

import json

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import pipeline
from fusion.storage import Ledger
from fusion.train.loop import TrainConfig


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_pipeline_runs_and_resumes(tiny_cohort, tmp_path, prefect_server):
    run = tmp_path / "run"
    config = TrainConfig(folds=3, epochs=15, patience=5)
    summary = pipeline(str(tiny_cohort), str(run), train=config)
    n_slides = summary["slides"]
    assert summary["tiles"] > 500 and not summary["failed"]
    assert (run / "summary.json").exists()
    assert json.loads((run / "models" / "abmil" / "evaluation.json").read_text())["c_index_mean"] > 0.55
    assert len(list((run / "features" / "morph").glob("*.h5"))) == n_slides
    assert len(list((run / "tiles").glob("*.tissue.jpg"))) == n_slides

    n_entries = len(Ledger(run / "ledger.jsonl").entries())
    again = pipeline(str(tiny_cohort), str(run), train=config)
    assert again["slides_skipped"] == {"tile": n_slides, "extract": n_slides}
    rerun = Ledger(run / "ledger.jsonl").entries()[n_entries:]  # no slide task started, nothing retrained
    assert [(e["step"], e["status"]) for e in rerun if e["step"] in ("tile", "extract", "train")] == \
        [("train", "skipped")]


def test_a_corrupt_slide_fails_alone(tiny_cohort, tmp_path, prefect_server):
    import shutil

    import pandas as pd

    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    slides = pd.read_csv(cohort / "slides.csv")
    bad = cohort / slides.path[0]
    bad.write_bytes(bad.read_bytes()[:4000])
    summary = pipeline(str(cohort), str(tmp_path / "run"), train=TrainConfig(folds=3, epochs=3, patience=3))
    assert [f["slide_id"] for f in summary["failed"]] == [slides.slide_id[0]]
    assert str(bad) in summary["failed"][0]["error"]
    failed = [e for e in Ledger(tmp_path / "run" / "ledger.jsonl").entries() if e["status"] == "failed"]
    assert [e["item"] for e in failed] == [slides.slide_id[0]]

    from typer.testing import CliRunner

    from fusion.cli import app

    strict = CliRunner().invoke(app, ["tile", str(cohort), "--out", str(tmp_path / "run"), "--local", "--strict"])
    assert strict.exit_code == 1 and slides.slide_id[0] in strict.output
    lenient = CliRunner().invoke(app, ["tile", str(cohort), "--out", str(tmp_path / "run"), "--local"])
    assert lenient.exit_code == 0


def test_tile_flow_rerun_redoes_nothing(tiny_cohort, tmp_path, prefect_server):
    from flows.tiling import tile_cohort

    run = tmp_path / "run"
    first = tile_cohort(str(tiny_cohort), str(run))
    assert {r["status"] for r in first} == {"done"}
    second = tile_cohort(str(tiny_cohort), str(run))
    assert {r["status"] for r in second} == {"skipped"}
    tile_entries = [e for e in Ledger(run / "ledger.jsonl").entries() if e["step"] == "tile"]
    assert [e["status"] for e in tile_entries] == ["done"] * len(first)  # the rerun started no task


def test_transient_io_errors_are_retried(tiny_cohort, tmp_path, prefect_server, monkeypatch):
    """A network-storage hiccup (EIO) on one slide: the task is retried and the slide is tiled."""
    import errno
    import shutil

    import pandas as pd

    import fusion.stages
    from flows.tiling import tile_cohort

    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort, ignore=shutil.ignore_patterns("truth"))
    slides = pd.read_csv(cohort / "slides.csv").head(3)
    slides.to_csv(cohort / "slides.csv", index=False)
    flaky, real = slides.slide_id[1], fusion.stages.tile_slide
    calls = []

    def tile_slide(path, slide_id, *args, **kwargs):
        calls.append(slide_id)
        if slide_id == flaky and calls.count(slide_id) == 1:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path, slide_id, *args, **kwargs)

    monkeypatch.setattr(fusion.stages, "tile_slide", tile_slide)
    results = tile_cohort(str(cohort), str(tmp_path / "run"))
    assert [r["status"] for r in results] == ["done"] * 3 and calls.count(flaky) == 2
    entries = [e for e in Ledger(tmp_path / "run" / "ledger.jsonl").entries() if e["item"] == flaky]
    assert [e["status"] for e in entries] == ["retrying", "done"]


def test_what_counts_as_transient():
    import errno

    from fusion.errors import SlideReadError
    from fusion.stages import is_transient

    assert is_transient(OSError(errno.EIO, "io")) and is_transient(TimeoutError())
    assert not is_transient(FileNotFoundError(errno.ENOENT, "gone"))
    assert not is_transient(SlideReadError("x.svs", "corrupt"))
