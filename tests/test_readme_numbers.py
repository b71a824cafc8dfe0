"""scripts/readme_numbers.py: the README's demo numbers come from a run folder, and only its block changes."""

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "readme_numbers.py"
spec = importlib.util.spec_from_file_location("readme_numbers", SCRIPT)
numbers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(numbers)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """3 patients tiled, a ledger of one pipeline run, and a report for 2 of them."""
    from fusion.cohort import load_cohort
    from fusion.run import init_run
    from fusion.stages import slide_rows, tile_one
    from fusion.synth import SynthConfig, synthesize_cohort
    from fusion.wsi import TilingConfig

    root = tmp_path_factory.mktemp("numbers")
    cohort = synthesize_cohort(root / "cohort", SynthConfig(patients=3, seed=1, slide_px=1024, workers=1))
    layout = init_run(root / "run", cohort)
    tiles = sum(tile_one(layout, sid, path, TilingConfig())["n_tiles"] for sid, path in slide_rows(load_cohort(cohort)))
    ids = pd.read_csv(cohort / "patients.csv").patient_id
    (layout.root / "reports").mkdir()
    for pid in ids[:2]:
        (layout.root / "reports" / f"{pid}.html").write_text("<html></html>")
    (layout.root / "reports" / f"{ids[0]}.v1.signed.html").write_text("<html></html>")  # not a patient's report
    start = 1000.0
    ledger = [{"time": 900.0, "step": "tile", "item": "old-run", "status": "done"},  # an earlier pipeline run
              {"time": 1001.0, "step": "stage", "item": "tile", "status": "planned"},
              {"time": 1010.0, "step": "tile", "item": "S1", "status": "done"},
              {"time": 1025.0, "step": "pretrain", "item": "mocov3", "status": "done"},
              {"time": 1040.0, "step": "extract", "item": "S1", "status": "done"},
              {"time": 1100.0, "step": "train", "item": "abmil", "status": "done"},
              {"time": 1105.0, "step": "evaluate", "item": "abmil", "status": "done"},
              {"time": 1110.0, "step": "analyze", "item": "cohort", "status": "done"},
              {"time": 1300.0, "step": "report", "item": "abmil", "status": "done"}]
    (layout.root / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ledger))
    timings = {"synth": {"seconds": 95.0, "start": 800.0, "date": "2026-12-02", "cores": 2, "load_at_start": 1.5},
               "pipeline": {"seconds": 310.0, "start": start}}
    return layout.root, timings, {"patients": 3, "slides": len(pd.read_csv(cohort / "slides.csv")), "tiles": tiles,
                                  "events": int(pd.read_csv(cohort / "patients.csv").os_event.sum()), "reports": 2}


def test_counts_and_stage_times_come_from_the_run(small_run):
    run, timings, expected = small_run
    assert numbers.counts(run) == expected
    assert numbers.stage_seconds(run, timings["pipeline"]["start"]) == {
        "tile": 10.0, "pretrain": 15.0, "extract": 15.0, "train": 65.0, "analyze": 5.0, "report": 190.0}
    text = numbers.block(run, timings)
    assert f"{expected['slides']} slides" in text and "2 patient reports" in text
    assert "| synthesise the cohort (`fusion synth`) | 1 min 35 s |" in text
    assert "| patient reports | 3 min 10 s |" in text and "| **total** | **6 min 45 s** |" in text


def test_update_rewrites_only_the_marked_block(small_run, tmp_path):
    run, timings, _ = small_run
    before = "# Title\n\nHand-written text, 181 slides.\n\n<!-- demo-numbers -->\nstale: 150 reports\n" \
             "<!-- /demo-numbers -->\n\nMore text after.\n"
    readme = tmp_path / "README.md"
    readme.write_text(before)
    (tmp_path / "timings.json").write_text(json.dumps(timings))
    assert numbers.main(["update", str(run), "--timings", str(tmp_path / "timings.json"), "--readme", str(readme)]) == 0
    after = readme.read_text()
    head, tail = before.split("<!-- demo-numbers -->")[0], before.split("<!-- /demo-numbers -->")[1]
    assert after == head + numbers.block(run, timings) + tail  # everything outside the block is as it was
    assert "stale" not in after and "2 patient reports" in after
    with pytest.raises(ValueError, match="one <!-- demo-numbers -->"):
        numbers.replace_block("no markers here", "x")


def test_timed_records_a_step(tmp_path):
    import sys

    out = tmp_path / "timings.json"
    assert numbers.main(["timed", str(out), "synth", "--", sys.executable, "-c", "pass"]) == 0
    record = json.loads(out.read_text())["synth"]
    assert record["exit_code"] == 0 and record["seconds"] >= 0 and record["cores"] >= 1


def test_the_results_table_is_the_runs_comparison(small_run, tmp_path):
    """The README's model table is written from RUN/analysis/comparison.csv (signs of the paired
    difference as `fusion compare` prints them: the model minus the best), and only its block changes."""
    run, timings, _ = small_run
    (run / "analysis").mkdir(exist_ok=True)
    pd.DataFrame([
        {"model": "coattn", "c_index_mean": 0.81, "c_index_sd": 0.02, "ci_low": 0.77, "ci_high": 0.85,
         "pooled_c_index": 0.80, "folds": 5, "n_patients": 250, "oracle_c_index_mean": 0.864,
         "fraction_of_oracle": 0.85, "diff_vs_best_mean": 0.0, "diff_vs_best_sd": 0.0,
         "diff_vs_best_ci_low": 0.0, "diff_vs_best_ci_high": 0.0},
        {"model": "abmil", "c_index_mean": 0.776, "c_index_sd": 0.026, "ci_low": 0.728, "ci_high": 0.826,
         "pooled_c_index": 0.763, "folds": 5, "n_patients": 250, "oracle_c_index_mean": 0.864,
         "fraction_of_oracle": 0.76, "diff_vs_best_mean": 0.036, "diff_vs_best_sd": 0.024,
         "diff_vs_best_ci_low": -0.008, "diff_vs_best_ci_high": 0.081}]).to_csv(run / "analysis" / "comparison.csv",
                                                                               index=False)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- demo-numbers -->\n<!-- /demo-numbers -->\nkept\n<!-- demo-results -->\nold 0.838\n"
                      "<!-- /demo-results -->\nend\n")
    (tmp_path / "timings.json").write_text(json.dumps(timings))
    numbers.main(["update", str(run), "--timings", str(tmp_path / "timings.json"), "--readme", str(readme)])
    text = readme.read_text()
    assert "old 0.838" not in text and "\nkept\n" in text and text.endswith("<!-- /demo-results -->\nend\n")
    assert "| `coattn` | tiles + genomics + clinical | 0.810 ± 0.020 [0.770, 0.850] | 0.800 | best | 85 % |" in text
    assert "| `abmil` | tiles | 0.776 ± 0.026 [0.728, 0.826] | 0.763 | -0.036 ± 0.024 [-0.081, +0.008] | 76 % |" in text
    assert "the true risk's C on the same folds being 0.864" in text
