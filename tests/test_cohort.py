import shutil

import pandas as pd
import pytest
import yaml

from fusion.cohort import load_cohort
from fusion.errors import CohortError


def test_synthetic_cohort_loads(tiny_cohort):
    cohort = load_cohort(tiny_cohort)
    assert len(cohort.patients) == 60
    assert set(cohort.slides.patient_id) <= set(cohort.patients.patient_id)
    assert cohort.genomics is not None and cohort.genomics.shape[1] == 8 * 16
    # Ground truth stays out of the tables the models read.
    assert not {"true_risk", "z_img", "z_gene"} & set(cohort.patients.columns)


def _copy(tiny_cohort, tmp_path):
    dst = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, dst, ignore=shutil.ignore_patterns("*.tiff", "truth"))
    return dst


def test_every_problem_is_reported_with_its_line(tiny_cohort, tmp_path):
    root = _copy(tiny_cohort, tmp_path)
    patients = pd.read_csv(root / "patients.csv", dtype={"patient_id": str})
    patients.loc[3, "os_months"] = -4.0  # line 5
    patients.loc[5, "os_event"] = 2  # line 7
    patients.loc[8, "patient_id"] = patients.loc[9, "patient_id"]  # duplicate at line 11
    patients = patients.drop(columns=["age"])
    patients.to_csv(root / "patients.csv", index=False)

    with pytest.raises(CohortError) as info:
        load_cohort(root, strict=True)
    message = str(info.value)
    assert "patients.csv line 5: os_months is negative (-4.0)" in message
    assert "patients.csv line 7: os_event must be 0 or 1, got '2'" in message
    assert "patients.csv line 11: duplicate patient_id" in message
    assert "patients.csv: missing column 'age'" in message
    # The slides were not copied: with `strict`, every slide file is reported missing, with its line.
    assert "slides.csv line 2: slide file not found: slides/" in message
    assert len(info.value.problems) >= 4 + len(pd.read_csv(root / "slides.csv"))


def test_a_missing_slide_file_is_that_slides_failure_not_the_cohorts(tiny_cohort, tmp_path):
    root = _copy(tiny_cohort, tmp_path)
    slides = pd.read_csv(root / "slides.csv")
    cohort = load_cohort(root)
    assert list(cohort.missing_slides) == list(slides.slide_id)
    assert cohort.missing_slides[slides.slide_id[0]] == f"slides.csv line 2: slide file not found: {slides.path[0]}"


def test_unknown_patient_and_bad_gene_value(tiny_cohort, tmp_path):
    root = _copy(tiny_cohort, tmp_path)
    slides = pd.read_csv(root / "slides.csv")
    slides.loc[0, "patient_id"] = "NOBODY"
    slides.to_csv(root / "slides.csv", index=False)
    genomics = pd.read_csv(root / "genomics.csv")
    genomics["PROLIF_01"] = genomics["PROLIF_01"].astype(object)
    genomics.loc[2, "PROLIF_01"] = "high"
    genomics.to_csv(root / "genomics.csv", index=False)
    with pytest.raises(CohortError) as info:
        load_cohort(root, check_files=False)
    message = str(info.value)
    assert "slides.csv line 2: patient_id 'NOBODY' is not in patients.csv" in message
    assert "genomics.csv line 4: gene 'PROLIF_01' is not a number ('high')" in message


def test_parquet_tables_and_bad_yaml(tiny_cohort, tmp_path):
    root = _copy(tiny_cohort, tmp_path)
    pd.read_csv(root / "patients.csv", dtype={"patient_id": str}).to_parquet(root / "patients.parquet")
    spec = yaml.safe_load((root / "cohort.yaml").read_text())
    spec["tables"]["patients"] = "patients.parquet"
    (root / "cohort.yaml").write_text(yaml.safe_dump(spec))
    cohort = load_cohort(root, check_files=False)
    assert len(cohort.patients) == 60

    spec["outcome"]["tiem"] = "x"
    (root / "cohort.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(CohortError, match="outcome.tiem"):
        load_cohort(root, check_files=False)


def test_slide_paths_must_stay_inside_the_cohort(tiny_cohort, tmp_path):
    root = _copy(tiny_cohort, tmp_path)
    slides = pd.read_csv(root / "slides.csv")
    slides.loc[0, "path"] = "../../etc/passwd"
    slides.loc[1, "path"] = "/etc/hostname"
    slides.to_csv(root / "slides.csv", index=False)
    with pytest.raises(CohortError) as info:
        load_cohort(root, check_files=False)
    assert "slides.csv line 2: path '../../etc/passwd' leaves the cohort folder" in str(info.value)
    assert "slides.csv line 3: path '/etc/hostname' leaves the cohort folder" in str(info.value)
    spec = yaml.safe_load((root / "cohort.yaml").read_text())
    spec["allow_external_paths"] = True
    (root / "cohort.yaml").write_text(yaml.safe_dump(spec))
    assert len(load_cohort(root, check_files=False).slides) == len(slides)


def test_blank_outcome_means_not_known_yet_but_half_blank_is_an_error(tiny_cohort, tmp_path):
    root = _copy(tiny_cohort, tmp_path)
    patients = pd.read_csv(root / "patients.csv", dtype={"patient_id": str})
    patients.loc[2, ["os_months", "os_event"]] = None  # line 4: a patient to score, outcome unknown
    patients.to_csv(root / "patients.csv", index=False)
    cohort = load_cohort(root, check_files=False)
    assert pd.isna(cohort.patients.iloc[2]["os_months"])

    patients.loc[6, "os_event"] = None  # line 8: a time without its event
    patients.to_csv(root / "patients.csv", index=False)
    with pytest.raises(CohortError, match="line 8: os_months and os_event must be both given or both blank"):
        load_cohort(root, check_files=False)
