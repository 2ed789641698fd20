"""Prometheus metrics (prometheus-client), every one defined here so names stay consistent.

Multiprocess mode: when ``PROMETHEUS_MULTIPROC_DIR`` is set (``boxoffice serve`` sets it before uvicorn
forks its workers), every process writes its samples to files there and ``/metrics`` merges them, so all
uvicorn workers and arq workers count. See https://prometheus.github.io/client_python/multiprocess/.
"""

from __future__ import annotations

import asyncio
import functools
import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUEST_SECONDS = Histogram(
    "boxoffice_request_seconds",
    "HTTP request latency by route template.",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
HOLDS = Counter("boxoffice_holds_total", "Holds created.", ["event_id"])
CONFIRMS = Counter("boxoffice_confirms_total", "Holds confirmed into orders.", ["event_id"])
RELEASES = Counter("boxoffice_releases_total", "Holds released by their customer.", ["event_id"])
EXPIRIES = Counter("boxoffice_expiries_total", "Holds reaped by the sweeper after their TTL.", ["event_id"])
REJECTIONS = Counter("boxoffice_rejections_total", "Requests refused, by error code.", ["code"])
ACTIVE_HOLDS = Gauge(
    "boxoffice_active_holds", "Active holds per event.", ["event_id"], multiprocess_mode="mostrecent"
)
OUTBOX_LENGTH = Gauge(
    "boxoffice_outbox_length",
    "Entries in the event's outbox stream.",
    ["event_id"],
    multiprocess_mode="mostrecent",
)
OUTBOX_PENDING = Gauge(
    "boxoffice_outbox_pending",
    "Outbox entries delivered but not acked.",
    ["event_id"],
    multiprocess_mode="mostrecent",
)
PERSISTED = Counter("boxoffice_orders_persisted_total", "Orders written through to PostgreSQL.", ["event_id"])
WRITE_LAG_SECONDS = Histogram(
    "boxoffice_write_through_lag_seconds",
    "Time from confirm (Redis TIME) to the PostgreSQL commit.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
DEAD_LETTERS = Counter(
    "boxoffice_dead_letters_total", "Outbox entries PostgreSQL refused (backstop).", ["event_id"]
)
DRIFT = Gauge(
    "boxoffice_reconcile_drift",
    "Drift found by the last reconciliation, by kind.",
    ["event_id", "kind"],
    multiprocess_mode="mostrecent",
)


@functools.lru_cache(maxsize=4096)
def child(metric: Counter | Gauge | Histogram, *labelvalues: str) -> Any:
    """``metric.labels(*labelvalues)``, cached: prometheus-client validates and locks on every ``labels``
    call, which costs more than the increment itself on the request path. Label values must be bounded
    (routes, error codes, event ids), as Prometheus wants anyway."""
    return metric.labels(*labelvalues)


class Tally:
    """Counts kept in a dict and added to their prometheus counters at most every ``interval_seconds``.

    In multiprocess mode every ``inc`` writes to an mmap'd file behind a lock and a pid check, about 9k
    instructions a call (callgrind), a few percent of a hold's whole API cost; a dict increment is a
    tenth of that. The price: another process's ``/metrics`` sees a count up to ``interval_seconds``
    late (Prometheus scrapes every 15 s or more). ``/metrics`` in this process and shutdown flush first.
    Call ``inc`` from inside the event loop (it schedules the flush there).
    """

    def __init__(self, interval_seconds: float = 1.0):
        self.interval_seconds = interval_seconds
        self._counts: dict[tuple[Counter, str], int] = {}
        self._flush_loop: asyncio.AbstractEventLoop | None = None  # where a flush is scheduled, if anywhere

    def inc(self, metric: Counter, label: str) -> None:
        """Count one for ``metric`` with its one label value (bounded, like any label)."""
        key = (metric, label)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        # a flush scheduled on a loop that has closed since (it ended without a shutdown flush) never runs
        if self._flush_loop is None or self._flush_loop.is_closed():
            loop = self._flush_loop = asyncio.get_running_loop()
            loop.call_later(self.interval_seconds, self.flush)

    def flush(self) -> None:
        """Add what was counted since the last flush to the counters."""
        self._flush_loop = None
        counts, self._counts = self._counts, {}
        for (metric, label), n in counts.items():
            child(metric, label).inc(n)


TALLY = Tally()
"""The API's per-event hold / confirm / release counts."""


def render() -> tuple[bytes, str]:
    """The exposition text for ``/metrics``: merged across processes in multiprocess mode."""
    TALLY.flush()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
