"""`fusion pipeline CONFIG.yaml`: stages that redo only what is stale.

The run starts from the shared tiled and featurised tiny cohort with one slide held back; adding
that slide back must start tiling and extraction tasks for it alone (read from the ledger) and
retrain, and a rerun with nothing changed must start no slide task and train nothing.
"""

import json
import shutil

import pandas as pd
import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import pipeline_from_config
from fusion.pipeline_config import PipelineConfigError, load_pipeline_config
from fusion.storage import Ledger


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _copy_run(tiny_cohort, tiny_run, tmp_path):
    cohort, run = tmp_path / "cohort", tmp_path / "run"
    shutil.copytree(tiny_cohort, cohort)
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("models", "ledger.jsonl", "stages"))
    (run / "run.json").write_text(json.dumps({"cohort": str(cohort.resolve())}))
    return cohort, run


def _write_config(tmp_path, **extra) -> object:
    config = {"cohort": "cohort", "run": "run", "models": [{"model": "abmil", "folds": 3, "epochs": 4, "patience": 2}],
              "analysis": {"enabled": False}, "report": {"enabled": False}, **extra}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _slide_steps(ledger: Ledger, since: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in ledger.entries()[since:]:
        if e["step"] in ("tile", "extract", "train"):
            out.setdefault(e["step"], []).append(f"{e['item']}:{e['status']}")
    return out


def test_add_one_slide_reruns_only_that_slide(tiny_cohort, tiny_run, tmp_path, prefect_server):
    cohort, run = _copy_run(tiny_cohort, tiny_run, tmp_path)
    slides = pd.read_csv(cohort / "slides.csv")
    held = slides.iloc[-1]
    slides.iloc[:-1].to_csv(cohort / "slides.csv", index=False)
    for path in [*run.glob(f"tiles/{held.slide_id}.*"), *run.glob(f"features/*/{held.slide_id}.h5")]:
        path.unlink()
    config = load_pipeline_config(_write_config(tmp_path))
    ledger = Ledger(run / "ledger.jsonl")

    first = pipeline_from_config(config)  # tiles and features come from the shared run: only training
    assert _slide_steps(ledger, 0) == {"train": ["abmil:done"]}
    assert first["slides_skipped"] == {"tile": len(slides) - 1, "extract": len(slides) - 1}

    slides.to_csv(cohort / "slides.csv", index=False)  # the slide lands
    n = len(ledger.entries())
    second = pipeline_from_config(config)
    sid = held.slide_id
    assert _slide_steps(ledger, n) == {"tile": [f"{sid}:done"], "extract": [f"{sid}:done"], "train": ["abmil:done"]}
    assert second["slides_done"] == {"tile": 1, "extract": 1} and second["models"][0]["retrained"]

    n = len(ledger.entries())
    third = pipeline_from_config(config)  # nothing changed: no slide task, no training
    assert _slide_steps(ledger, n) == {"train": ["abmil:skipped"]}
    assert not third["models"][0]["retrained"]
    assert third["evaluation"]["c_index_mean"] == second["evaluation"]["c_index_mean"]
    stages = [e for e in ledger.entries()[n:] if e["step"] == "stage"]
    assert [(e["item"], e["todo"]) for e in stages] == [("tile", []), ("extract", [])]


def test_config_errors_name_every_problem(tmp_path):
    path = _write_config(tmp_path, workers=0, models=[{"model": "nope"}], tiling={"patch_size": "big"})
    with pytest.raises(PipelineConfigError) as e:
        load_pipeline_config(path)
    assert "workers" in str(e.value) and "patch_size" in str(e.value)
    path = _write_config(tmp_path, models=[{"model": "nope"}])
    with pytest.raises(PipelineConfigError, match="Unknown model 'nope'"):
        load_pipeline_config(path)


def test_relative_paths_follow_the_config_file(tmp_path):
    config = load_pipeline_config(_write_config(tmp_path))
    assert config.cohort == (tmp_path / "cohort").resolve() and config.run == (tmp_path / "run").resolve()
    assert config.train_configs()[0].folds == 3 and config.train_configs()[0].encoder == "morph"


def test_analysis_and_reports_are_stages_too(tiny_cohort, tiny_run, tmp_path, prefect_server):
    """Analysis and reports run after training, are skipped when nothing changed, and the run's
    artifact links every report."""
    pytest.importorskip("fusion.report.patient")
    from flows.pipeline import summary_markdown

    cohort, run = _copy_run(tiny_cohort, tiny_run, tmp_path)
    patients = list(pd.read_csv(cohort / "patients.csv", dtype={"patient_id": str}).patient_id[:2])
    config = load_pipeline_config(_write_config(tmp_path, analysis={"enabled": True},
                                                report={"enabled": True, "patients": patients}))
    first = pipeline_from_config(config)
    assert [p.rsplit("/", 1)[-1] for p in first["reports"]] == [f"{p}.html" for p in patients]
    assert (run / "analysis").is_dir() and first["analysis"]
    markdown = summary_markdown(first)
    from fusion.ui import files_url

    assert all(f"[{p}]({files_url()}/" in markdown for p in patients)  # through the file server `fusion ui` starts

    ledger = Ledger(run / "ledger.jsonl")
    n = len(ledger.entries())
    second = pipeline_from_config(config)
    assert [(e["step"], e["status"]) for e in ledger.entries()[n:] if e["step"] in ("train", "analyze", "report")] \
        == [("train", "skipped"), ("analyze", "skipped"), ("report", "skipped")]
    assert second["reports"] == first["reports"]


def test_progress_bars_print_prefect_logs_through_the_display():
    import io

    from rich.console import Console

    from flows.progress import _prefect_console_handlers, bar, show_progress

    bar("nothing open", 3).advance()  # without a display: a no-op
    console = Console(file=io.StringIO(), width=100)
    before = [h.console for h in _prefect_console_handlers()]
    with show_progress(console) as progress:
        slides = bar("tiling 2 slide(s)", total=2)
        slides.advance()
        slides.advance()
        bar("nothing to do", total=0).advance()  # no empty bar
        assert [(t.description, t.completed) for t in progress.tasks] == [("tiling 2 slide(s)", 2)]
        assert all(h.console is console for h in _prefect_console_handlers())
    assert [h.console for h in _prefect_console_handlers()] == before


def test_a_bar_appears_only_for_work_that_runs():
    """A stage found up to date never counts anything, so it shows no bar (its log line says so)."""
    import io

    from rich.console import Console

    from flows.progress import bar, show_progress

    with show_progress(Console(file=io.StringIO(), width=100)) as progress:
        idle = bar("training abmil (5 folds x <= 60 epochs)", total=300)
        reports = bar("writing 3 report(s)", total=3)
        reports.advance()
        assert not idle.shown and reports.shown
        assert [(t.description, t.completed, t.total) for t in progress.tasks] == [("writing 3 report(s)", 1, 3)]
