"""Locust plumbing shared by the scenarios: options, the sale's event, the acks log, and the audit at the end.

One ``Sale`` per Locust process, set up on ``test_start``:

* the local runner, or the master of a distributed run, creates the event through the admin API
  (``POST /v1/events`` with ``--admin-token`` / ``BOXOFFICE_ADMIN_TOKEN``) under a fresh id, or
  ``--event-id`` (created if missing, else reused), and puts the id into ``parsed_options.event_id``; Locust
  sends custom options to the workers with each spawn message, so every worker sees the same id;
* every process that runs users reads the event back (``GET /v1/events/{id}`` and the seat map pages),
  so users know zone ids and seat labels in seat-map order.

Each run (also each one started from the web UI) sets up its sale anew: the event id the UI's form holds is
used, but the id this process made up for its previous run (which the form may show back) means a new event.
If the set-up fails (the API refuses the admin token, is down, the audit's stores lack the event, ...) the run
sends no traffic, is not audited, stops (headless: Locust quits) and the process exits 1; nothing of an earlier
run's sale is reused. A run stopped while its set-up still waits (its ``-t`` ran out) exits 1 as well. When the
event is created now, acks left in ``<acks dir>/<event_id>/`` by an earlier sale of that id (a deployment
reset since) are moved aside first.

Acks: each process appends JSON lines to ``<acks dir>/<event_id>/<host>-<pid>.jsonl`` (one line per
``201 confirmed``, and one per hold the run abandoned, released or confirmed too late; the shapes are in
``loadtests/audit.py``). On ``test_stop`` the local runner, or the master once its workers stopped
(custom message ``boxoffice_stop``), runs ``boxoffice audit`` on that directory in a child process and sets
``environment.process_exit_code`` to 1 if the audit finds a violation. A run stopped by SIGTERM or Ctrl-C
is audited too: Locust chooses its exit code before it stops a running test, so the ``quitting`` hook stops
the test first. The acks directory must be shared by all Locust processes (one machine); otherwise copy the
files together and run ``boxoffice audit`` (an audit given no ack file of the event refuses, exit 2).

The audit reads Redis and PostgreSQL directly: give the Locust process ``REDIS_URL`` and ``DATABASE_URL``
of the deployment under test (``--skip-audit`` to leave it out). The set-up checks that they hold the sale's
event (``audit_can_see``) before any traffic: a run whose audit would read other servers fails at its start,
not after it.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import gevent
import orjson
import requests
from locust import events
from locust.env import Environment
from locust.runners import STATE_RUNNING, STATE_SPAWNING, MasterRunner, WorkerRunner

from loadtests.audit import set_aside_stale_acks

log = logging.getLogger("boxoffice.loadtests")

DEFAULT_ACKS_DIR = Path(tempfile.gettempdir()) / "boxoffice-acks"
SEAT_PAGE_LIMIT = 1000
SETUP_TIMEOUT_SECONDS = 30
WORKER_STOP_TIMEOUT_SECONDS = 20


@dataclass
class Zone:
    zone_id: str
    kind: str
    capacity: int
    seats: list[str] = field(default_factory=list)
    """Seat labels in seat-map order (front rows first); empty for general admission."""


@dataclass
class Sale:
    event_id: str
    zones: list[Zone]
    hold_ttl_seconds: int
    """ttl_seconds the scenario sends with each hold (short, so abandoned holds expire during the run)."""
    acks: AckLog

    def zone(self, kind: str) -> list[Zone]:
        return [z for z in self.zones if z.kind == kind]


class AckLog:
    """Appends one JSON line per record and flushes it, so a killed process loses at most the line it writes."""

    def __init__(self, directory: Path, event_id: str):
        self.event_id = event_id
        self.path = directory / event_id / f"{socket.gethostname()}-{os.getpid()}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("ab")

    def record(self, kind: str, **fields: Any) -> None:
        self._file.write(orjson.dumps({"kind": kind, "event_id": self.event_id, **fields}) + b"\n")
        self._file.flush()

    def confirmed(self, order: dict[str, Any], hold: dict[str, Any]) -> None:
        """Record a ``201 confirmed``: the order body as the API answered it, and its hold's body."""
        self.record(
            "confirmed",
            order_id=order["order_id"],
            hold_id=hold["hold_id"],
            items=order["items"],
            confirmed_at_ms=iso_to_ms(order["confirmed_at"]),
            expires_at_ms=iso_to_ms(hold["expires_at"]),
        )

    def close(self) -> None:
        self._file.close()


