"""Per-slide tasks on Dask (prefect-dask): a LocalCluster of 2 worker processes tiles and encodes a
small cohort; the results match what the library writes, and every slide is in the ledger once."""

import shutil

import pandas as pd
import pytest
from prefect.testing.utilities import prefect_test_harness

from fusion.storage import Ledger

SLIDES = 6


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def small_cohort(tiny_cohort, tmp_path):
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort, ignore=shutil.ignore_patterns("truth"))
    slides = pd.read_csv(cohort / "slides.csv").head(SLIDES)
    slides.to_csv(cohort / "slides.csv", index=False)
    return cohort


def test_slide_tasks_on_a_local_dask_cluster(small_cohort, tiny_run, tmp_path, prefect_server):
    from flows.extraction import extract_cohort
    from flows.runners import dask_cluster, slide_task_runner
    from flows.tiling import tile_cohort

    run = tmp_path / "run"
    with dask_cluster(n_workers=2) as address:
        assert address.startswith("tcp://127.0.0.1:")
        runner = slide_task_runner(dask_address=address)
        tiled = tile_cohort.with_options(task_runner=runner)(str(small_cohort), str(run))
        extracted = extract_cohort.with_options(task_runner=slide_task_runner(dask_address=address))(
            str(run), ["morph"])
    assert [r["status"] for r in tiled] == ["done"] * SLIDES
    assert [r["status"] for r in extracted] == ["done"] * SLIDES
    for r in tiled:  # identical to the thread-run tiles of the shared run
        assert r["n_tiles"] == _rows(tiny_run / "tiles" / f"{r['slide_id']}.h5")
    entries = Ledger(run / "ledger.jsonl").entries()
    for step in ("tile", "extract"):
        assert sorted(e["item"] for e in entries if e["step"] == step) == sorted(r["slide_id"] for r in tiled)


def _rows(path) -> int:
    import h5py

    with h5py.File(path) as f:
        return int(f["coords"].shape[0])


def test_gpu_extraction_holds_a_slot_of_the_gpu_limit(prefect_server, monkeypatch):
    """On CUDA (simulated), an extraction task runs inside a slot of `fusion-gpu`, created if missing."""
    import torch
    from prefect import get_client

    import flows.extraction as extraction

    monkeypatch.setattr(extraction, "pick_device", lambda device: torch.device("cuda"))
    extraction._ensure_gpu_limit.cache_clear()
    with extraction.gpu_slot("auto", slots=2), get_client(sync_client=True) as client:
        held = client.read_global_concurrency_limit_by_name(extraction.GPU_LIMIT)
    with get_client(sync_client=True) as client:
        released = client.read_global_concurrency_limit_by_name(extraction.GPU_LIMIT)
    assert held.limit == 2 and held.active_slots == 1 and released.active_slots == 0
    monkeypatch.setattr(extraction, "pick_device", lambda device: torch.device("cpu"))
    assert extraction.gpu_slot("auto", 2).__class__.__name__ == "nullcontext"


def test_pipeline_on_a_dask_cluster_survives_a_killed_worker(tiny_cohort, tiny_run, tmp_path):
    """`fusion pipeline --dask-address` against a real cluster (`dask scheduler` and `dask worker
    --nworkers 3`: 3 worker processes); one worker process is killed (SIGKILL) while it runs a slide
    task. The run finishes, and every slide is tiled and encoded exactly once (the ledger has one
    `done` per slide and step; a task re-run after the kill finds its finished slides and skips them)."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import yaml
    from conftest import copy_small_cohort
    from distributed import Client

    cohort, _ = copy_small_cohort(tiny_cohort, tiny_run, tmp_path, patients=24, with_run=False)
    config = {"cohort": "cohort", "run": "run", "models": [{"model": "abmil", "folds": 2, "epochs": 2, "patience": 2}],
              "analysis": {"enabled": False}, "report": {"enabled": False}}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    n_slides = len(pd.read_csv(cohort / "slides.csv"))
    ledger = Ledger(tmp_path / "run" / "ledger.jsonl")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    dask = str(Path(sys.executable).parent / "dask")
    log = (tmp_path / "dask.log").open("w")
    cluster = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                                 "--no-dashboard"], stdout=log, stderr=subprocess.STDOUT)]
    cluster.append(subprocess.Popen([dask, "worker", address, "--nworkers", "3", "--nthreads", "1", "--no-dashboard"],
                                    cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT))
    proc = None
    try:
        with Client(address, timeout=300) as client:
            client.wait_for_workers(3, timeout=300)
            proc = subprocess.Popen([sys.executable, "-m", "fusion.cli", "pipeline", str(tmp_path / "pipeline.yaml"),
                                     "--dask-address", address], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            killed = None
            deadline = time.time() + 600
            while killed is None and time.time() < deadline and proc.poll() is None:
                done = [e for e in ledger.entries() if e["step"] in ("tile", "extract") and e["status"] == "done"]
                busy = [addr for addr, keys in client.processing().items() if keys]
                if len(done) >= 2 and busy:
                    pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                    os.kill(pid, signal.SIGKILL)
                    killed = {"worker": busy[0], "after": [f"{e['step']}:{e['item']}" for e in done]}
                time.sleep(0.2)
            output, _ = proc.communicate(timeout=900)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        for p in reversed(cluster):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()
    assert killed is not None, "the kill should land while slide tasks run\n" + output[-3000:]
    assert proc.returncode == 0, output[-4000:]
    entries = ledger.entries()
    for step in ("tile", "extract"):
        done = [e["item"] for e in entries if e["step"] == step and e["status"] == "done"]
        assert sorted(done) == sorted(set(done)), f"a slide was {step}d twice"
        assert len(done) == n_slides, f"{n_slides - len(done)} slide(s) lost at {step}"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["slides"] == n_slides and not summary["failed"]
    assert len(list((tmp_path / "run" / "features" / "morph").glob("*.h5"))) == n_slides
