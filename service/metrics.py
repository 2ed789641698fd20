"""Prometheus metrics (prometheus-client), every one defined here so names stay consistent.

Multiprocess mode: when ``PROMETHEUS_MULTIPROC_DIR`` is set (``boxoffice serve`` sets it before uvicorn
forks its workers), every process writes its samples to files there and ``/metrics`` merges them, so all
uvicorn workers and arq workers count. See https://prometheus.github.io/client_python/multiprocess/.
"""

from __future__ import annotations

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


def render() -> tuple[bytes, str]:
    """The exposition text for ``/metrics``: merged across processes in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