_sale: Sale | None = None
_generated_event_id = ""
"""The id this process made up for its last run: the web UI's form may show it back for the next run, which
then gets a new event rather than the last run's (a different id typed there is used as asked)."""
_stopped_workers: set[str] = set()
HOLD_EXPIRY_MARGIN_SECONDS = 10
"""The audit waits for holds at least ``--hold-ttl`` + this (the run's last holds expire --hold-ttl after it)."""
AUDIT_CHECK_TIMEOUT_SECONDS = 120
"""At most this long for ``audit_can_see`` (embedded servers may have to start when no URL is set)."""


def current_sale() -> Sale | None:
    """This process's sale, or None before ``test_start`` ran here."""
    return _sale


def add_arguments(parser: Any, *, tickets: int, hold_ttl_seconds: int, demand_ratio: float) -> None:
    """Register the scenario options (shown in the web UI too)."""
    g = parser  # Locust's parser: options added here are shown in the web UI and sent to workers
    g.add_argument(
        "--event-id",
        default="",
        help="Use this event (created if missing); default: a new one per test. Acks of an earlier sale of a "
        "created id are moved aside.",
    )
    g.add_argument(
        "--sale-tickets",
        type=int,
        default=tickets,
        help="Tickets for sale in a new event (0: the scenario's default; flash_sale: users x 2.5 / --demand-ratio).",
    )
    g.add_argument(
        "--demand-ratio",
        type=float,
        default=demand_ratio,
        help="flash_sale with --sale-tickets 0: first-wave demand / supply.",
    )
    g.add_argument("--hold-ttl", type=int, default=hold_ttl_seconds, help="ttl_seconds of each hold.")
    g.add_argument(
        "--admin-token",
        default="dev-admin-token",
        env_var="BOXOFFICE_ADMIN_TOKEN",
        help="Bearer token for POST /v1/events.",
        is_secret=True,
    )
    g.add_argument("--acks-dir", default=str(DEFAULT_ACKS_DIR), help="Where each process writes its acks.")
    g.add_argument(
        "--skip-audit",
        action="store_true",
        default=False,
        help="Don't run the audit at test_stop, nor check at the start that its Redis and PostgreSQL hold the event.",
    )
    g.add_argument(
        "--audit-drain-timeout",
        type=float,
        default=30.0,
        help="Seconds the audit waits for the write-through to drain (and for holds to expire: at least "
        f"--hold-ttl + {HOLD_EXPIRY_MARGIN_SECONDS} s).",
    )


