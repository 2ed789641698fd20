"""``boxoffice serve``: every worker watches its listening socket through BOXOFFICE_ACCEPT_DESCRIPTORS
descriptors (see service/serving.py for why), with several workers each has a socket of its own in one
SO_REUSEPORT group (BOXOFFICE_REUSE_PORT), an unknown uvicorn supervisor falls back to uvicorn.run, and
responses coalesced per event-loop iteration (service/coalesce.py) still arrive whole and in order.

How fast a storm of new connections is accepted is measured in loadtests/RESULTS.md, not asserted here.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from loadtests.bench import REPO, boxoffice, free_port, process_tree, stop_process, wait_ready
from service import serving

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc (Linux)")


def _sockets_on(port: int, state: str) -> list[str]:
    """Inodes of the TCP sockets in ``state`` whose local port is ``port`` (/proc/net/tcp and tcp6; state 0A
    is LISTEN, 01 ESTABLISHED)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:] if Path(table).exists() else []:
            f = line.split()
            if f[1].endswith(f":{port:04X}") and f[3] == state:
                found.append(f[9])
    return found


def listening_inode(port: int) -> str:
    """The inode of the one socket listening on ``port``."""
    found = _sockets_on(port, "0A")
    assert len(found) == 1, f"{len(found)} sockets listen on port {port}"
    return found[0]


def descriptors_by_process(root: int, inode: str) -> dict[int, int]:
    """pid -> how many of its descriptors are the socket ``inode``, for ``root`` and its descendants."""
    out = {}
    for pid in process_tree(root):
        try:
            n = sum(1 for fd in os.listdir(f"/proc/{pid}/fd") if _link(pid, fd) == f"socket:[{inode}]")
        except FileNotFoundError:  # exited meanwhile
            continue
        if n:
            out[pid] = n
    return out


