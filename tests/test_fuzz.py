"""Fuzz (issue 13): random ids, random bytes in each table, and truncated h5 / parquet / json files at
every stage. Invariant: a correct result or one clear error; never a write outside the run folder;
never a traceback. Seeded, so a failure is reproducible from its test id."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import h5py
import pandas as pd
import pytest
from conftest import copy_small_cohort
from typer.testing import CliRunner

from fusion.cli import app
from fusion.cohort import id_problem
from fusion.run import RunLayout

runner = CliRunner()
ALPHABET = "abcXYZ019._-/\\ ..~$%;,'\"\t\n\x00é中\u202e"


def _snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and (skip is None or not p.is_relative_to(skip))}


def _clean(result, allowed: tuple[int, ...] = (0, 1, 2)) -> None:
    """A result or one clear error: a known exit code, no traceback, and when it failed one `error:` line."""
    assert result.exit_code in allowed, f"exit {result.exit_code}: {result.output[-3000:]}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output[-3000:]
    if result.exit_code == 2:
        assert sum(line.startswith("error:") for line in result.output.splitlines()) == 1, result.output[-3000:]


def _random_id(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return rng.choice(["../../../tmp/x", "..", ".", "/etc/passwd", "a/../../b", "C:\\x", "-rf", "P\x00", "x" * 200])
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 12)))


@pytest.fixture(scope="module")
def base(tiny_cohort, tiny_run, tmp_path_factory):
    """24 patients, tiled and encoded, with a small abmil trained on 2 folds (copied by each case)."""
    from fusion.run import open_run
    from fusion.stages import train_stage
    from fusion.train.loop import TrainConfig

    cohort, run = copy_small_cohort(tiny_cohort, tiny_run, tmp_path_factory.mktemp("fuzz-base"), patients=24)
    layout, c = open_run(run)
    train_stage(layout, c, TrainConfig(folds=2, epochs=2, patience=2, hidden=16))
    return cohort, run


def _copy(base, tmp_path) -> tuple[Path, Path]:
    import json

    cohort, run = tmp_path / "cohort", tmp_path / "run"
    shutil.copytree(base[0], cohort)
    shutil.copytree(base[1], run)
    (run / "run.json").write_text(json.dumps({"cohort": str(cohort.resolve())}))
    return cohort, run


@pytest.mark.parametrize("seed", range(4))
def test_random_ids(base, tmp_path, seed):
    rng = random.Random(seed)
    cohort, run = _copy(base, tmp_path)
    patients = pd.read_csv(cohort / "patients.csv", dtype={"patient_id": str})
    slides = pd.read_csv(cohort / "slides.csv", dtype={"patient_id": str, "slide_id": str})
    mapping = {pid: _random_id(rng) if rng.random() < 0.5 else pid for pid in patients.patient_id}
    patients["patient_id"] = patients.patient_id.map(mapping)
    slides["patient_id"] = slides.patient_id.map(mapping)
    slides["slide_id"] = [_random_id(rng) if rng.random() < 0.5 else s for s in slides.slide_id]
    patients.to_csv(cohort / "patients.csv", index=False)
    slides.to_csv(cohort / "slides.csv", index=False)
    (cohort / "genomics.csv").unlink()
    spec = (cohort / "cohort.yaml").read_text().replace("genomics: genomics.csv", "genomics: null")
    (cohort / "cohort.yaml").write_text(spec)
    before = _snapshot(tmp_path, skip=run)

    result = runner.invoke(app, ["cohort", "validate", str(cohort)])
    _clean(result)
    ids = [*patients.patient_id.astype(str), *slides.slide_id.astype(str)]
    stripped = [i.strip() for i in ids]
    if result.exit_code == 0:  # every id is a safe file name under the run
        assert all(id_problem(i) is None for i in stripped)
        layout = RunLayout(run)
        assert all(layout.tiles_h5(i).resolve().is_relative_to(run.resolve()) for i in stripped)
    tile = runner.invoke(app, ["tile", str(cohort), "--out", str(run), "--local"])
    _clean(tile)
    assert _snapshot(tmp_path, skip=run) == before  # nothing written outside the run folder


MUTATIONS = ("random", "flip", "truncate", "separator", "quote")


def _mutate(data: bytes, how: str, rng: random.Random) -> bytes:
    if how == "random":
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 400)))
    if how == "flip":
        out = bytearray(data)
        for _ in range(max(1, len(out) // 50)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)
    if how == "truncate":
        return data[: rng.randrange(len(data))]
    if how == "separator":
        return data.replace(b",", b";")
    return data.replace(b",", b',"', 3)


@pytest.mark.parametrize("table", ["cohort.yaml", "patients.csv", "slides.csv", "genomics.csv", "patients.parquet"])
def test_random_bytes_in_each_table(base, tmp_path, table):
    cohort, run = _copy(base, tmp_path)
    if table.endswith(".parquet"):
        pd.read_csv(cohort / "patients.csv", dtype={"patient_id": str}).to_parquet(cohort / table)
        (cohort / "cohort.yaml").write_text((cohort / "cohort.yaml").read_text().replace("patients.csv", table))
    original = (cohort / table).read_bytes()
    rng = random.Random(table)
    for how in MUTATIONS:
        (cohort / table).write_bytes(_mutate(original, how, rng))
        before = _snapshot(tmp_path, skip=run)
        _clean(runner.invoke(app, ["cohort", "validate", str(cohort)]))
        _clean(runner.invoke(app, ["evaluate", str(run)]))
        assert _snapshot(tmp_path, skip=run) == before, how


# (file to truncate, command run after it, whether the command must then succeed)
STAGES = [
    ("tiles/{sid}.h5", ["tile", "{cohort}", "--out", "{run}", "--local"], True),
    ("features/morph/{sid}.h5", ["extract", "{run}"], True),
    ("features/morph/{sid}.h5", ["train", "{run}", "--folds", "2", "--epochs", "1"], False),
    ("models/abmil/predictions.parquet", ["evaluate", "{run}"], False),
    ("models/abmil/predictions.parquet", ["compare", "{run}"], False),
    ("models/abmil/cv_metrics.json", ["analyze", "{run}", "--bootstrap", "10"], False),
    ("models/abmil/fold-0/config.json", ["report", "{run}", "--model", "abmil", "--patient", "{pid}", "--no-pdf"],
     False),
    ("models/abmil/fold-1/model.safetensors", ["predict", "{run}", "--model-dir", "{run}/models/abmil"], False),
    ("models/abmil/fold-0/metrics.json", ["report", "{run}", "--model", "abmil", "--all", "--no-pdf"], False),
    ("ledger.jsonl", ["report", "{run}", "--model", "abmil", "--patient", "{pid}", "--no-pdf"], True),
    ("run.json", ["compare", "{run}"], False),
]


@pytest.mark.parametrize("case", range(len(STAGES)), ids=[f"{s[0].split('/')[-1]}-{s[1][0]}" for s in STAGES])
def test_truncated_files_at_every_stage(base, tmp_path, case):
    target, command, must_succeed = STAGES[case]
    cohort, run = _copy(base, tmp_path)
    slides = pd.read_csv(cohort / "slides.csv", dtype={"slide_id": str, "patient_id": str})
    names = {"sid": slides.slide_id[0], "pid": slides.patient_id[0], "cohort": str(cohort), "run": str(run)}
    path = run / target.format(**names)
    if target == "ledger.jsonl":
        path.write_text('{"step": "tile", "item": "S", "status": "done"}\n{"step": "ti')
    else:
        data = path.read_bytes()
        path.write_bytes(data[: random.Random(case).randrange(1, len(data))])
    before = _snapshot(tmp_path, skip=run)

    result = runner.invoke(app, [part.format(**names) for part in command])
    _clean(result)
    if must_succeed:
        assert result.exit_code == 0, result.output[-3000:]
    assert _snapshot(tmp_path, skip=run) == before  # nothing written outside the run folder
    assert not list(run.rglob("*.partial"))  # nothing half-written left behind
    if must_succeed and target.endswith(".h5"):
        with h5py.File(path, "r") as f:  # the damaged file was made again
            assert f["coords"].shape[0] > 0