def sale_event_body(event_id: str, tickets: int) -> dict[str, Any]:
    """An event of ``tickets`` seats and places: two general-admission zones and two seated zones, a quarter each.

    Seated zones have rows A, B, ... of 10 seats (wider rows past 260 seats, so at most 26 rows).
    """
    quarter = max(4, tickets // 4)
    per_row = 10 if quarter <= 260 else math.ceil(quarter / 26)
    rows, left = {}, quarter
    for i in range(math.ceil(quarter / per_row)):
        rows[chr(ord("A") + i)] = min(per_row, left)
        left -= per_row
    return {
        "event_id": event_id,
        "name": f"Flash sale {event_id}",
        "starts_at": (datetime.now(UTC) + timedelta(days=30)).isoformat(),
        "hold_ttl_seconds": 600,
        "max_tickets_per_customer": 8,
        "zones": [
            {"zone_id": "floor", "kind": "ga", "capacity": quarter, "price_cents": 9900},
            {"zone_id": "balcony", "kind": "ga", "capacity": quarter, "price_cents": 6900},
            {"zone_id": "sec-101", "kind": "seated", "price_cents": 15900, "rows": rows},
            {"zone_id": "sec-102", "kind": "seated", "price_cents": 12900, "rows": rows},
        ],
    }


def create_event(host: str, admin_token: str, body: dict[str, Any]) -> bool:
    """POST /v1/events. True if created, False if it exists already. Raises RuntimeError on anything else."""
    r = requests.post(
        f"{host}/v1/events",
        json=body,
        headers={"Authorization": f"Bearer {admin_token}"},
        timeout=SETUP_TIMEOUT_SECONDS,
    )
    if r.status_code == 201:
        return True
    if r.status_code == 409 and r.json()["error"]["code"] == "event_exists":
        return False
    raise RuntimeError(f"POST /v1/events: {r.status_code} {r.text[:500]}")


def read_zones(host: str, event_id: str) -> list[Zone]:
    """The event's zones, with every seat label of seated zones (seat-map pages). Raises RuntimeError."""
    r = requests.get(f"{host}/v1/events/{event_id}", timeout=SETUP_TIMEOUT_SECONDS)
    if r.status_code != 200:
        raise RuntimeError(f"GET /v1/events/{event_id}: {r.status_code} {r.text[:500]}")
    zones = [Zone(z["zone_id"], z["kind"], z["capacity"]) for z in r.json()["zones"]]
    for z in zones:
        after = ""
        while z.kind == "seated":
            r = requests.get(
                f"{host}/v1/events/{event_id}/zones/{z.zone_id}/seats",
                params={"limit": SEAT_PAGE_LIMIT, "after": after},
                timeout=SETUP_TIMEOUT_SECONDS,
            )
            if r.status_code != 200:
                raise RuntimeError(f"GET seats of {z.zone_id}: {r.status_code} {r.text[:500]}")
            page = r.json()
            z.seats.extend(s["seat"] for s in page["seats"])
            if not page["next"]:
                break
            after = page["next"]
    return zones


def iso_to_ms(value: str) -> int:
    """``2027-05-24T19:00:00.123Z`` -> epoch milliseconds."""
    return round(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)


def new_customer_id() -> str:
    return f"c-{uuid.uuid4().hex[:20]}"


def front_heavy_index(n: int, width: int) -> int:
    """A start index in 0..n-width, most often near 0: front rows are hot (cube of a uniform draw)."""
    return min(int(n * random.random() ** 3), max(0, n - width))


def install(make_body: Any, *, id_prefix: str) -> None:
    """Hook the sale's set-up and audit into Locust's events. ``make_body(event_id, options, user_count)``
    returns the ``POST /v1/events`` body for a new event, whose id starts with ``id_prefix``."""

    @events.init.add_listener
    def _init(environment: Environment, **_: Any) -> None:
        runner = environment.runner
        if isinstance(runner, WorkerRunner):
            runner.register_message("boxoffice_stop", _on_stop_request, concurrent=True)
        elif isinstance(runner, MasterRunner):
            runner.register_message(
                "boxoffice_stopped", lambda environment, msg, **_: _stopped_workers.add(msg.data["worker"])
            )

    @events.test_start.add_listener
    def _test_start(environment: Environment, **_: Any) -> None:
        global _sale, _generated_event_id
        options, runner = environment.parsed_options, environment.runner
        host = environment.host.rstrip("/")
        if _sale is not None:  # the previous run's: none of this run's traffic or acks may go there
            _sale.acks.close()
            _sale = None
        try:
            if not isinstance(runner, WorkerRunner):
                requested = options.event_id if options.event_id != _generated_event_id else ""
                event_id = requested or f"{id_prefix}-{time.strftime('%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
                options.event_id = ""  # until the sale is set up: a failed set-up leaves nothing to audit
                body = make_body(event_id, options, runner.target_user_count or 1)
                created = create_event(host, options.admin_token, body)
                if not requested:
                    _generated_event_id = event_id
                if created:
                    moved = set_aside_stale_acks(Path(options.acks_dir), event_id)
                    if moved is not None:
                        log.warning(
                            "event %s is new: acks of an earlier sale of that id moved to %s", event_id, moved
                        )
                log.info("event %s %s", event_id, "created" if created else "exists; using it")
                if not options.skip_audit:
                    audit_can_see(event_id)
                options.event_id = event_id  # sent to workers with each spawn message
            if isinstance(runner, MasterRunner):
                _stopped_workers.clear()
                return
            if not options.event_id:
                raise RuntimeError("no event id from the master")
            zones = read_zones(host, options.event_id)
        except Exception as exc:  # RuntimeError from the API's answers, requests' connection errors
            _fail_setup(environment, exc)
            return
        except BaseException:
            # GreenletExit: Locust stopped the run (its -t ran out, Ctrl-C) while the set-up still waited, e.g.
            # on audit_can_see: nothing was sent, nothing will be audited, so the run must not exit 0
            log.error(
                "the run stopped while its sale was being set up: it sent no traffic and is not audited"
            )
            environment.process_exit_code = 1
            raise
        _sale = Sale(
            options.event_id, zones, options.hold_ttl, AckLog(Path(options.acks_dir), options.event_id)
        )
        log.info(
            "sale %s: %s; acks in %s",
            _sale.event_id,
            ", ".join(f"{z.zone_id} ({z.kind}, {z.capacity})" for z in zones),
            _sale.acks.path,
        )

    @events.test_stop.add_listener
    def _test_stop(environment: Environment, **_: Any) -> None:
        runner, options = environment.runner, environment.parsed_options
        if isinstance(runner, WorkerRunner) or not options.event_id:
            return
        if isinstance(runner, MasterRunner):
            _stop_workers(runner)
        if options.skip_audit:
            return
        acks_dir = Path(options.acks_dir) / options.event_id
        acks_dir.mkdir(parents=True, exist_ok=True)
        hold_expiry = max(options.audit_drain_timeout, options.hold_ttl + HOLD_EXPIRY_MARGIN_SECONDS)
        code = run_audit(options.event_id, acks_dir, options.audit_drain_timeout, hold_expiry)
        if code != 0:
            environment.process_exit_code = 1
            log.error("audit of %s failed (exit %s)", options.event_id, code)

    @events.quitting.add_listener
    def _quitting(environment: Environment, **_: Any) -> None:
        # Locust picks its exit code right after `quitting` and only then stops the runner (SIGTERM, Ctrl-C,
        # a headless run without -t): stop it here, so test_stop's audit runs first and its verdict counts.
        runner = environment.runner
        if isinstance(runner, WorkerRunner) or runner is None:
            return
        if runner.state in (STATE_RUNNING, STATE_SPAWNING):
            log.info("quitting while the test runs: stopping it first, for the audit")
            runner.stop()


def _fail_setup(environment: Environment, exc: Exception) -> None:
    """The sale could not be set up: say why, make the process exit 1, and stop the run (no users do
    anything without a sale, and ``test_stop`` audits nothing without an event id). Headless: quit; with
    the web UI: stop, so another run can be started from it."""
    runner = environment.runner
    log.error("setting up the sale failed, so this run sends no traffic and is not audited: %s", exc)
    environment.process_exit_code = 1
    if isinstance(runner, WorkerRunner):
        return  # the master decides; this worker's users stay idle
    environment.parsed_options.event_id = ""
    gevent.spawn_later(0, runner.stop if environment.web_ui is not None else runner.quit)


def _on_stop_request(environment: Environment, msg: Any, **_: Any) -> None:
    """Worker: stop the users (their last acks are written), then tell the master."""
    environment.runner.stop()
    environment.runner.send_message("boxoffice_stopped", {"worker": environment.runner.client_id})


def _stop_workers(runner: MasterRunner) -> None:
    """A headless master fires test_stop before its workers stop: stop them first, bounded."""
    expected = {w.id for w in runner.clients.all}
    runner.send_message("boxoffice_stop")
    deadline = time.monotonic() + WORKER_STOP_TIMEOUT_SECONDS + runner.environment.stop_timeout
    while not expected <= _stopped_workers and time.monotonic() < deadline:
        gevent.sleep(0.2)
    if not expected <= _stopped_workers:
        log.warning("workers %s did not confirm they stopped; auditing anyway", expected - _stopped_workers)


def audit_can_see(event_id: str) -> None:
    """Raise RuntimeError unless the Redis and PostgreSQL the audit will read (this process's ``REDIS_URL`` and
    ``DATABASE_URL``, resolved as ``boxoffice audit`` resolves them) both hold ``event_id``, which the API has
    just set up. Runs ``boxoffice event show`` in a child process, as ``run_audit`` runs the audit; it exits 2
    for an event missing from either store, 1 for a store it cannot reach."""
    cmd = [sys.executable, "-m", "service.cli", "event", "show", event_id]
    try:
        done = subprocess.run(
            cmd, check=False, capture_output=True, text=True, timeout=AUDIT_CHECK_TIMEOUT_SECONDS
        )
    except subprocess.TimeoutExpired:
        why = f"no answer within {AUDIT_CHECK_TIMEOUT_SECONDS} s"
    else:
        if done.returncode == 0:
            return
        err = done.stderr or done.stdout
        code = re.search(r'"code":\s*"([a-z_]+)"', err)  # the JSON error body (``_refuse``), if that was it
        lines = err.strip().splitlines()
        why = code.group(1) if code else lines[-1] if lines else f"exit code {done.returncode}"
    raise RuntimeError(
        f"the audit could not read event {event_id} from the Redis and PostgreSQL this Locust process reads "
        f"(`boxoffice event show`: {why}): give Locust the deployment's REDIS_URL and DATABASE_URL (an event "
        "that the deployment's Redis lost needs `boxoffice rebuild`), or --skip-audit"
    )


def run_audit(
    event_id: str, acks_dir: Path, drain_timeout_seconds: float, hold_expiry_timeout_seconds: float
) -> int:
    """Run ``boxoffice audit`` in a child process (asyncio must not block Locust's gevent hub); its exit code."""
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "audit",
        "--event",
        event_id,
        "--acks",
        str(acks_dir),
        "--drain-timeout",
        str(drain_timeout_seconds),
        "--hold-expiry-timeout",
        str(hold_expiry_timeout_seconds),
    ]
    log.info("auditing: %s", " ".join(cmd))
    return subprocess.run(cmd, check=False).returncode
