"""Shared fixtures: small cohorts synthesised on the fly (no files ship with the tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# One network per fold in tests (and the CLIs they start): by default a 60-patient cohort trains a seed
# ensemble of 5; tests/test_train.py::test_seed_ensemble* exercise that default with it unset.
os.environ.setdefault("FUSION_SEEDS", "1")

from fusion.synth import SynthConfig, synthesize_cohort  # noqa: E402

# A strong image signal (the genomic part is small) so image-only models have something to find.
TINY = SynthConfig(patients=60, seed=7, slide_px=2048, extra_slide_prob=0.15,
                   risk_weights=(1.5, 0.3, 0.1, 0.0), region_um=80.0)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """60 patients, ~70 slides of 2048 x 1536 px at 0.5 um/px."""
    return synthesize_cohort(tmp_path_factory.mktemp("tiny") / "cohort", TINY)


@pytest.fixture(scope="session")
def tiny_run(tiny_cohort, tmp_path_factory) -> Path:
    """The tiny cohort tiled and featurised with `morph` (shared, read-only for tests)."""
    from fusion.run import init_run
    from fusion.stages import build_encoders, extract_one, slide_rows, tile_one
    from fusion.wsi import TilingConfig

    run = tmp_path_factory.mktemp("tiny") / "run"
    layout = init_run(run, tiny_cohort)
    from fusion.cohort import load_cohort

    cohort = load_cohort(tiny_cohort)
    encoders = build_encoders(["morph"])
    for sid, path in slide_rows(cohort):
        assert tile_one(layout, sid, path, TilingConfig())["status"] == "done"
        assert extract_one(layout, sid, path, encoders)["status"] == "done"
    return run


# The default generative story (image, genomics and clinical each carry risk of their own) on small
# slides: what the fusion models and the genomics/clinical baselines are tested on.
TINY_FUSION = SynthConfig(patients=120, seed=8, slide_px=1536, extra_slide_prob=0.1, region_um=80.0)


@pytest.fixture(scope="session")
def tiny_fusion_run(tmp_path_factory) -> Path:
    """120 patients of the default story, tiled and featurised with `morph` (shared, read-only for tests)."""
    from fusion.cohort import load_cohort
    from fusion.run import init_run
    from fusion.stages import build_encoders, extract_one, slide_rows, tile_one
    from fusion.wsi import TilingConfig

    root = tmp_path_factory.mktemp("tiny-fusion")
    cohort_dir = synthesize_cohort(root / "cohort", TINY_FUSION)
    layout = init_run(root / "run", cohort_dir)
    encoders = build_encoders(["morph"])
    for sid, path in slide_rows(load_cohort(cohort_dir)):
        assert tile_one(layout, sid, path, TilingConfig())["status"] == "done"
        assert extract_one(layout, sid, path, encoders)["status"] == "done"
    return root / "run"


# Realistic tissue-detection slides: 4 x 3 mm at 20x with pen marks on every slide, and one 40x.
REALISTIC = SynthConfig(patients=3, seed=11, slide_px=8192, extra_slide_prob=0.0, pen_prob=1.0, debris=8)


@pytest.fixture(scope="session")
def realistic_slides(tmp_path_factory) -> Path:
    return synthesize_cohort(tmp_path_factory.mktemp("realistic") / "cohort", REALISTIC)


@pytest.fixture(scope="session")
def slide_40x(tmp_path_factory) -> Path:
    config = SynthConfig(patients=1, seed=12, slide_px=12288, mpp=0.25, extra_slide_prob=0.0, pen_prob=1.0)
    return synthesize_cohort(tmp_path_factory.mktemp("forty") / "cohort", config)


OPENSLIDE_PYTHON = "openslide-python==1.4.7"


@pytest.fixture(scope="session")
def openslide_fixtures() -> Path:
    """The small real slides that ship in openslide-python's source distribution (Aperio SVS,
    DICOM, generic TIFF, and deliberately broken files), fetched once from PyPI into .cache/."""
    import subprocess
    import sys
    import tarfile

    cache = Path(__file__).resolve().parent.parent / ".cache" / "openslide-python"
    fixtures = next(cache.glob("openslide_python-*/tests/fixtures"), None)
    if fixtures is None:
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               OPENSLIDE_PYTHON, "-d", str(cache)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"cannot fetch {OPENSLIDE_PYTHON} sdist for its test slides: {done.stderr[-500:]}")
        with tarfile.open(next(cache.glob("openslide_python-*.tar.gz"))) as tar:
            tar.extractall(cache, filter="data")
        fixtures = next(cache.glob("openslide_python-*/tests/fixtures"))
    return fixtures


def copy_small_cohort(tiny_cohort: Path, tiny_run: Path, dest: Path, patients: int = 8, with_run: bool = True
                      ) -> tuple[Path, Path]:
    """A cohort of the first `patients` patients of the tiny cohort (their slide files copied) and,
    with `with_run`, a run holding their tiles and `morph` features copied from the shared run."""
    import json
    import shutil

    import pandas as pd

    cohort, run = dest / "cohort", dest / "run"
    cohort.mkdir(parents=True)
    shutil.copy(tiny_cohort / "cohort.yaml", cohort)
    table = pd.read_csv(tiny_cohort / "patients.csv", dtype={"patient_id": str}).head(patients)
    table.to_csv(cohort / "patients.csv", index=False)
    keep = set(table.patient_id)
    for name in ("slides.csv", "genomics.csv"):
        rows = pd.read_csv(tiny_cohort / name, dtype={"patient_id": str, "slide_id": str})
        rows[rows.patient_id.isin(keep)].to_csv(cohort / name, index=False)
    slides = pd.read_csv(cohort / "slides.csv", dtype={"slide_id": str})
    for rel in slides.path:
        (cohort / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_cohort / rel, cohort / rel)
    if with_run:
        for sid in slides.slide_id:
            for src in [*tiny_run.glob(f"tiles/{sid}.*"), *tiny_run.glob(f"features/*/{sid}.h5")]:
                target = run / src.relative_to(tiny_run)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, target)
        (run / "run.json").write_text(json.dumps({"cohort": str(cohort.resolve())}))
    return cohort, run
