import shutil

import pandas as pd
from typer.testing import CliRunner

from fusion.cli import app

runner = CliRunner()


def test_validate_ok_and_bad(tiny_cohort, tmp_path):
    ok = runner.invoke(app, ["cohort", "validate", str(tiny_cohort)])
    assert ok.exit_code == 0 and "60 patients" in ok.output

    bad = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, bad, ignore=shutil.ignore_patterns("truth"))
    patients = pd.read_csv(bad / "patients.csv")
    patients.loc[0, "os_months"] = -1
    patients.to_csv(bad / "patients.csv", index=False)
    result = runner.invoke(app, ["cohort", "validate", str(bad)])
    assert result.exit_code == 2
    assert "line 2: os_months is negative" in result.output


def test_stage_commands_on_a_small_cohort(tiny_cohort, tmp_path):
    run = tmp_path / "run"
    tile = runner.invoke(app, ["tile", str(tiny_cohort), "--out", str(run), "--local", "--preset", "biopsy",
                               "--tissue", "close_um=32"])
    assert tile.exit_code == 0, tile.output
    bad = runner.invoke(app, ["tile", str(tiny_cohort), "--out", str(run), "--tissue", "close_um=wide"])
    assert bad.exit_code == 2 and "'wide' is not a number" in bad.output
    extract = runner.invoke(app, ["extract", str(run)])
    assert extract.exit_code == 0, extract.output
    train = runner.invoke(app, ["train", str(run), "--folds", "3", "--epochs", "5"])
    assert train.exit_code == 0, train.output
    assert "C-index" in train.output and "oracle" in train.output
    assert "training abmil (3 folds)" in train.output and "15/15" in train.output  # a bar with counts
    again = runner.invoke(app, ["train", str(run), "--folds", "3", "--epochs", "5"])
    assert again.exit_code == 0, again.output
    assert "up to date" in again.output and "training abmil" not in again.output  # no bar for work not done
    assert runner.invoke(app, ["evaluate", str(run)]).exit_code == 0
    baseline = runner.invoke(app, ["train", str(run), "--model", "clinical_cox", "--folds", "3"])
    assert baseline.exit_code == 0, baseline.output
    table = runner.invoke(app, ["compare", str(run)])
    assert table.exit_code == 0 and "abmil" in table.output and "clinical_cox" in table.output
    assert (run / "analysis" / "comparison.csv").exists()
    missing = runner.invoke(app, ["train", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "not a run folder" in missing.output


def test_two_magnifications_are_kept_apart(tiny_cohort, tmp_path):
    from fusion.wsi import read_coords

    run = tmp_path / "run"
    assert runner.invoke(app, ["tile", str(tiny_cohort), "--out", str(run), "--local"]).exit_code == 0
    five = runner.invoke(app, ["tile", str(tiny_cohort), "--out", str(run), "--local", "--set", "5x",
                               "--magnification", "5", "--patch-size", "64"])
    assert five.exit_code == 0, five.output
    slide = sorted((run / "tiles").glob("*.h5"))[0]
    _, attrs20 = read_coords(slide)
    _, attrs5 = read_coords(run / "tiles" / "5x" / slide.name)
    assert attrs20["target_mpp"] == 0.5 and attrs5["target_mpp"] == 2.0 and attrs5["patch_size_level0"] == 256
    assert runner.invoke(app, ["extract", str(run), "--set", "5x"]).exit_code == 0
    assert (run / "features" / "morph" / "5x" / slide.name).exists()
    assert not (run / "features" / "morph" / slide.name).exists()
