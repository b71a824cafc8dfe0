"""Kill `fusion train` with SIGKILL once a fold has finished; the rerun trains only the folds that
are left, leaves the finished ones untouched, and ends with the same results as an uninterrupted run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from fusion.train.checkpoint import load_checkpoint

ARGS = ["--model", "abmil", "--folds", "3", "--epochs", "25"]


def _train(run):
    return subprocess.Popen([sys.executable, "-m", "fusion.cli", "train", str(run), *ARGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _copy(tiny_run, dest):
    shutil.copytree(tiny_run, dest, ignore=shutil.ignore_patterns("models", "analysis"))
    (dest / "ledger.jsonl").unlink(missing_ok=True)
    return dest


def _snapshot(folder):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir() if p.is_file()}


def test_killed_training_resumes_at_fold_level(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path / "run")
    model_dir = run / "models" / "abmil"

    proc = _train(run)
    deadline = time.time() + 240
    while time.time() < deadline and not (model_dir / "fold-0" / "metrics.json").exists():
        if proc.poll() is not None:
            pytest.fail(f"training ended before the kill: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (model_dir / "fold-0" / "metrics.json").exists(), "no fold finished within the deadline"
    assert not (model_dir / "cv_metrics.json").exists(), "the kill should land mid-run"
    finished = sorted(p.parent for p in model_dir.glob("fold-*/metrics.json"))
    before = {f.name: _snapshot(f) for f in finished}
    for fold in finished:  # what looks finished is complete and loads
        assert {"model.safetensors", "config.json", "predictions.parquet"} <= set(before[fold.name])
        load_checkpoint(fold)

    rerun = _train(run)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read().decode()[-2000:]
    for fold in finished:
        assert _snapshot(fold) == before[fold.name], f"{fold.name} was trained again"

    reference = _copy(tiny_run, tmp_path / "reference")
    uninterrupted = _train(reference)
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stderr.read().decode()[-2000:]
    ref_dir = reference / "models" / "abmil"
    assert json.loads((model_dir / "cv_metrics.json").read_text()) == json.loads(
        (ref_dir / "cv_metrics.json").read_text())
    pd.testing.assert_frame_equal(pd.read_parquet(model_dir / "predictions.parquet"),
                                  pd.read_parquet(ref_dir / "predictions.parquet"))
