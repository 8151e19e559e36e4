"""Executors: map a work function over units, on a Dask cluster (`map_on_dask`, behind `wmctl encode --dask`).

`local` starts a LocalCluster (one single-threaded worker process per slot); an address connects to a running
scheduler, e.g. one started by dask-jobqueue's SLURMCluster (docs/cluster.md). The function must be idempotent
(the encode unit is: a segment commits with one rename, a second attempt finds it committed), so Dask may retry
or duplicate tasks safely. The executor knows nothing of what the units are: any stage may use it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)


def map_on_dask(fn: Callable[..., Any], units: list, *, address: str, workers: int = 2, **kwargs: Any
                ) -> Iterator[Any]:
    """Yield `fn(unit, **kwargs)` for every unit as tasks finish (in completion order)."""
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if address == "local":
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    else:
        client = Client(address)
    log.info("dask: %d unit(s) on %s", len(units), client.dashboard_link or address)
    try:
        futures = client.map(fn, units, pure=False, retries=1, **kwargs)
        for fut in as_completed(futures):
            yield fut.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
