"""A short headless Locust flash sale against a live ``boxoffice serve`` (and ``boxoffice worker``), audited.

The API and the worker run as child processes on a private redis-server (so no other test's worker can
consume this sale's outbox) and the session's PostgreSQL database. Locust runs as a child process too
(it monkey-patches the standard library with gevent on import).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest
import redis

from loadtests.bench import REPO, boxoffice, free_port, stop_process, throwaway_redis, wait_ready
from service import keys

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live_api(settings, tmp_path_factory):
    """(base URL, env, redis URL) of an API with one uvicorn worker plus a write-through worker."""
    logs = tmp_path_factory.mktemp("live-api")
    with throwaway_redis() as redis_url:
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "DATABASE_URL": settings.database_url,
            "BOXOFFICE_ADMIN_TOKEN": settings.admin_token,
            "PROMETHEUS_MULTIPROC_DIR": str(logs),
            "BOXOFFICE_LOG_LEVEL": "WARNING",
        }
        port = free_port()
        api = boxoffice(
            "serve",
            "--workers",
            "1",
            "--port",
            str(port),
            "--no-migrate",
            env=env,
            log_path=logs / "serve.log",
        )
        worker = boxoffice("worker", env=env, log_path=logs / "worker.log")
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base, api)
            yield base, env, redis_url
        finally:
            stop_process(worker)
            stop_process(api)


def locust(
    base: str,
    env: dict,
    acks_dir: Path,
    event_id: str,
    seconds: int | None,
    *,
    scenario: str = "flash_sale",
    users: int = 40,
    options: tuple[str, ...] = ("--sale-tickets", "40"),
) -> subprocess.Popen:
    """A headless run of ``loadtests/<scenario>.py`` (default: a flash sale of 40 users); ``seconds=None``: no
    -t, it runs until stopped. Output on the process's stdout."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(REPO / "loadtests" / f"{scenario}.py"),
            "--headless",
            "-u",
            str(users),
            "-r",
            str(users),
            *(["-t", f"{seconds}s"] if seconds else []),
            "--host",
            base,
            "--event-id",
            event_id,
            *options,
            "--hold-ttl",
            "2",
            "--acks-dir",
            str(acks_dir),
            "--audit-drain-timeout",
            "15",
            "--only-summary",
            "--stop-timeout",
            "3",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def acks_of(acks_dir: Path, event_id: str) -> list[dict]:
    return [
        orjson.loads(line)
        for f in (acks_dir / event_id).glob("*.jsonl")
        for line in f.read_bytes().splitlines()
        if line.strip()
    ]


def test_flash_sale_run_passes_the_audit(live_api, tmp_path):
    base, env, _ = live_api
    event_id = f"smoke-{uuid.uuid4().hex[:10]}"
    proc = locust(base, env, tmp_path, event_id, seconds=10)
    out, _ = proc.communicate(timeout=90)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    assert f"PASS {event_id}" in text.replace("\n", " ")
    kinds = [a["kind"] for a in acks_of(tmp_path, event_id)]
    assert kinds.count("confirmed") >= 5, kinds
    assert {"abandoned", "released", "expired"} & set(kinds), kinds  # holds that were not bought


