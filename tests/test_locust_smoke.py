"""A short headless Locust flash sale against a live ``boxoffice serve`` (and ``boxoffice worker``), audited.

The API and the worker run as child processes on a private redis-server (so no other test's worker can
consume this sale's outbox) and the session's PostgreSQL database. Locust runs as a child process too
(it monkey-patches the standard library with gevent on import).
"""

from __future__ import annotations

import os
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


def locust(base: str, env: dict, acks_dir: Path, event_id: str, seconds: int | None) -> subprocess.Popen:
    """A headless flash sale of 40 users; ``seconds=None``: no -t, it runs until stopped."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(REPO / "loadtests" / "flash_sale.py"),
            "--headless",
            "-u",
            "40",
            "-r",
            "40",
            *(["-t", f"{seconds}s"] if seconds else []),
            "--host",
            base,
            "--event-id",
            event_id,
            "--sale-tickets",
            "40",
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
