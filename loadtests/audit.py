"""The oversell audit: after a sale, check PostgreSQL, Redis and a load run's acks against each other.

``boxoffice audit --event ID [--acks FILE|DIR] [--drain-timeout S] [--hold-expiry-timeout S] [--reap-grace S]``
runs it and exits 1 on any violation (2: no verdict, see ``run_cli``); the Locust scenarios run it at
``test_stop``. It reads, and changes nothing but one thing: expired holds that the service failed to reap in
time, it reaps itself (``Inventory.reap``, the sweeper's own call), so that the stock checks can still run.

Order of work, each wait bounded:

1. Holds: wait for the holds that expire within ``hold_expiry_timeout_seconds`` (default:
   ``drain_timeout_seconds``) to be reaped, each with the reap grace after its expiry (so at most that
   timeout + the grace + 0.5 s); a hold expiring later is reported still active. Reaping expired holds is
   the service's job (``boxoffice worker``'s sweeper, every 0.25 s, and the scripts themselves): a hold
   still active ``reap_grace_seconds`` (default 5) after its expiry fails the ``reaping`` check, and then
   the audit reaps it.
2. Write-through: wait until the event's outbox has no backlog (no entry undelivered to a consumer group
   and none pending; or the stream is empty), for at most ``drain_timeout_seconds``.
3. Snapshot Redis (zone counters, seat owners) and PostgreSQL (orders, order_items, zones.sold,
   dead_letters) and run the checks in ``CHECKS``.

An event that is not in Redis (a Redis that lost it, or a ``REDIS_URL`` that is not the service's) fails the
``counters`` check; the audit then still checks what PostgreSQL and the acks alone can tell (every ack in
PostgreSQL once, no seat in two orders, no zone sold past capacity, zones.sold, dead letters, confirms after
the acks' expiry), skips steps 1 and 2, and reports the checks that need Redis as not run (``NEEDS_REDIS``),
not as passed.

Acks are the run's JSON lines (``loadtests/common.py`` writes them), one object per line:
``{"kind": "confirmed", "event_id", "order_id", "hold_id", "items", "confirmed_at_ms", "expires_at_ms"}``
for every ``201`` of a confirm, and ``{"kind": "abandoned"|"released"|"expired", "event_id", "hold_id"}``
for holds the run left to expire, released, or tried to confirm too late (``409 hold_expired``). A line
without ``kind`` is a confirm. Lines of other events are ignored.

Orders known to Redis but never acked are not violations (a client can lose a 201 to a timeout); an order
in PostgreSQL that neither Redis nor the acks know is. Run the audit within ``hold_retention_seconds`` of
the sale: Redis forgets hold records and order pointers after that.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service import keys
from service.inventory import Inventory
from service.settings import Settings
from service.slots import SlotClients

POLL_SECONDS = 0.1
FINAL_POLL_SECONDS = 0.5
REAP_GRACE_SECONDS = 5.0
"""How long after its expiry a hold may still be active before the ``reaping`` check fails: the worker's sweeper
runs every ``sweeper_interval_seconds`` (0.25 s by default)."""

CHECKS: dict[str, str] = {
    "capacity": "no zone sold past capacity (Redis, PostgreSQL order items, zones.sold)",
    "counters": "Redis available + held + sold == capacity, none negative",
    "seats": "no seat in two orders (PostgreSQL, acks); Redis seat owners match PostgreSQL",
    "redis_pg": "Redis and PostgreSQL agree on sold per zone",
    "acks": "every 201 confirmed is in PostgreSQL exactly once, with its hold and items",
    "unknown_orders": "every PostgreSQL order is known to Redis or acked",
    "drain": "write-through drained (outbox backlog 0) within the timeout",
    "dead_letters": "PostgreSQL refused no outbox entry of this event",
    "holds": "after expiry: held 0, available == capacity - sold, no held seat; abandoned holds expired",
    "reaping": "the service reaped every expired hold within the grace (--reap-grace) of its expiry",
    "late_confirms": "no order confirmed at or after its hold's expires_at (the ack's, or the hold record's in Redis)",
}

NEEDS_REDIS = ("drain", "holds", "reaping", "unknown_orders")
"""Checks not run at all when the event is not in Redis."""
WITHOUT_REDIS: dict[str, str] = {
    "capacity": "no zone sold past capacity (PostgreSQL order items, zones.sold)",
    "seats": "no seat in two orders (PostgreSQL, acks)",
    "redis_pg": "PostgreSQL order items agree with zones.sold per zone",
    "late_confirms": "no order confirmed at or after the expires_at of its ack",
}
"""What each check that runs in part covers when the event is not in Redis."""


@dataclass
class Violation:
    check: str
    detail: str


@dataclass
class ZoneAudit:
    zone_id: str
    kind: str
    capacity: int
    redis_available: int | None
    redis_held: int | None
    redis_sold: int | None
    """None: the event is not in Redis."""
    pg_sold: int
    """Tickets in PostgreSQL order_items of this zone."""
    pg_counter: int
    """PostgreSQL zones.sold (bumped by the write-through in the order's transaction)."""


@dataclass
class AuditReport:
    event_id: str
    zones: list[ZoneAudit] = field(default_factory=list)
    acks: int = 0
    orders: int = 0
    """Orders of the event in PostgreSQL."""
    unacked_orders: int = 0
    """Orders Redis confirmed that the run never saw a 201 for (informational); when the event is not in Redis,
    the PostgreSQL orders not acked, unchecked."""
    outbox_backlog: int = 0
    holds_reaped: int = 0
    """Expired holds found still active past the grace, then reaped by the audit (each one a ``reaping``
    failure; the sweeper may have got to some of them just before the audit did)."""
    active_holds: int = 0
    in_redis: bool = True
    """False when the event is not in Redis: only PostgreSQL and the acks were checked (``NEEDS_REDIS``)."""
    acks_checked: bool = True
    """False when the audit was given no acks (``acks=None``): the ``acks`` check was skipped, not passed."""
    write_lag_ms: dict[str, float] = field(default_factory=dict)
    """p50 / p99 / max of orders.persisted_at - confirmed_at, milliseconds."""
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def add(self, check: str, detail: str) -> None:
        self.violations.append(Violation(check, detail))

    def check_rows(self) -> list[tuple[str, str, str]]:
        """The checks table: (check, result, detail) per check in ``CHECKS``, with result one of "ok",
        "N violation(s)", "skipped" (no acks given) or "not run" (the event is not in Redis)."""
        by_check: dict[str, list[str]] = defaultdict(list)
        for v in self.violations:
            by_check[v.check].append(v.detail)
        rows = []
        for name, what in CHECKS.items():
            found = by_check.get(name, [])
            result = "ok" if not found else f"{len(found)} violation(s)"
            detail = what if not found else "; ".join(found[:3]) + (" ..." if len(found) > 3 else "")
            if not found and name == "acks" and not self.acks_checked:
                result, detail = "skipped", "no acks given (--acks): no 201 was checked"
            elif not found and not self.in_redis and name in NEEDS_REDIS:
                result, detail = "not run", "the event is not in Redis"
            elif not found and not self.in_redis and name in WITHOUT_REDIS:
                detail = f"without Redis, only: {WITHOUT_REDIS[name]}"
            rows.append((name, result, detail))
        return rows

    def render(self, console: Any = None) -> None:
        """Print the zone table, the checks table and the verdict (rich)."""
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        zt = Table(title=f"Audit of event {self.event_id}")
        for col in (
            "zone",
            "kind",
            "capacity",
            "Redis sold",
            "held",
            "available",
            "PG sold (items)",
            "PG zones.sold",
        ):
            zt.add_column(col, justify="left" if col in ("zone", "kind") else "right")
        for z in self.zones:
            zt.add_row(
                z.zone_id,
                z.kind,
                str(z.capacity),
                *("-" if n is None else str(n) for n in (z.redis_sold, z.redis_held, z.redis_available)),
                str(z.pg_sold),
                str(z.pg_counter),
            )
        console.print(zt)
        ct = Table(title="Checks")
        ct.add_column("check")
        ct.add_column("result")
        ct.add_column("what")
        colour = {"ok": "green", "skipped": "yellow", "not run": "yellow"}
        for name, result, detail in self.check_rows():
            ct.add_row(name, f"[{colour.get(result, 'red')}]{result}[/]", detail)
        console.print(ct)
        lag = self.write_lag_ms
        lag_text = (
            f"write-through lag p50 {lag['p50']:.0f} ms, p99 {lag['p99']:.0f} ms, max {lag['max']:.0f} ms"
            if lag
            else "write-through lag: no orders"
        )
        if self.in_redis:
            console.print(
                f"acks {self.acks}, PostgreSQL orders {self.orders}, confirmed but not acked "
                f"{self.unacked_orders}, expired holds left unreaped past the grace {self.holds_reaped}; {lag_text}"
            )
        else:
            console.print(
                f"acks {self.acks}, PostgreSQL orders {self.orders}, of them not acked {self.unacked_orders} (not "
                f"checked against Redis), holds not checked: the event is not in Redis; {lag_text}"
            )
        if self.ok:
            console.print(f"[bold green]PASS[/bold green] {self.event_id}: 0 violations")
        else:
            console.print(f"[bold red]FAIL[/bold red] {self.event_id}: {len(self.violations)} violation(s)")


# Acks ----------------------------------------------------------------------------------------------


class AckError(ValueError):
    """A line of an ack file that is not an ack; the message names the file and line."""


_ACK_KINDS = {"confirmed", "abandoned", "released", "expired"}


def set_aside_stale_acks(acks_dir: Path, event_id: str) -> Path | None:
    """An event of this id was just created, so ack files of that id are of an earlier sale (a deployment
    reset since, the same ``--event-id``): rename ``<acks_dir>/<event_id>/`` to ``<event_id>.stale-<time>``
    so the audit does not check this sale against them. Returns the new path, or None if there was none."""
    old = acks_dir / event_id
    if not old.is_dir() or not any(old.glob("*.jsonl")):
        return None
    new = acks_dir / f"{event_id}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    old.rename(new)
    return new


def load_acks(path: Path, event_id: str | None = None) -> list[dict]:
    """Read acks from a JSON-lines file, or from every ``*.jsonl`` file of a directory and, with
    ``event_id``, of its ``<event_id>/`` subdirectory (where a Locust run writes them, so the ``--acks-dir``
    given to Locust works as it is).

    Keeps only lines of ``event_id`` (when given and the line names an event). A last line that is cut
    short (no newline after it, not JSON: its writer was killed mid-line) is skipped. Raises
    FileNotFoundError; AckError (file and line number) for any other line that is not JSON, or not an
    object of a known ``kind`` with the fields the audit reads (``hold_id``; for ``confirmed``, the
    default, also ``order_id`` and a list of ``items``).
    """
    out = []
    for f in ack_files(path, event_id):
        data = f.read_bytes()
        lines = data.splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                if number == len(lines) and not data.endswith(b"\n"):
                    continue  # cut short by a killed writer
                raise AckError(f"{f}:{number}: not JSON ({exc})") from None
            problem = _ack_problem(rec)
            if problem:
                raise AckError(f"{f}:{number}: {problem}")
            if event_id is None or rec.get("event_id", event_id) == event_id:
                out.append(rec)
    return out


def ack_files(path: Path, event_id: str | None = None) -> list[Path]:
    """The files ``load_acks`` reads: ``path`` itself, or a directory's ``*.jsonl`` and its ``<event_id>/``'s."""
    if not path.is_dir():
        return [path]
    files = sorted(path.glob("*.jsonl"))
    if event_id is not None and (path / event_id).is_dir():
        files += sorted((path / event_id).glob("*.jsonl"))
    return files


def _ack_problem(rec: Any) -> str | None:
    """Why ``rec`` is not an ack the audit can use, or None."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    kind = rec.get("kind", "confirmed")
    if kind not in _ACK_KINDS:
        return f"unknown kind {kind!r}"
    if not isinstance(rec.get("hold_id"), str):
        return "no hold_id"
    if kind != "confirmed":
        return None
    if not isinstance(rec.get("order_id"), str):
        return "no order_id"
    if not isinstance(rec.get("expires_at_ms", 0), int | float):
        return "expires_at_ms is not a number"
    items = rec.get("items")
    if not isinstance(items, list) or not items:
        return "no items"
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("zone_id"), str):
            return "an item without zone_id"
        if not (isinstance(item.get("seats"), list) or isinstance(item.get("quantity"), int)):
            return f"item of zone {item['zone_id']!r} has neither seats nor an integer quantity"
    return None


def _tickets(items: Iterable[dict]) -> Counter:
    """Items as a multiset: (zone, seat) -> 1 for seats, (zone, None) -> quantity for general admission."""
    out: Counter = Counter()
    for item in items:
        if item.get("seats"):
            for seat in item["seats"]:
                out[(item["zone_id"], seat)] += 1
        else:
            out[(item["zone_id"], None)] += int(item["quantity"])
    return out


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def _s(v: bytes | str | None) -> str | None:
    return v.decode() if isinstance(v, bytes) else v


# Waiting -------------------------------------------------------------------------------------------


async def outbox_backlog(redis: aioredis.Redis, event_id: str) -> int:
    """Outbox entries not yet written through: 0 for an empty stream; else, over the stream's consumer
    groups, the largest ``pending + entries not delivered yet``; the stream length if it has no group."""
    key = keys.outbox(event_id)
    length = await redis.xlen(key)
    if length == 0:
        return 0
    groups = await redis.xinfo_groups(key)
    if not groups:
        return length
    backlog = 0
    for g in groups:
        g = {_s(k): v for k, v in g.items()}
        lag = g.get("lag")
        if lag is None:  # Redis < 7 has no lag field; 7 may answer nil: count what follows last-delivered-id
            last = _s(g["last-delivered-id"])
            lag = len(await redis.xrange(key, min=f"({last}", max="+", count=length))
        backlog = max(backlog, int(g["pending"]) + int(lag))
    return backlog


_NOW_MS = "local t = redis.call('TIME') return t[1] * 1000 + math.floor(t[2] / 1000)"


async def _redis_now_ms(redis: aioredis.Redis, event_id: str) -> int:
    """The clock the event's scripts read (``now_ms`` in ``lua/includes/common.lua``): TIME on the Redis that
    holds the event, reached through one of its keys (on a Redis Cluster a plain TIME goes to any node)."""
    return int(await redis.eval(_NOW_MS, 1, keys.meta(event_id)))


@dataclass
class HoldsLeft:
    """What ``_expire_holds`` left: holds still active at the end, seconds waited, the seconds until the next
    of the active ones expires (0 if none, or if it has expired and was still within its grace), and the holds
    found unreaped past the grace (then reaped by the audit), with the longest time past its expiry that one of
    them was seen active (ms, by the event's Redis clock)."""

    active: int
    waited_seconds: float
    next_expiry_seconds: float
    overdue: int = 0
    most_overdue_ms: int = 0


async def _expire_holds(
    redis: aioredis.Redis, inventory: Inventory, event_id: str, timeout_seconds: float, grace_seconds: float
) -> HoldsLeft:
    """Wait for the holds that expire within ``timeout_seconds`` (on the event's Redis clock, from the start)
    to be reaped by the service, each with ``grace_seconds`` after its expiry; those still in the expiry set
    then are counted overdue, and reaped here. Holds that expire later (a longer TTL, or a sale still making
    holds) are left active. The wait ends by ``timeout_seconds + grace_seconds`` plus ``FINAL_POLL_SECONDS``
    (the time to see a hold expiring at the very end of the wait turn overdue) whatever happens meanwhile."""
    started = time.monotonic()
    hard_deadline = started + timeout_seconds + grace_seconds + FINAL_POLL_SECONDS
    grace_ms = int(grace_seconds * 1000)
    expiry = keys.expiry(event_id)
    cutoff_ms = await _redis_now_ms(redis, event_id) + int(timeout_seconds * 1000)
    overdue: set[bytes] = set()
    most_overdue_ms = 0

    async def left() -> HoldsLeft:
        active = await redis.zcard(expiry)
        first = await redis.zrange(expiry, 0, 0, withscores=True)
        until = max((first[0][1] - await _redis_now_ms(redis, event_id)) / 1000, 0.0) if first else 0.0
        return HoldsLeft(active, time.monotonic() - started, until, len(overdue), most_overdue_ms)

    while time.monotonic() <= hard_deadline:
        now_ms = await _redis_now_ms(redis, event_id)
        late = await redis.zrangebyscore(expiry, "-inf", now_ms - grace_ms, withscores=True)
        if late:
            reaped = await inventory.reap(event_id)
            if reaped or await redis.zscore(expiry, late[0][0]) is None:  # gone: overdue when seen
                overdue.update(m for m, _ in late)
                most_overdue_ms = max(most_overdue_ms, now_ms - int(late[0][1]))
                continue
            # Still there after a reap on the same clock: that clock went back meanwhile. Poll.
            await asyncio.sleep(POLL_SECONDS)
            continue
        first = await redis.zrangebyscore(expiry, "-inf", cutoff_ms, start=0, num=1, withscores=True)
        if not first:  # nothing left that expires within the wait
            return await left()
        # sleep until it expires; once it has, poll while the service has the grace to reap it (it then
        # leaves the expiry set, or turns up in ``late`` above)
        until_expiry = (first[0][1] - now_ms) / 1000
        await asyncio.sleep(min(max(until_expiry + 0.01, POLL_SECONDS), 1.0))
    return await left()


async def drain(redis: aioredis.Redis, event_id: str, timeout_seconds: float) -> int:
    """Wait for the outbox backlog to reach 0 (at most ``timeout_seconds``); returns the backlog at the end."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        backlog = await outbox_backlog(redis, event_id)
        if backlog == 0 or time.monotonic() >= deadline:
            return backlog
        await asyncio.sleep(POLL_SECONDS)


# The audit -----------------------------------------------------------------------------------------


async def _settle_and_snapshot_redis(
    report: AuditReport,
    redis: aioredis.Redis,
    inventory: Inventory,
    event_id: str,
    *,
    drain_timeout_seconds: float,
    hold_expiry_timeout_seconds: float | None,
    reap_grace_seconds: float,
) -> tuple[list[str], dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """Steps 1 and 2 of the module docstring (their violations go into ``report``; holds still active come
    first of all), then one snapshot of the event's zones in Redis. Returns (zone ids, zone hashes by zone,
    seat owners by zone)."""
    expiry_timeout = (
        drain_timeout_seconds if hold_expiry_timeout_seconds is None else hold_expiry_timeout_seconds
    )
    left = await _expire_holds(redis, inventory, event_id, expiry_timeout, reap_grace_seconds)
    report.holds_reaped, report.active_holds = left.overdue, left.active
    if left.overdue:
        report.add(
            "reaping",
            f"{left.overdue} expired holds were still active {reap_grace_seconds:g} s after their expiry (one "
            f"{left.most_overdue_ms / 1000:.1f} s after): the service did not reap them in time (is `boxoffice "
            "worker` running, its sweeper failing?); the audit then reaped them for the checks below",
        )
    report.outbox_backlog = await drain(redis, event_id, drain_timeout_seconds)
    if report.outbox_backlog:
        report.add(
            "drain",
            f"{report.outbox_backlog} outbox entries not written through after "
            f"{drain_timeout_seconds:g} s (is `boxoffice worker` running?)",
        )

    # Snapshot
    zone_ids = [z["zone_id"] for z in (await inventory.availability(event_id))["zones"]]
    slots = SlotClients(redis)  # one slot, one MULTI: a consistent snapshot (on a cluster, on its node)
    try:
        async with (await slots.for_key(keys.meta(event_id))).pipeline(transaction=True) as pipe:
            for z in zone_ids:
                pipe.hgetall(keys.zone(event_id, z))
                pipe.hgetall(keys.owners(event_id, z))
            raw = await pipe.execute()
    finally:
        await slots.aclose()
    redis_zones = {z: {_s(k): _s(v) for k, v in raw[2 * i].items()} for i, z in enumerate(zone_ids)}
    redis_owners = {z: {_s(k): _s(v) for k, v in raw[2 * i + 1].items()} for i, z in enumerate(zone_ids)}
    if report.active_holds:  # first of all violations: it explains the zones' held counts
        if left.next_expiry_seconds > 0:
            why = (
                f"the next expires in {left.next_expiry_seconds:.1f} s, past the {expiry_timeout:g} s the audit "
                f"may wait for TTLs (waited {left.waited_seconds:.1f} s; --hold-expiry-timeout)"
            )
        else:
            why = (
                f"holds kept expiring until the audit's wait ended (waited {left.waited_seconds:.1f} s): is the "
                "sale still running?"
            )
        report.violations.insert(0, Violation("holds", f"{report.active_holds} holds still active: {why}"))
    return zone_ids, redis_zones, redis_owners


async def audit_event(
    redis: aioredis.Redis,
    pg: Any,
    event_id: str,
    acks: list[dict] | None,
    *,
    drain_timeout_seconds: float,
    hold_expiry_timeout_seconds: float | None = None,
    reap_grace_seconds: float = REAP_GRACE_SECONDS,
    settings: Settings | None = None,
) -> AuditReport:
    """Audit one event; see the module docstring. ``pg`` is an asyncpg pool or connection. ``acks``: the
    run's records (``load_acks``; none of a run whose every hold was refused), or None when there are none
    to check against (the bench's hold-only events). ``reap_grace_seconds``: how long after its expiry a hold
    may still be active before the ``reaping`` check fails (the service, not the audit, must reap it).

    Never raises for a failed check (it becomes a Violation); Redis and PostgreSQL errors propagate.
    """
    report = AuditReport(event_id)
    # one-shot reads: the pooled client suffices, no auto-pipeline connection to close afterwards
    inventory = Inventory(redis, (settings or Settings()).model_copy(update={"auto_pipeline": False}))
    confirms = [a for a in acks or () if a.get("kind", "confirmed") == "confirmed"]
    report.acks = len(confirms)
    report.acks_checked = acks is not None

    report.in_redis = in_redis = await inventory.event_exists(event_id)
    if in_redis:
        zone_ids, redis_zones, redis_owners = await _settle_and_snapshot_redis(
            report,
            redis,
            inventory,
            event_id,
            drain_timeout_seconds=drain_timeout_seconds,
            hold_expiry_timeout_seconds=hold_expiry_timeout_seconds,
            reap_grace_seconds=reap_grace_seconds,
        )
    else:
        report.add(
            "counters",
            f"event {event_id} is not in Redis: only PostgreSQL and the acks were checked (is REDIS_URL the "
            "service's Redis? did it lose the event?)",
        )
        zone_ids, redis_zones, redis_owners = [], {}, {}

    # Snapshot: PostgreSQL
    pg_zones = {
        r["zone_id"]: r
        for r in await pg.fetch(
            "SELECT zone_id, kind, capacity, sold FROM zones WHERE event_id = $1 ORDER BY position", event_id
        )
    }
    rows = await pg.fetch(
        "SELECT o.order_id, o.hold_id, o.confirmed_at, o.persisted_at, i.zone_id, i.seat, i.quantity"
        " FROM orders o LEFT JOIN order_items i ON i.order_id = o.order_id WHERE o.event_id = $1",
        event_id,
    )
    dead = await pg.fetch("SELECT order_id, reason FROM dead_letters WHERE event_id = $1", event_id)
    if not pg_zones:
        report.add("redis_pg", f"event {event_id} has no zones in PostgreSQL")
    if not in_redis:
        zone_ids = list(pg_zones)

    orders: dict[str, dict[str, Any]] = {}
    pg_sold: Counter = Counter()
    pg_seat_orders: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in rows:
        o = orders.setdefault(
            r["order_id"],
            {
                "hold_id": r["hold_id"],
                "tickets": Counter(),
                "confirmed_at_ms": r["confirmed_at"].timestamp() * 1000,
                "lag_ms": (r["persisted_at"] - r["confirmed_at"]).total_seconds() * 1000,
            },
        )
        if r["zone_id"] is None:
            continue
        o["tickets"][(r["zone_id"], r["seat"])] += r["quantity"]
        pg_sold[r["zone_id"]] += r["quantity"]
        if r["seat"] is not None:
            pg_seat_orders[(r["zone_id"], r["seat"])].append(r["order_id"])
    report.orders = len(orders)
    lags = sorted(o["lag_ms"] for o in orders.values())
    if lags:
        report.write_lag_ms = {"p50": _percentile(lags, 50), "p99": _percentile(lags, 99), "max": lags[-1]}

    # Zones: capacity, counters, Redis vs PostgreSQL, stock back after expiry
    for z in zone_ids:
        rz, pz = redis_zones.get(z), pg_zones.get(z)
        if rz is None:  # the event is not in Redis: PostgreSQL's zones
            za = ZoneAudit(z, pz["kind"], pz["capacity"], None, None, None, pg_sold.get(z, 0), pz["sold"])
        else:
            za = ZoneAudit(
                z,
                rz.get("kind", "?"),
                int(rz.get("capacity", 0)),
                int(rz.get("available", 0)),
                int(rz.get("held", 0)),
                int(rz.get("sold", 0)),
                pg_sold.get(z, 0),
                pz["sold"] if pz else 0,
            )
        report.zones.append(za)
        cap = za.capacity
        for where, sold in (
            ("Redis", za.redis_sold),
            ("PostgreSQL items", za.pg_sold),
            ("PostgreSQL zones.sold", za.pg_counter),
        ):
            if sold is not None and sold > cap:
                report.add("capacity", f"{z}: {where} sold {sold} > capacity {cap}")
        if rz is None:
            if za.pg_counter != za.pg_sold:
                report.add("redis_pg", f"{z}: sold PostgreSQL items {za.pg_sold}, zones.sold {za.pg_counter}")
            continue
        if pz is not None and pz["capacity"] != cap:
            report.add("redis_pg", f"{z}: capacity Redis {cap} != PostgreSQL {pz['capacity']}")
        if (
            za.redis_available + za.redis_held + za.redis_sold != cap
            or min(za.redis_available, za.redis_held, za.redis_sold) < 0
        ):
            report.add(
                "counters",
                f"{z}: available {za.redis_available} + held {za.redis_held} + sold "
                f"{za.redis_sold} != capacity {cap}",
            )
        if za.redis_sold != za.pg_sold or za.pg_counter != za.pg_sold:
            report.add(
                "redis_pg",
                f"{z}: sold Redis {za.redis_sold}, PostgreSQL items {za.pg_sold}, zones.sold {za.pg_counter}",
            )
        if za.redis_held != 0 or za.redis_available != cap - za.redis_sold:
            report.add(
                "holds",
                f"{z}: held {za.redis_held}, available {za.redis_available} != capacity - sold "
                f"{cap - za.redis_sold}",
            )

    # Seats: one order per seat in PostgreSQL; Redis owners agree both ways
    for (z, seat), ids in pg_seat_orders.items():
        if len(ids) > 1:
            report.add("seats", f"{z}/{seat} in PostgreSQL orders {', '.join(ids)}")
        owner = redis_owners.get(z, {}).get(seat)
        if in_redis and owner != f"s:{ids[0]}":
            report.add("seats", f"{z}/{seat}: PostgreSQL order {ids[0]}, Redis owner {owner}")
    for z, owners in redis_owners.items():
        for seat, owner in owners.items():
            if owner.startswith("h:"):
                report.add("holds", f"{z}/{seat} still held by {owner[2:]}")
            elif owner.startswith("s:") and owner[2:] not in pg_seat_orders.get((z, seat), []):
                report.add("seats", f"{z}/{seat}: Redis owner {owner[2:]}, not in PostgreSQL")
    ack_seat_orders: dict[tuple[str, str], set[str]] = defaultdict(set)
    for a in confirms:
        for z, seat in _tickets(a["items"]):
            if seat is not None:
                ack_seat_orders[(z, seat)].add(a["order_id"])
    for (z, seat), ids in ack_seat_orders.items():
        if len(ids) > 1:
            report.add("seats", f"{z}/{seat} acked in orders {', '.join(sorted(ids))}")

    # Acks: each in PostgreSQL once, matching; one order per hold; none confirmed after its expiry
    acked_orders = Counter(a["order_id"] for a in confirms)
    orders_by_hold: dict[str, set[str]] = defaultdict(set)
    for a in confirms:
        orders_by_hold[a["hold_id"]].add(a["order_id"])
    for hold_id, ids in orders_by_hold.items():
        if len(ids) > 1:
            report.add(
                "acks", f"hold {hold_id} confirmed (201) into {len(ids)} orders: {', '.join(sorted(ids))}"
            )
    for order_id, n in acked_orders.items():
        if n > 1:
            report.add("acks", f"order {order_id} acknowledged with 201 {n} times")
    late: set[str] = set()
    for a in confirms:
        o = orders.get(a["order_id"])
        if o is None:
            report.add("acks", f"acked order {a['order_id']} is not in PostgreSQL")
            continue
        if o["hold_id"] != a["hold_id"] or o["tickets"] != _tickets(a["items"]):
            report.add(
                "acks",
                f"order {a['order_id']} differs: PostgreSQL hold {o['hold_id']} "
                f"{dict(o['tickets'])}, ack hold {a['hold_id']} {a['items']}",
            )
        expires_at_ms = a.get("expires_at_ms")
        if expires_at_ms is not None and o["confirmed_at_ms"] >= expires_at_ms:
            late.add(a["order_id"])
            report.add(
                "late_confirms",
                f"order {a['order_id']} confirmed at {o['confirmed_at_ms']:.0f} ms, "
                f"its hold expired at {expires_at_ms} ms",
            )
    # Every order, acked or not (a 201 lost to a timeout), against its hold record (kept for
    # hold_retention_seconds): the confirm script must refuse a hold at or past its expires_at_ms.
    if orders and in_redis:
        ids = list(orders)
        async with redis.pipeline(transaction=False) as pipe:
            for oid in ids:
                pipe.hget(keys.hold(event_id, orders[oid]["hold_id"]), "expires_at_ms")
            hold_expiry = await pipe.execute()
        for oid, expires_at_ms in zip(ids, hold_expiry, strict=True):
            if expires_at_ms is None or oid in late:
                continue
            if orders[oid]["confirmed_at_ms"] >= int(expires_at_ms):
                report.add(
                    "late_confirms",
                    f"order {oid} confirmed at {orders[oid]['confirmed_at_ms']:.0f} ms, its hold "
                    f"{orders[oid]['hold_id']} expired at {int(expires_at_ms)} ms (Redis' hold record)",
                )

    # Orders nobody acked must be known to Redis (a lost 201), else they came from nowhere
    unacked = [oid for oid in orders if oid not in acked_orders]
    if not in_redis:
        report.unacked_orders = len(unacked)
    elif unacked:
        async with redis.pipeline(transaction=False) as pipe:
            for oid in unacked:
                pipe.get(keys.order(event_id, oid))
            pointers = await pipe.execute()
        for oid, hold_id in zip(unacked, pointers, strict=True):
            if _s(hold_id) != orders[oid]["hold_id"]:
                report.add(
                    "unknown_orders",
                    f"order {oid} (hold {orders[oid]['hold_id']}) is in PostgreSQL "
                    f"but neither acked nor known to Redis",
                )
            else:
                report.unacked_orders += 1

    for d in dead:
        report.add("dead_letters", f"order {d['order_id']}: {d['reason']}")

    # Holds the run abandoned / released / confirmed too late ended the way they should
    expected = {"abandoned": "expired", "expired": "expired", "released": "released"}
    ended = [a for a in acks or () if a.get("kind") in expected]
    if ended and in_redis:
        async with redis.pipeline(transaction=False) as pipe:
            for a in ended:
                pipe.hget(keys.hold(event_id, a["hold_id"]), "status")
            statuses = await pipe.execute()
        for a, status in zip(ended, statuses, strict=True):
            status = _s(status)
            if status is not None and status != expected[a["kind"]]:
                report.add(
                    "holds", f"{a['kind']} hold {a['hold_id']} is {status}, expected {expected[a['kind']]}"
                )
    return report


def run_cli(
    settings: Settings,
    *,
    event_id: str,
    acks_file: Path | None,
    drain_timeout_seconds: float,
    hold_expiry_timeout_seconds: float | None = None,
    reap_grace_seconds: float = REAP_GRACE_SECONDS,
) -> int:
    """``boxoffice audit``: print the report; 0 if it passes, 1 on any violation, 2 if the acks can't be read,
    or ``acks_file`` has no ack file of the event at all, or only lines of other events (read from the wrong
    place: nothing would vouch for the run's 201s; a Locust run writes ``<acks-dir>/<event_id>/*.jsonl`` as
    it starts, lines or not), or Redis or PostgreSQL cannot be reached (no verdict)."""
    from rich.console import Console

    from service import db
    from service.app import redis_client

    console = Console(width=None if sys.stdout.isatty() else 120)
    acks: list[dict] | None = None
    if acks_file is not None:
        if not ack_files(acks_file, event_id):
            console.print(
                f"[red]no ack file of event {event_id} in {acks_file} (*.jsonl there or in {event_id}/)[/red]"
            )
            return 2
        try:
            acks = load_acks(acks_file, event_id)
            others = not acks and any(a.get("event_id", event_id) != event_id for a in load_acks(acks_file))
        except (OSError, AckError) as exc:
            console.print(f"[red]cannot read acks from {acks_file}: {exc}[/red]")
            return 2
        if others:  # another event's acks: read from the wrong place
            console.print(f"[red]the acks in {acks_file} are of other events, none of {event_id}[/red]")
            return 2

    async def go() -> AuditReport:
        client = redis_client(settings.redis_url, settings)
        pool = await db.create_pool(settings.database_url, min_size=1, max_size=2)
        try:
            return await audit_event(
                client,
                pool,
                event_id,
                acks,
                drain_timeout_seconds=drain_timeout_seconds,
                hold_expiry_timeout_seconds=hold_expiry_timeout_seconds,
                reap_grace_seconds=reap_grace_seconds,
                settings=settings,
            )
        finally:
            await pool.close()
            await client.aclose()

    try:
        report = asyncio.run(go())
    except (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        from rich.markup import escape

        console.print(
            f"[red]no verdict: a store cannot be read ({escape(f'{type(exc).__name__}: {exc}')})[/red]"
        )
        return 2
    report.render(console)
    return 0 if report.ok else 1
