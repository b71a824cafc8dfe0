"""`fusion tile` as a Prefect flow: one task per slide, run concurrently in threads.

A rerun redoes nothing: each task's library call compares the hash of the slide's content and
every parameter with the one stored in the existing `.h5`, and skips when they match. A bad slide
fails its own task only; the flow finishes and returns every slide's status.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from fusion.run import init_run, open_run
from fusion.stages import slide_rows, tile_one
from fusion.wsi import TilingConfig

RETRIES = 3  # transient I/O errors (network storage) are retried after 2, 4 and 8 s


@task(name="tile-slide", task_run_name="tile-{slide_id}", cache_policy=NO_CACHE, retries=RETRIES,
      retry_delay_seconds=exponential_backoff(backoff_factor=2))
def tile_slide_task(run: str, slide_id: str, path: str, tiling: TilingConfig, mpp: float | None,
                    tile_set: str = "") -> dict:
    layout, _ = open_run(run)
    last_try = task_run.run_count > RETRIES  # then a transient error is recorded as a failure
    result = tile_one(layout, slide_id, path, tiling, mpp, tile_set, raise_transient=not last_try)
    if result["status"] == "failed":
        get_run_logger().warning("slide %s failed: %s", slide_id, result["error"])
    return result


@flow(name="fusion-tile", task_runner=ThreadPoolTaskRunner(max_workers=2))
def tile_cohort(cohort: str, run: str, tiling: TilingConfig = TilingConfig(), mpp: float | None = None,
                tile_set: str = "") -> list[dict]:
    """Tile every slide of `cohort` into `run`/tiles[/<tile_set>]; returns one status dict per slide."""
    layout = init_run(run, cohort)
    _, cohort_obj = open_run(layout.root)
    futures = [tile_slide_task.submit(str(layout.root), sid, path, tiling, mpp, tile_set)
               for sid, path in slide_rows(cohort_obj)]
    results = [f.result() for f in futures]
    done = sum(r["status"] == "done" for r in results)
    skipped = sum(r["status"] == "skipped" for r in results)
    get_run_logger().info("tiled %d slides (%d up to date, %d failed), %d tiles", done, skipped,
                          len(results) - done - skipped, sum(r.get("n_tiles") or 0 for r in results))
    return results
