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
