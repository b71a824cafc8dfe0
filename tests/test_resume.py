"""Kill extraction with SIGKILL mid-run; the rerun finishes only what is left, and the result
equals an uninterrupted run."""

import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np

from fusion.features import read_features


def _extract(run):
    return subprocess.Popen([sys.executable, "-m", "fusion.cli", "extract", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_killed_extraction_resumes(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("features", "models"))
    (run / "ledger.jsonl").unlink(missing_ok=True)
    features = run / "features" / "morph"
    n_slides = len(list((run / "tiles").glob("*.h5")))

    proc = _extract(run)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(features.glob("*.h5"))) < 10:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in features.glob("*.h5")}
    assert 10 <= len(done_before) < n_slides, "the kill should land mid-run"
    for path in features.glob("*.h5"):  # every file that looks complete is complete
        with h5py.File(path) as f:
            assert f["features"].shape[0] == f["coords"].shape[0]

    rerun = _extract(run)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read().decode()[-2000:]
    after = {p.name: p.stat().st_mtime_ns for p in features.glob("*.h5")}
    assert len(after) == n_slides
    assert all(after[name] == mtime for name, mtime in done_before.items()), "finished slides were redone"
    for path in features.glob("*.h5"):  # equal to the uninterrupted run of the fixture
        a, ca, _ = read_features(path)
        b, cb, _ = read_features(tiny_run / "features" / "morph" / path.name)
        np.testing.assert_array_equal(ca, cb)
        np.testing.assert_allclose(a, b, atol=1e-3)
