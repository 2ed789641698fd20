"""The expiry sweeper: reaps expired holds of every event, so an idle event's stock comes back on time.

Reads, confirms and releases reap their own event first, and a hold reaps before it would refuse
(``lua/includes/common.lua``, ``reap``); the sweeper brings stock back for everything else: events that
get no traffic, and events where every hold fits. It runs ``Inventory.reap`` for every event in ``keys.EVENTS_KEY`` every
``sweeper_interval_seconds`` (0.25 s by default, so an expired hold is back on sale within about that).
The calls of one pass are made concurrently, so the script runner sends them in one pipeline.
Reaping is idempotent: several workers may sweep at once.
"""

from __future__ import annotations

import asyncio
import logging

from service import metrics
from service.inventory import Inventory
from service.settings import Settings

log = logging.getLogger("boxoffice.sweeper")


async def sweep_once(inventory: Inventory) -> int:
    """Reap every event's expired holds once. Returns how many holds expired. Raises RedisError."""
    event_ids = await inventory.event_ids()
    reaped = await asyncio.gather(*(inventory.reap(e) for e in event_ids))
    for event_id, n in zip(event_ids, reaped, strict=True):
        if n:
            metrics.child(metrics.EXPIRIES, event_id).inc(n)
    return sum(reaped)


async def run_sweeper(inventory: Inventory, settings: Settings, stop_event: asyncio.Event) -> None:
    """``sweep_once`` every ``sweeper_interval_seconds`` until ``stop_event`` is set. A failed pass (Redis
    down) is logged and the next one runs on schedule."""
    while not stop_event.is_set():
        try:
            n = await sweep_once(inventory)
            if n:
                log.debug("expired %d holds", n)
        except Exception as exc:
            log.warning("sweep failed: %r", exc)
        try:
            await asyncio.wait_for(stop_event.wait(), settings.sweeper_interval_seconds)
        except TimeoutError:
            pass
