"""Where the tasks of a build stage run: this process, a `LocalCluster` of `run.workers` processes, or an existing
dask scheduler (`run.scheduler`); each task writes its own objects and its receipt, and a stage resumes from the
receipts already written."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import xarray as xr

from merra2_text_data.config.build import BuildConfig
from merra2_text_data.fs import url_to_fs
from merra2_text_data.store.publish import read_receipts

from .cube_source import CubeSource

__all__ = ["connect", "run_tasks"]

logger = logging.getLogger(__name__)


def _on_this_worker(func: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run a task with dask's synchronous scheduler: the lazy reads inside it stay in this worker process instead
    of being sent back to the cluster as sub-tasks (measured: 44 sub-tasks for a 4-day build, and every window
    read waited on the scheduler)."""
    import dask

    with dask.config.set(scheduler="synchronous"):
        return func(*args)


@contextlib.contextmanager
def connect(config: BuildConfig) -> Iterator[Any]:
    """The dask client of a build's stages: a `LocalCluster` of `run.workers` worker processes, the scheduler at
    `run.scheduler`, or None (tasks run in this process). Closed (and the LocalCluster stopped) on exit."""
    if not (config.run.workers or config.run.scheduler):
        yield None
        return
    from distributed import Client, LocalCluster

    cluster = (
        LocalCluster(n_workers=config.run.workers, threads_per_worker=1, dashboard_address=None)
        if config.run.workers
        else None
    )
    try:
        with Client(cluster if cluster is not None else config.run.scheduler) as client:
            yield client
    finally:
        if cluster is not None:
            cluster.close()


def _stage_folder(stage: str) -> str | None:
    return None if stage == "samples" else stage


def run_tasks(
    stage: str,
    func: Callable[..., dict[str, Any]],
    tasks: Sequence[Any],
    cube: xr.Dataset | CubeSource,
    config: BuildConfig,
    dataset_url: str,
    version: str,
    extra: Callable[[Any], tuple[Any, ...]] = lambda task: (),
    progress: Callable[[str, int, int], None] | None = None,
    *,
    client: Any = None,
    where: Callable[[Any], str | None] | None = None,
) -> list[dict[str, Any]]:
    """Run `func(task, cube, config, dataset_url, version, *extra(task))` for every task without a receipt.

    Tasks run in this process or on the dask cluster of `client` (or, without one, of `connect(config)`). A
    `CubeSource` is narrowed to each task's days before it travels; a cube Dataset (a build in this process) is
    passed as it is. Each task writes its own objects to the store and its receipt.

    Args:
        stage: `samples` (pass 2, receipts in `staging/<v>/`), `stats` (pass 1) or `cube` (the day stores), each
            of the last two in its own staging sub-folder.
        func: `run_task`, `run_stats_task` or `cube.run_day_task`.
        tasks: all tasks of the stage, in order (each with `name` and `days`).
        cube: the regional cube or its `CubeSource`.
        config: the build config.
        dataset_url: `<out>/<name>`.
        version: the version id.
        extra: further arguments of `func` for one task (e.g. its events).
        progress: `(stage, done, total)` callback.
        client: a connected dask client (`connect`), shared by the stages of a build.
        where: the worker a task should preferably run on (a per-worker cache holds its days), or None.

    Returns:
        The receipts of all tasks, in task order.
    """
    fs, _ = url_to_fs(config.publish.out)
    done = read_receipts(fs, dataset_url, version, stage=_stage_folder(stage))
    if done:
        logger.info("resuming %s: %d of %d task(s) already finished", stage, len(done), len(tasks))
    todo = [t for t in tasks if t.name not in done]
    results: dict[str, dict[str, Any]] = dict(done)
    if progress:
        progress(stage, len(results), len(tasks))

    def cube_for(task: Any) -> xr.Dataset | CubeSource:
        return cube.narrow(task.days) if isinstance(cube, CubeSource) else cube

    if todo and client is None and (config.run.workers or config.run.scheduler):
        with connect(config) as own:
            return run_tasks(stage, func, tasks, cube, config, dataset_url, version, extra, progress, client=own,
                             where=where)  # fmt: skip
    if todo and client is not None:
        from distributed import as_completed

        if not isinstance(cube, CubeSource):  # a cube opened in this process: sent once, not with every task
            cube = client.scatter(cube, broadcast=True)
        futures = []
        for t in todo:
            hint = where(t) if where is not None else None
            placed = {"workers": [hint], "allow_other_workers": True} if hint else {}
            futures.append(client.submit(_on_this_worker, func, t, cube_for(t), config, dataset_url, version,
                                         *extra(t), key=f"{stage}-{version}-{t.name}", pure=False, **placed))  # fmt: skip
        for fut in as_completed(futures):
            receipt = fut.result()
            results[receipt["task"]] = receipt
            if progress:
                progress(stage, len(results), len(tasks))
    else:
        for t in todo:
            results[t.name] = func(t, cube_for(t), config, dataset_url, version, *extra(t))
            if progress:
                progress(stage, len(results), len(tasks))
    return [results[t.name] for t in tasks]
