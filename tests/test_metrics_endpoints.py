"""Where metrics are served: ``BOXOFFICE_METRICS_DIR`` reaches prometheus_client in ``serve`` and ``worker``, and a
worker with ``BOXOFFICE_WORKER_METRICS_PORT`` serves its own (the outbox, the write-through, drift).

Both run as child processes on a throw-away redis-server (so the worker writes no other test's outbox through)
and the session's PostgreSQL database.
"""

from __future__ import annotations

import os
import time

import httpx
import pytest

from loadtests.bench import boxoffice, free_port, stop_process, throwaway_redis, wait_ready

pytestmark = pytest.mark.slow


def _env(settings, redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    return {
        **env,
        "REDIS_URL": redis_url,
        "DATABASE_URL": settings.database_url,
        "BOXOFFICE_LOG_LEVEL": "WARNING",
        **extra,
    }


def _get(url: str, proc, timeout_seconds: float = 30.0) -> httpx.Response:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}"
        try:
            return httpx.get(url, timeout=1)
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout_seconds:g} s")


def test_serve_uses_boxoffice_metrics_dir(settings, tmp_path):
    metrics_dir = tmp_path / "metrics"  # not there yet: serve creates it
    with throwaway_redis() as redis_url:
        port = free_port()
        env = _env(settings, redis_url, BOXOFFICE_METRICS_DIR=str(metrics_dir))
        api = boxoffice("serve", "--workers", "1", "--port", str(port), "--no-migrate", env=env)
        try:
            wait_ready(f"http://127.0.0.1:{port}", api)
            assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
            assert list(metrics_dir.glob("*.db")), "no multi-process files in BOXOFFICE_METRICS_DIR"
        finally:
            stop_process(api)


def test_worker_serves_its_own_metrics_on_worker_metrics_port(settings, tmp_path):
    with throwaway_redis() as redis_url:
        port = free_port()
        env = _env(settings, redis_url, BOXOFFICE_WORKER_METRICS_PORT=str(port))
        worker = boxoffice("worker", env=env, log_path=tmp_path / "worker.log")
        try:
            r = _get(f"http://127.0.0.1:{port}/metrics", worker)
            assert r.status_code == 200
            assert "# HELP boxoffice_orders_persisted_total" in r.text, r.text[:2000]
            assert "# HELP boxoffice_reconcile_drift" in r.text, r.text[:2000]
        finally:
            stop_process(worker)
