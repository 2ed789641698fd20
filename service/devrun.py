"""``boxoffice dev`` (what ``make run`` runs): the API and a write-through worker, with a demo event on sale.

By the time ``run_cli`` is called, ``boxoffice dev`` has chosen the servers (``service.servers``, started
embedded ones if needed) and exported ``REDIS_URL`` / ``DATABASE_URL``, so the children use the same ones.

1. Apply pending migrations.
2. Start ``boxoffice serve --no-migrate`` and ``boxoffice worker`` as child processes with our environment
   and a shared ``PROMETHEUS_MULTIPROC_DIR`` (so ``/metrics`` also counts the worker). Each child runs in
   its own session (a Ctrl-C reaches only us, and we stop them in order) and gets SIGTERM from Linux if we
   die without cleaning up (``PR_SET_PDEATHSIG``).
   (Before that, refuse with exit 1 if the API's port is taken.)
3. Wait until ``GET /readyz`` answers 200 (at most ``READY_TIMEOUT_SECONDS``).
4. Create the demo event through the admin API, or reuse it if it is there already, and print its id and
   curl lines to try a hold and a confirm.
5. Wait for SIGINT (Ctrl-C) or SIGTERM, or for a child to exit. Then stop the API, then the worker:
   SIGTERM to the child's process group (uvicorn's and arq's graceful shutdown), SIGKILL to whatever is
   left after ``STOP_TIMEOUT_SECONDS``. The embedded servers stop after that, at interpreter exit
   (``Servers``' atexit hooks), so the children never lose their stores while they shut down.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from service.migrate import migrate
from service.servers import die_with_parent
from service.settings import Settings

DEMO_EVENT_ID = "demo"
READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0
POLL_SECONDS = 0.2
HTTP_TIMEOUT_SECONDS = 5.0


def demo_event(event_id: str = DEMO_EVENT_ID) -> dict[str, Any]:
    """The demo event's ``POST /v1/events`` body: a general-admission floor and a seated balcony."""
    return {
        "event_id": event_id,
        "name": "Demo night (boxoffice dev)",
        "starts_at": (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0).isoformat(),
        "hold_ttl_seconds": 600,
        "max_tickets_per_customer": 6,
        "zones": [
            {"zone_id": "floor", "kind": "ga", "capacity": 1000, "price_cents": 4900},
            {
                "zone_id": "balcony",
                "kind": "seated",
                "price_cents": 8900,
                "rows": {"A": 20, "B": 20, "C": 20},
            },
        ],
    }


def run_cli(settings: Settings) -> int:
    """Run until SIGINT/SIGTERM (exit 0) or until a child exits (its exit code, at least 1).

    ``settings`` must have both URLs set (``boxoffice dev`` resolves them). Returns 1 if migrating fails,
    the API is not ready within ``READY_TIMEOUT_SECONDS``, or the demo event cannot be created.
    """
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    own_metrics_dir = not settings.metrics_dir
    metrics_dir = settings.metrics_dir or tempfile.mkdtemp(prefix="boxoffice-metrics-")
    children: list[Child] = []
    try:
        applied = migrate(settings.database_url)
        _say(f"migrations applied: {', '.join(applied)}" if applied else "database is up to date")
        if stop.is_set():
            return 0
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
        host, port = settings.host, settings.port
        if not _port_free(host, port):
            _say(f"{host}:{port} is already in use; stop what listens there or set BOXOFFICE_PORT")
            return 1
        children.append(
            Child.start("api", ["serve", "--no-migrate", "--host", host, "--port", str(port)], env)
        )
        children.append(Child.start("worker", ["worker"], env))
        base_url = f"http://{_client_host(host)}:{port}"
        if not _wait_ready(base_url, children, stop):
            return 0 if stop.is_set() else 1
        try:
            event_id, how = ensure_demo_event(base_url, settings.admin_token)
        except RuntimeError as exc:
            _say(f"could not set up the demo event: {exc}")
            return 1
        _say(_banner(base_url, event_id, how))
        while not stop.wait(POLL_SECONDS):
            for child in children:
                if child.process.poll() is not None:
                    _say(f"{child.name} exited with code {child.process.returncode}; stopping")
                    return child.process.returncode or 1
        _say("stopping")
        return 0
    finally:
        for child in children:  # the API first (no new sales), then the worker (it drains the outbox)
            child.stop()
        if own_metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class Child:
    """A ``boxoffice`` subcommand run as a child process, leader of its own process group."""

    name: str
    process: subprocess.Popen[bytes]

    @classmethod
    def start(cls, name: str, args: list[str], env: dict[str, str]) -> Child:
        command = [sys.executable, "-m", "service.cli", *args]
        process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )  # fmt: skip
        _say(f"started {name} (pid {process.pid}): boxoffice {' '.join(args)}")
        return cls(name, process)

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """SIGTERM to the process group, wait up to ``timeout`` s for all of it, then SIGKILL. Idempotent."""
        pgid = self.process.pid  # start_new_session: the child leads its own group
        if not _group_alive(pgid):
            self.process.poll()
            return
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.process.poll()  # reap the leader so it does not linger as a zombie
            if not _group_alive(pgid):
                return
            time.sleep(0.05)
        _say(f"{self.name} did not stop within {timeout:g} s; killing it")
        _signal_group(pgid, signal.SIGKILL)
        self.process.wait()