def _link(pid: int, fd: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return ""


def _env(settings, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "BOXOFFICE_LOG_LEVEL": "WARNING",
        "BOXOFFICE_HOST": "127.0.0.1",  # the tests connect there
        **extra,
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def _new_connections_answer(base: str, n: int = 20) -> None:
    for _ in range(n):  # a client per request: every request comes on a connection accepted anew
        with httpx.Client() as c:
            assert c.get(f"{base}/healthz", headers={"Connection": "close"}).status_code == 200


def _serve(
    settings,
    tmp_path: Path,
    workers: int,
    *,
    port: int | None = None,
    log_name: str = "serve.log",
    **env: str,
) -> tuple[subprocess.Popen, int]:
    """``boxoffice serve --workers N`` on ``port`` (a free one by default), in its own process group, logging
    to ``tmp_path / log_name``: (process, port)."""
    port = port or free_port()
    api = boxoffice(
        "serve",
        "--workers",
        str(workers),
        "--port",
        str(port),
        "--no-migrate",
        env=_env(settings, **env),
        log_path=tmp_path / log_name,
    )
    return api, port


@pytest.mark.parametrize("workers", [1, 2])
def test_each_worker_watches_the_listening_socket_through_its_accept_descriptors(settings, tmp_path, workers):
    """With BOXOFFICE_REUSE_PORT off, several workers share one socket, bound by the supervisor."""
    api, port = _serve(
        settings, tmp_path, workers, BOXOFFICE_ACCEPT_DESCRIPTORS="5", BOXOFFICE_REUSE_PORT="false"
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, api)
        held = descriptors_by_process(api.pid, listening_inode(port))
        # one socket, five descriptors in each worker (and in the supervisor that bound it, with 2 workers)
        assert sorted(held.values()) == [5] * (workers + (workers > 1)), held
        _new_connections_answer(base)
    finally:
        stop_process(api)
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def _workers_sockets(api: subprocess.Popen, port: int, expected: int = 2) -> dict[str, dict[int, int]]:
    """listening inode -> {pid: descriptors}, once ``expected`` sockets listen on ``port`` (30 s at most)."""
    deadline = time.monotonic() + 30
    while len(inodes := _sockets_on(port, "0A")) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return {inode: descriptors_by_process(api.pid, inode) for inode in inodes}


def test_with_reuse_port_each_worker_listens_on_a_socket_of_its_own(settings, tmp_path):
    """The default with 2 workers: two listening sockets, each watched through its five descriptors by one
    worker and by no other process, the supervisor included (it only holds the port, without listening)."""
    api, port = _serve(settings, tmp_path, 2, BOXOFFICE_ACCEPT_DESCRIPTORS="5")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, api)
        by_socket = _workers_sockets(api, port)
        assert len(by_socket) == 2, by_socket
        assert [list(held.values()) for held in by_socket.values()] == [[5], [5]], by_socket
        owners = {pid for held in by_socket.values() for pid in held}
        assert len(owners) == 2 and api.pid not in owners, by_socket
        _new_connections_answer(base)
    finally:
        stop_process(api)
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def _established_by_worker(api: subprocess.Popen, port: int) -> dict[int, int]:
    """pid -> how many established connections to ``port`` that process holds (server side)."""
    established = set(_sockets_on(port, "01"))
    out = {}
    for pid in process_tree(api.pid):
        try:
            links = [_link(pid, fd) for fd in os.listdir(f"/proc/{pid}/fd")]
        except FileNotFoundError:
            continue
        n = sum(1 for link in links if link.startswith("socket:[") and link[8:-1] in established)
        if n:
            out[pid] = n
    return out


def _open_connections(port: int, n: int) -> list[socket.socket]:
    """``n`` client connections opened at once, each then asked ``GET /healthz`` (keep-alive) and answered:
    every one has been accepted by a worker when this returns."""
    conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
    for c in conns:
        c.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    for c in conns:
        assert c.recv(65536).startswith(b"HTTP/1.1 200 ")
    return conns


def test_with_reuse_port_new_connections_spread_over_both_workers(settings, tmp_path):
    """100 connections opened at once: each worker holds at least 25 (the kernel picks a socket by a hash of
    the connection's addresses; fewer than 25 of 100 on either has a chance of about 2 in 10 million). With one
    shared socket, one worker took 61-93 of wrk's 100 connections in 10 runs of 20 (loadtests/RESULTS.md); this
    client's connections can split evenly there too, so the test above is the one that tells the two apart."""
    api, port = _serve(settings, tmp_path, 2)
    conns: list[socket.socket] = []
    try:
        wait_ready(f"http://127.0.0.1:{port}", api)
        _workers_sockets(api, port)
        conns = _open_connections(port, 100)
        spread = _established_by_worker(api, port)
        assert sum(spread.values()) == 100 and len(spread) == 2, spread
        assert min(spread.values()) >= 25, spread
    finally:
        for c in conns:
            c.close()
        stop_process(api)


def test_with_reuse_port_a_worker_that_dies_is_replaced_and_its_connections_go_to_the_other(
    settings, tmp_path
):
    """SIGKILL one worker: its socket goes with it, so every new connection meanwhile is answered by the
    other; uvicorn's supervisor starts a replacement, which binds a socket of its own and takes connections."""
    api, port = _serve(settings, tmp_path, 2, BOXOFFICE_ACCEPT_DESCRIPTORS="3")
    conns: list[socket.socket] = []
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, api)
        before = _workers_sockets(api, port)
        (victim,) = before[next(iter(before))]
        os.kill(victim, signal.SIGKILL)
        _workers_sockets(api, port, expected=1)  # gone with the process (connections in its queue were reset)
        _new_connections_answer(base, 50)
        after = _workers_sockets(api, port)
        owners = {pid for held in after.values() for pid in held}
        assert len(after) == 2 and len(owners) == 2 and victim not in owners, (before, after)
        assert sorted(n for held in after.values() for n in held.values()) == [3, 3], after
        wait_ready(base, api)
        conns = _open_connections(port, 100)
        spread = _established_by_worker(api, port)
        assert len(spread) == 2 and min(spread.values()) >= 25, spread
    finally:
        for c in conns:
            c.close()
        stop_process(api)


