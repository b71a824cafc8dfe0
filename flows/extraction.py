"""Feature extraction as a Prefect flow: tasks of a few slides each, for the slides whose features
are missing or stale. As for tiling, the flow validates the cohort once and a task touches only
its own slides (it builds its encoders once for all of them).

On a CUDA device every extraction task holds a slot of the global concurrency limit `fusion-gpu`
(created with `gpu_slots` slots if it does not exist), so a thread pool or a Dask cluster with more
workers than GPUs never puts more models on a device than it holds.
"""

import contextlib
import functools
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.progress import bar
from flows.tiling import batch_label
from fusion.features import ExtractConfig
from fusion.features.extract import pick_device
from fusion.run import RunLayout, clean_partials, open_run
from fusion.stages import (
    RETRY_DELAYS,
    build_encoders,
    extract_one,
    extraction_is_current,
    fail_missing_slides,
    slide_batches,
    slide_rows,
    tile_count,
)

GPU_LIMIT = "fusion-gpu"


@task(name="extract-slides", task_run_name="extract-{label}", cache_policy=NO_CACHE)
def extract_slides_task(run: str, slides: list[tuple[str, str]], encoders: list[str],
                        config: ExtractConfig = ExtractConfig(), tile_set: str = "", gpu_slots: int = 1,
                        label: str = "") -> list[dict]:
    """Features of a batch of tiled slides; one status dict per slide (failures recorded, never raised)."""
    layout = RunLayout(Path(run))
    built = build_encoders(encoders, layout)
    results = []
    with gpu_slot(config.device, gpu_slots):
        for sid, path in slides:
            result = extract_one(layout, sid, path, built, config, tile_set, retry_delays=RETRY_DELAYS)
            if result["status"] == "failed":
                get_run_logger().warning("slide %s failed: %s", sid, result["error"])
            results.append(result)
    return results


def gpu_slot(device: str, slots: int):
    """A slot of the `fusion-gpu` concurrency limit when this process extracts on CUDA, else nothing."""
    if pick_device(device).type != "cuda":
        return contextlib.nullcontext()
    from prefect.concurrency.sync import concurrency

    _ensure_gpu_limit(slots)
    return concurrency(GPU_LIMIT, occupy=1)


@functools.cache
def _ensure_gpu_limit(slots: int) -> None:
    """Create the limit once per process; an existing one (set by an operator) is left as it is."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another worker was first
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots))


@flow(name="fusion-extract", task_runner=ThreadPoolTaskRunner(max_workers=2))
def extract_cohort(run: str, encoders: list[str], config: ExtractConfig = ExtractConfig(), tile_set: str = "",
                   slides: list[str] | None = None, gpu_slots: int = 1, slides_per_task: int | None = None
                   ) -> list[dict]:
    """Features of every tiled slide (or of `slides`) for each encoder; one status dict per slide."""
    layout, cohort = open_run(run)
    clean_partials(layout)  # features files half-written by a killed process
    built = build_encoders(encoders, layout)  # names and versions, to plan without starting a task
    wanted = None if slides is None else set(slides)
    rows = [(sid, path) for sid, path in slide_rows(cohort) if wanted is None or sid in wanted]
    results = {r["slide_id"]: r for r in fail_missing_slides(layout, cohort, "extract", tile_set,
                                                             only={sid for sid, _ in rows})}
    todo = []
    for sid, path in rows:
        if sid in results:
            continue
        n_tiles = extraction_is_current(layout, sid, built, config, tile_set)
        if n_tiles is None:
            todo.append((sid, path))
        else:
            results[sid] = {"slide_id": sid, "status": "skipped", "n_tiles": n_tiles}
    layout.ledger.record("stage", "extract", "planned", todo=[sid for sid, _ in todo], up_to_date=len(results))
    futures = [extract_slides_task.submit(str(layout.root), batch, encoders, config, tile_set, gpu_slots,
                                          batch_label(batch))
               for batch in slide_batches(todo, slides_per_task)]
    slides_bar = bar(f"extracting {len(todo)} slide(s)", total=len(todo))
    tiles_bar = bar("tiles encoded", total=sum(tile_count(layout, sid, tile_set) for sid, _ in todo))
    for future in as_completed(futures):
        for result in future.result():
            results[result["slide_id"]] = result
            slides_bar.advance()
            tiles_bar.advance(result.get("n_tiles") or 0)
    return [results[sid] for sid, _ in rows]
