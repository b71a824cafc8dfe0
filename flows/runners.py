"""Where per-slide tasks run: a thread pool here by default, or a Dask cluster (prefect-dask).

A Dask run either joins a running scheduler (`--dask-address tcp://host:8786`: a cluster started
by dask-kubernetes, dask-jobqueue or `dask scheduler`) or starts a local cluster of N worker
processes for the duration of the run (`--dask-workers N`). One cluster serves every stage of a
pipeline, so the workers keep their imports between tiling and extraction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner


def slide_task_runner(workers: int = 2, dask_address: str | None = None) -> TaskRunner:
    """The runner for per-slide tasks: Dask at `dask_address` when given, else `workers` threads."""
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    return ThreadPoolTaskRunner(max_workers=workers)


@contextlib.contextmanager
def dask_cluster(n_workers: int | None, address: str | None = None) -> Iterator[str | None]:
    """Yield the scheduler address to use: `address` as is, a local cluster of `n_workers` processes
    (one thread each: tiling and extraction hold the GIL in Python code), or None for threads."""
    if address or not n_workers:
        yield address
        return
    from distributed import LocalCluster

    # The dashboard needs bokeh and a free port; a pipeline on a shared machine needs neither.
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address