def test_the_supervisor_holds_the_port_while_no_worker_listens(settings, tmp_path):
    """The supervisor stopped (SIGSTOP) so that it restarts nobody, both workers killed: no socket listens on
    the port, yet another program's socket with SO_REUSEADDR (as most servers set) cannot bind it. Then the
    supervisor goes on, and its replacements listen again."""
    api, port = _serve(settings, tmp_path, 2, BOXOFFICE_ACCEPT_DESCRIPTORS="2")
    stopped = False
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, api)
        workers = {pid for held in _workers_sockets(api, port).values() for pid in held}
        os.kill(api.pid, signal.SIGSTOP)
        stopped = True
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        assert _workers_sockets(api, port, expected=0) == {}
        intruder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            with pytest.raises(OSError) as refused:
                intruder.bind(("127.0.0.1", port))
                intruder.listen(8)
        finally:
            intruder.close()
        assert refused.value.errno == errno.EADDRINUSE
        os.kill(api.pid, signal.SIGCONT)
        stopped = False
        assert len(_workers_sockets(api, port)) == 2
        wait_ready(base, api)
        _new_connections_answer(base, 5)
    finally:
        if stopped:
            os.kill(api.pid, signal.SIGCONT)
        stop_process(api)


def test_serve_says_at_start_up_what_a_retiring_worker_does_to_queued_connections(settings, tmp_path):
    """The line goes where uvicorn's own go (the supervisor sets up no logging of boxoffice's)."""
    migrate_req = serving.read_sysctl("net/ipv4/tcp_migrate_req")
    if migrate_req not in ("0", "1"):
        pytest.skip("no net.ipv4.tcp_migrate_req here (Linux < 5.14)")
    api, port = _serve(settings, tmp_path, 2, BOXOFFICE_LOG_LEVEL="INFO")
    try:
        wait_ready(f"http://127.0.0.1:{port}", api)
    finally:
        stop_process(api)
    said = (
        "sysctl net.ipv4.tcp_migrate_req=1 hands them to another worker"
        in (tmp_path / "serve.log").read_text()
    )
    assert said == (migrate_req == "0")


def test_serve_starts_on_a_port_where_an_earlier_plain_server_left_time_wait(settings, tmp_path):
    """Server-side TIME_WAIT of a socket without SO_REUSEPORT blocks the holder's strict bind: serve binds it
    with SO_REUSEADDR after all, says so, and serves, each worker on its own socket."""
    port = free_port()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(8)
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn, _ = listener.accept()
    conn.close()  # the server's side closes first, so its end (local port ``port``) waits in TIME_WAIT
    assert client.recv(1) == b""
    client.close()
    listener.close()
    assert _sockets_on(port, "06"), "no TIME_WAIT left on the port"  # 06 = TIME_WAIT
    api, _ = _serve(settings, tmp_path, 2, port=port)
    try:
        wait_ready(f"http://127.0.0.1:{port}", api)
        assert len(_workers_sockets(api, port)) == 2
    finally:
        stop_process(api)
    assert "is still in use (TIME_WAIT" in (tmp_path / "serve.log").read_text()


def test_a_second_serve_on_a_taken_port_fails_instead_of_joining_the_group(settings, tmp_path):
    """The workers' SO_REUSEPORT group admits no other server: a second ``boxoffice serve`` on the same port
    exits with uvicorn's start-up failure (3), and the first keeps every connection."""
    api, port = _serve(settings, tmp_path, 2)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, api)
        second_log = tmp_path / "second.log"
        second, _ = _serve(settings, tmp_path, 2, port=port, log_name=second_log.name)
        try:
            assert second.wait(timeout=60) == 3, second_log.read_text()[-2000:]
        finally:
            stop_process(second)
        assert "address already in use" in second_log.read_text().lower()
        assert len(_sockets_on(port, "0A")) == 2
        _new_connections_answer(base)
    finally:
        stop_process(api)