@pytest.mark.parametrize("stopped_by", ["run_time", "sigterm"])
def test_flash_sale_run_fails_on_a_planted_oversell(live_api, tmp_path, stopped_by):
    """Sell one GA ticket behind the service's back (Redis counters) while Locust runs: exit code 1, whether
    the run ends by -t or by SIGTERM (Locust picks its exit code before it stops a running test)."""
    base, env, redis_url = live_api
    event_id = f"smoke-{uuid.uuid4().hex[:10]}"
    proc = locust(base, env, tmp_path, event_id, seconds=4 if stopped_by == "run_time" else None)
    r = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 30
    while not r.exists(keys.meta(event_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    r.hincrby(keys.zone(event_id, "floor"), "sold", 1)
    r.hincrby(keys.zone(event_id, "floor"), "available", -1)
    if stopped_by == "sigterm":
        time.sleep(4)
        proc.terminate()
    try:
        out, _ = proc.communicate(timeout=90)
    finally:
        stop_process(proc)
    text = out.decode(errors="replace")
    assert proc.returncode == 1, text[-4000:]
    assert f"FAIL {event_id}" in text.replace("\n", " ")


def test_a_run_whose_audit_would_read_other_servers_fails_before_any_traffic(live_api, tmp_path):
    """Locust given another Redis than the service's (here: another database of it): the audit at the end
    could not find the event, so the set-up fails at the start. No hold is made, nothing is audited, exit 1."""
    base, env, redis_url = live_api
    event_id = f"smoke-{uuid.uuid4().hex[:10]}"
    elsewhere = redis_url.rsplit("/", 1)[0] + "/5"
    assert elsewhere != redis_url
    started = time.monotonic()
    proc = locust(base, {**env, "REDIS_URL": elsewhere}, tmp_path, event_id, seconds=20)
    out, _ = proc.communicate(timeout=90)
    text = out.decode(errors="replace")
    assert proc.returncode == 1, text[-4000:]
    assert f"the audit could not read event {event_id}" in text.replace("\n", " "), text[-4000:]
    assert "event_not_found" in text and "auditing:" not in text, text[-4000:]
    assert time.monotonic() - started < 20  # it did not run its 20 s
    r = redis.Redis.from_url(redis_url)
    assert r.exists(keys.meta(event_id))  # the API did set the sale up
    assert int(r.hget(keys.zone(event_id, "floor"), "held")) == 0
    assert int(r.hget(keys.zone(event_id, "floor"), "sold")) == 0
    assert not r.exists(keys.expiry(event_id))  # no hold was ever made

    # --skip-audit: no audit at the end, so no check at the start either; the run goes ahead
    skip = ("--sale-tickets", "40", "--skip-audit")
    proc = locust(base, {**env, "REDIS_URL": elsewhere}, tmp_path, event_id, seconds=2, options=skip)
    out, _ = proc.communicate(timeout=90)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    assert "could not read event" not in text and "auditing:" not in text, text[-4000:]
    holds = re.search(r"POST\s+POST holds\s+(\d+)", text)
    assert holds and int(holds.group(1)) > 0, text[-4000:]


def test_a_run_that_cannot_reach_the_audits_redis_fails_at_set_up_and_says_why(live_api, tmp_path):
    """Nothing listens at Locust's REDIS_URL: the check's child process fails at once, and its last line (not
    a JSON error body this time) is in the message."""
    base, env, _ = live_api
    event_id = f"smoke-{uuid.uuid4().hex[:10]}"
    proc = locust(
        base, {**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, tmp_path, event_id, seconds=20
    )
    out, _ = proc.communicate(timeout=90)
    text = out.decode(errors="replace").replace("\n", " ")
    assert proc.returncode == 1, text[-4000:]
    # redis-py's ConnectionError, "Error <errno> connecting to 127.0.0.1:<port>" (errno 111 on Linux, 61 on macOS)
    assert re.search(rf"the audit could not read event {event_id} .*Error \d+ connecting", text), text[-4000:]


def test_a_run_stopped_while_its_set_up_waits_exits_1(live_api, tmp_path):
    """The run's -t runs out while the set-up's check still waits on a Redis that never answers (a listening
    socket nobody reads): Locust kills the set-up; nothing was sent or audited, so the run must not exit 0."""
    import socket

    base, env, _ = live_api
    event_id = f"smoke-{uuid.uuid4().hex[:10]}"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        proc = locust(
            base, {**env, "REDIS_URL": f"redis://127.0.0.1:{port}/0"}, tmp_path, event_id, seconds=2
        )
        out, _ = proc.communicate(timeout=90)
    text = out.decode(errors="replace")
    assert proc.returncode == 1, text[-4000:]
    assert "the run stopped while its sale was being set up" in text, text[-4000:]
    assert "auditing:" not in text, text[-4000:]


def _wait_for(predicate, timeout_seconds: float, what: str, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out waiting for {what}\n{log_path.read_text(errors='replace')[-4000:]}"
            )
        time.sleep(0.1)


def test_web_ui_runs_use_the_forms_event_and_a_failed_set_up_reuses_nothing(live_api, tmp_path):
    """Two runs from the web UI in one Locust process: the first uses the event id typed in the form (before,
    the form's id was ignored for a generated one); the second cannot set up its sale (a wrong admin token),
    so it must send no traffic into the first run's sale, not audit it as a PASS, and the process exits 1."""
    import httpx

    base, env, redis_url = live_api
    acks_dir = tmp_path / "acks"
    log_path = tmp_path / "locust.log"
    web_port = free_port()
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "locust",
                "-f",
                str(REPO / "loadtests" / "flash_sale.py"),
                "--web-host",
                "127.0.0.1",
                "--web-port",
                str(web_port),
                "--host",
                base,
                "--acks-dir",
                str(acks_dir),
                "--hold-ttl",
                "2",
                "--audit-drain-timeout",
                "15",
                "--stop-timeout",
                "3",
            ],
            env=env,
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    ui = f"http://127.0.0.1:{web_port}"
    try:

        def ui_up() -> bool:
            try:
                return httpx.get(ui, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for(ui_up, 30, "Locust's web UI", log_path)
        chosen = f"ui-{uuid.uuid4().hex[:10]}"
        form = {
            "user_count": "20",
            "spawn_rate": "20",
            "host": base,
            "event_id": chosen,
            "sale_tickets": "40",
        }
        assert httpx.post(f"{ui}/swarm", data=form, timeout=10).json()["success"]
        r = redis.Redis.from_url(redis_url)
        _wait_for(lambda: r.exists(keys.meta(chosen)), 30, f"event {chosen}", log_path)
        time.sleep(3)
        httpx.post(f"{ui}/stop", timeout=30)
        _wait_for(lambda: f"PASS {chosen}" in log_path.read_text(errors="replace"), 60, "the audit", log_path)
        files = sorted((acks_dir / chosen).glob("*.jsonl"))
        sizes = [f.stat().st_size for f in files]
        assert files and any(sizes)

        form = {"user_count": "20", "spawn_rate": "20", "host": base, "admin_token": "not-the-token"}
        httpx.post(f"{ui}/swarm", data=form, timeout=10)
        _wait_for(
            lambda: "setting up the sale failed" in log_path.read_text(errors="replace"),
            30,
            "the refusal",
            log_path,
        )
        time.sleep(3)
        assert [f.stat().st_size for f in files] == sizes  # nothing written into the first run's sale
        assert log_path.read_text(errors="replace").count(f"PASS {chosen}") == 1  # not audited again
        proc.terminate()
        assert proc.wait(60) == 1, log_path.read_text(errors="replace")[-4000:]
    finally:
        stop_process(proc)


def test_steady_browse_on_an_existing_seated_only_event(live_api, tmp_path):
    """--event-id of an event without general admission: every hold asks for seats (before, about half sent a
    quantity to the seated zone and failed with 422)."""
    import httpx

    base, env, _ = live_api
    event_id = f"seated-{uuid.uuid4().hex[:10]}"
    body = {
        "event_id": event_id,
        "name": "Seated only",
        "starts_at": "2030-05-24T19:00:00Z",
        "zones": [{"zone_id": "sec-1", "kind": "seated", "price_cents": 100, "rows": {"A": 50, "B": 50}}],
    }
    r = httpx.post(
        f"{base}/v1/events", json=body, headers={"Authorization": f"Bearer {env['BOXOFFICE_ADMIN_TOKEN']}"}
    )
    assert r.status_code == 201, r.text
    proc = locust(base, env, tmp_path, event_id, seconds=6, scenario="steady_browse", users=60, options=())
    out, _ = proc.communicate(timeout=120)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    assert "validation_failed" not in text and f"PASS {event_id}" in text.replace("\n", " ")
    assert any(a["kind"] == "confirmed" for a in acks_of(tmp_path, event_id)), text[-2000:]
