"""Encode segments over a Dask cluster: the same unit of work as `--shard`, mapped with futures.

`--dask local` starts a LocalCluster (one single-threaded worker process per slot); `--dask ADDRESS`
connects to a running scheduler, e.g. one started by dask-jobqueue's SLURMCluster (see README). Each
worker process loads the encoder once and keeps it. Tasks are idempotent (a segment commits with one
rename, a second attempt finds it committed), so Dask may retry or duplicate them safely.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

_WORKER_STATE: dict[str, Any] = {}


def _state(cfg) -> tuple:
    from featurestore.encode import prepare
    from pipeline.stage import fingerprint

    key = fingerprint(cfg)
    if key not in _WORKER_STATE:
        store, encoder, src, _ = prepare(cfg)
        _WORKER_STATE.clear()
        _WORKER_STATE[key] = (store, encoder, src)
    return _WORKER_STATE[key]


def encode_task(plan, cfg) -> dict[str, Any]:
    from featurestore.encode import encode_segment

    store, encoder, src = _state(cfg)
    if plan.seg_id in store.committed_segments(src.name):
        return {"segment": plan.seg_id, "committed": False, "frames": 0, "failures": []}
    return encode_segment(store, encoder, src, plan, cfg)


def run_on_dask(cfg, plans: list, on_frames: Callable[[int], None] | None = None) -> Iterator[dict[str, Any]]:
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if cfg.dask == "local":
        cluster = LocalCluster(n_workers=cfg.dask_workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    else:
        client = Client(cfg.dask)
    log.info("dask: %d segment(s) on %s", len(plans), client.dashboard_link or cfg.dask)
    try:
        futures = client.map(encode_task, plans, cfg=cfg, pure=False, retries=1)
        for fut in as_completed(futures):
            out = fut.result()
            if on_frames:
                on_frames(out["frames"])
            yield out
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