def test_a_uvicorn_whose_supervisor_takes_other_arguments_serves_through_uvicorn_run(settings, tmp_path):
    """uvicorn's Multiprocess is not a public API: if its arguments change, serve still serves (one descriptor
    a worker, as plain uvicorn.run does) and says so."""
    script = (
        "import sys, uvicorn.supervisors\n"
        "class Supervisor:  # an older uvicorn's signature\n"
        "    def __init__(self, config, target, sockets):\n"
        "        raise AssertionError('never built')\n"
        "uvicorn.supervisors.Multiprocess = Supervisor\n"
        "from service.cli import app\n"
        "sys.argv = ['boxoffice', *sys.argv[1:]]\n"
        "app()\n"
    )
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        api = subprocess.Popen(
            [sys.executable, "-c", script, "serve", "--workers", "2", "--port", str(port), "--no-migrate"],
            env=_env(settings),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, api)
        held = descriptors_by_process(api.pid, listening_inode(port))
        assert sorted(held.values()) == [1, 1, 1], held
        _new_connections_answer(base, 5)
    finally:
        stop_process(api)
    assert "one accept descriptor a worker" in log_path.read_text()


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_exits_3_when_a_worker_fails_to_start(settings, tmp_path, workers):
    """A worker whose start-up fails (PostgreSQL unreachable) stops serve with uvicorn's start-up failure code,
    with several workers too (uvicorn's own supervisor then returns as if stopped cleanly)."""
    dead = settings.model_copy(update={"database_url": "postgresql://postgres@127.0.0.1:1/postgres"})
    api, _ = _serve(dead, tmp_path, workers)
    try:
        assert api.wait(timeout=60) == 3, (tmp_path / "serve.log").read_text()[-2000:]
    finally:
        stop_process(api)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_stopped_serve_exits_0_and_removes_its_metrics_folder(settings, tmp_path, workers, how):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) or SIGTERM to serve alone (as `docker stop`
    or a process manager sends it): exit 0 once uvicorn has shut down, as uvicorn.run does for a Ctrl-C, and
    the metrics folder serve made for itself (no PROMETHEUS_MULTIPROC_DIR given) is gone. With one worker,
    uvicorn raised the SIGTERM again after its shutdown, and serve died of it: exit 143, folder left."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    api, port = _serve(settings, tmp_path, workers, TMPDIR=str(tmp))
    try:
        wait_ready(f"http://127.0.0.1:{port}", api)
        assert len(list(tmp.glob("boxoffice-metrics-*"))) == 1
        if how == "ctrl-c":
            os.killpg(api.pid, signal.SIGINT)
        else:
            api.send_signal(signal.SIGTERM)
        assert api.wait(timeout=30) == 0, (tmp_path / "serve.log").read_text()[-2000:]
        assert list(tmp.glob("boxoffice-metrics-*")) == []
    finally:
        stop_process(api)


def _read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("coalesce", ["true", "false"])
def test_serve_answers_pipelined_and_half_closed_clients_whole(settings, tmp_path, coalesce):
    """Through ``boxoffice serve``: three requests in one packet on one connection, the last with
    ``Connection: close``. Every response arrives, in order, complete, and then the connection closes. Then
    clients that shut their side after the request (EOF) each get their whole answer."""
    api, port = _serve(settings, tmp_path, 1, BOXOFFICE_COALESCE_WRITES=coalesce)
    try:
        wait_ready(f"http://127.0.0.1:{port}", api)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Request-Id: first\r\n\r\n"
                b"GET /no-such-route HTTP/1.1\r\nHost: t\r\nX-Request-Id: second\r\n\r\n"
                b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Request-Id: third\r\nConnection: close\r\n\r\n"
            )
            data = _read_until_closed(sock)
        half_closed = []
        for i in range(30):  # a client that sends its request, then shuts its side (EOF)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Request-Id: half-{i}\r\n\r\n".encode())
                sock.shutdown(socket.SHUT_WR)
                half_closed.append(_read_until_closed(sock))
    finally:
        stop_process(api)
    assert all(r.startswith(b"HTTP/1.1 200 ") and r.endswith(b'{"status":"ok"}') for r in half_closed), [
        r[:40] for r in half_closed
    ]
    responses = data.split(b"HTTP/1.1 ")[1:]
    assert [r[:3] for r in responses] == [b"200", b"404", b"200"], data
    for response, rid in zip(responses, (b"first", b"second", b"third"), strict=True):
        assert b"x-request-id: " + rid in response
    assert responses[0].endswith(b'{"status":"ok"}') and responses[2].endswith(b'{"status":"ok"}')
    assert b'"code":"not_found"' in responses[1]
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
