"""Feature extraction as a Prefect flow: one task per slide whose features are missing or stale.

On a CUDA device every extraction task holds a slot of the global concurrency limit `fusion-gpu`
(created with `gpu_slots` slots if it does not exist), so a thread pool or a Dask cluster with more
workers than GPUs never puts more models on a device than it holds.
"""

import contextlib
import functools

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import task_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from flows.progress import bar
from flows.tiling import RETRIES
from fusion.features import ExtractConfig
from fusion.features.extract import pick_device
from fusion.run import open_run
from fusion.stages import build_encoders, extract_one, extraction_is_current, slide_rows, tile_count

GPU_LIMIT = "fusion-gpu"


@task(name="extract-slide", task_run_name="extract-{slide_id}", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=exponential_backoff(backoff_factor=2))
def extract_slide_task(run: str, slide_id: str, path: str, encoders: list[str],
                       config: ExtractConfig = ExtractConfig(), tile_set: str = "", gpu_slots: int = 1) -> dict:
    layout, _ = open_run(run)
    last_try = task_run.run_count > RETRIES
    with gpu_slot(config.device, gpu_slots):
        result = extract_one(layout, slide_id, path, build_encoders(encoders, layout), config, tile_set,
                             raise_transient=not last_try)
    if result["status"] == "failed":
        get_run_logger().warning("slide %s failed: %s", slide_id, result["error"])
    return result


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
                   slides: list[str] | None = None, gpu_slots: int = 1) -> list[dict]:
    """Features of every tiled slide (or of `slides`) for each encoder; one status dict per slide."""
    layout, cohort = open_run(run)
    built = build_encoders(encoders, layout)  # names and versions, to plan without starting a task
    wanted = None if slides is None else set(slides)
    results: dict[str, dict] = {}
    todo = []
    rows = [(sid, path) for sid, path in slide_rows(cohort) if wanted is None or sid in wanted]
    for sid, path in rows:
        n_tiles = extraction_is_current(layout, sid, built, config, tile_set)
        if n_tiles is None:
            todo.append((sid, path))
        else:
            results[sid] = {"slide_id": sid, "status": "skipped", "n_tiles": n_tiles}
    layout.ledger.record("stage", "extract", "planned", todo=[sid for sid, _ in todo], up_to_date=len(results))
    futures = [extract_slide_task.submit(str(layout.root), sid, path, encoders, config, tile_set, gpu_slots)
               for sid, path in todo]
    slides_bar = bar(f"extracting {len(todo)} slide(s)", total=len(todo))
    tiles_bar = bar("tiles encoded", total=sum(tile_count(layout, sid, tile_set) for sid, _ in todo))
    for future in as_completed(futures):
        result = future.result()
        results[result["slide_id"]] = result
        slides_bar.advance()
        tiles_bar.advance(result.get("n_tiles") or 0)
    return [results[sid] for sid, _ in rows]