def ensure_demo_event(base_url: str, admin_token: str, event_id: str = DEMO_EVENT_ID) -> tuple[str, str]:
    """Create the demo event, or reuse it; returns ``(event_id, "created" | "reused")``.

    An existing event is reused if both PostgreSQL (``GET /v1/events/{id}``) and Redis (``.../availability``)
    know it; it is resumed if paused. If only one of them knows it (e.g. Redis was flushed), a fresh
    ``demo-<hex>`` event is created instead. Raises RuntimeError if the API refuses.
    """
    auth = {"Authorization": f"Bearer {admin_token}"}
    status, body = _request("POST", f"{base_url}/v1/events", demo_event(event_id), auth)
    if status == 201:
        return event_id, "created"
    if status != 409 or body.get("error", {}).get("code") != "event_exists":
        raise RuntimeError(f"POST /v1/events answered {status}: {body}")
    record, _ = _request("GET", f"{base_url}/v1/events/{event_id}")
    live, availability = _request("GET", f"{base_url}/v1/events/{event_id}/availability")
    if record == 200 and live == 200:
        if availability.get("status") != "on_sale":
            _request("POST", f"{base_url}/v1/events/{event_id}/resume", None, auth)
        return event_id, "reused"
    fresh = f"{DEMO_EVENT_ID}-{uuid.uuid4().hex[:6]}"
    _say(
        f"event {event_id!r} is only half there (PostgreSQL {record}, Redis {live}); using {fresh!r} instead"
    )
    status, body = _request("POST", f"{base_url}/v1/events", demo_event(fresh), auth)
    if status != 201:
        raise RuntimeError(f"POST /v1/events answered {status}: {body}")
    return fresh, "created"


def _banner(base_url: str, event_id: str, how: str) -> str:
    hold = {"customer_id": "alice", "items": [{"zone_id": "floor", "quantity": 2}]}
    seats = {"customer_id": "bob", "items": [{"zone_id": "balcony", "seats": ["A1", "A2"]}]}
    json_header = "-H 'Content-Type: application/json'"
    return "\n".join(
        [
            "",
            f"boxoffice is serving on {base_url} (API description: {base_url}/openapi.json)",
            f"Demo event: {event_id} ({how}): zone floor (general admission, 1000 tickets), "
            "zone balcony (seated, rows A-C of 20)",
            "Try a hold:",
            f"  curl -s -X POST {base_url}/v1/events/{event_id}/holds {json_header} "
            f"-H 'Idempotency-Key: try-1' -d '{orjson.dumps(hold).decode()}'",
            "or hold two seats:",
            f"  curl -s -X POST {base_url}/v1/events/{event_id}/holds {json_header} "
            f"-d '{orjson.dumps(seats).decode()}'",
            "then confirm it with the hold_id it returned:",
            f"  curl -s -X POST {base_url}/v1/events/{event_id}/holds/HOLD_ID/confirm {json_header} "
            '-d \'{"payment_ref": "pay-1"}\'',
            f"Availability: curl -s {base_url}/v1/events/{event_id}/availability",
            "Press Ctrl-C to stop.",
            "",
        ]
    )


def _wait_ready(base_url: str, children: list[Child], stop: threading.Event) -> bool:
    """Poll ``/readyz`` until 200. False if asked to stop, a child exits, or time runs out (said why)."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not stop.is_set():
        for child in children:
            if child.process.poll() is not None:
                _say(f"{child.name} exited with code {child.process.returncode} before the API was ready")
                return False
        status, _ = _request("GET", f"{base_url}/readyz", timeout=1.0)
        if status == 200:
            return True
        if time.monotonic() > deadline:
            _say(f"{base_url}/readyz did not answer 200 within {READY_TIMEOUT_SECONDS:g} s")
            return False
        stop.wait(POLL_SECONDS)
    return False


def _request(
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = HTTP_TIMEOUT_SECONDS,
) -> tuple[int, dict[str, Any]]:
    """One JSON request with the standard library; ``(0, {})`` if nothing answers."""
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, _json(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _json(exc.read())
    except (OSError, urllib.error.URLError):
        return 0, {}


def _json(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _client_host(host: str) -> str:
    """Where to reach a server bound to ``host``: a wildcard bind is reached on loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(
        host, f"[{host}]" if ":" in host else host
    )


def _port_free(host: str, port: int) -> bool:
    """True if we could bind ``host:port`` now (uvicorn binds with SO_REUSEADDR too)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # members we may not signal (none expected) still count as alive
        return True
    return True


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _say(message: str) -> None:
    print(message, flush=True)
