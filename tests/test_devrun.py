"""``boxoffice dev`` (what ``make run`` runs) as a user sees it, on embedded servers in a temporary folder.

Embedded servers keep these runs off the shared Redis: a write-through worker pointed at a shared Redis
would consume the outboxes of every other test session's events.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import psutil
import pytest

from loadtests.local import free_port

STARTUP_TIMEOUT_SECONDS = 90.0
EXIT_TIMEOUT_SECONDS = 45.0


def dev_env(data_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOXOFFICE_")}
    for name in ("REDIS_URL", "DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR"):
        env.pop(name, None)
    env.update(
        BOXOFFICE_EMBEDDED="1",
        BOXOFFICE_DATA_DIR=str(data_dir),
        BOXOFFICE_PORT=str(port),
        BOXOFFICE_WEB_WORKERS="2",
        BOXOFFICE_ADMIN_TOKEN="dev-test-token",
    )
    return env


class Dev:
    """One ``boxoffice dev`` process, its output in files (a pipe nobody reads could block the children)."""

    def __init__(self, tmp_path: Path, data_dir: Path, run: str, port: int | None = None):
        self.port = port or free_port()
        self.out = tmp_path / f"{run}.out"
        self.err = tmp_path / f"{run}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "dev"],
                env=dev_env(data_dir, self.port), cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            )  # fmt: skip

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def logs(self) -> str:
        return (
            f"--- stdout\n{self.output()}\n--- stderr (tail)\n{self.err.read_text(errors='replace')[-4000:]}"
        )

    def wait_for_banner(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while "Press Ctrl-C to stop." not in self.output():
            if self.process.poll() is not None:
                pytest.fail(f"boxoffice dev exited with {self.process.returncode}\n{self.logs()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no banner within {STARTUP_TIMEOUT_SECONDS:g} s\n{self.logs()}")
            time.sleep(0.1)
        return self.output()

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def stop(self, sig: int) -> int:
        self.process.send_signal(sig)
        try:
            return self.process.wait(EXIT_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(
                f"boxoffice dev did not exit within {EXIT_TIMEOUT_SECONDS:g} s of {sig!r}\n{self.logs()}"
            )

    def kill(self) -> None:
        procs = [psutil.Process(self.process.pid), *self.descendants()]
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def curl_body(line: str) -> tuple[str, dict]:
    """The URL and JSON body of a printed ``curl -X POST URL ... -d 'JSON'`` line."""
    args = shlex.split(line.strip())
    assert args[0] == "curl", line
    url = next(a for a in args if a.startswith("http://"))
    return url, orjson.loads(args[args.index("-d") + 1])


def port_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return True
    return False


def cmdline(p: psutil.Process) -> str:
    """The process' command line, "" if it is gone (PostgreSQL backends come and go)."""
    try:
        return " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


def using(data_dir: Path) -> list[psutil.Process]:
    """Processes whose command line or working directory is in ``data_dir`` (the embedded servers)."""
    found = []
    for p in psutil.process_iter():
        try:
            if str(data_dir) in cmdline(p) or p.cwd().startswith(str(data_dir)):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def assert_all_gone(procs: list[psutil.Process], dev: Dev, data_dir: Path) -> None:
    _, alive = psutil.wait_procs(procs, timeout=10)
    assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}\n{dev.logs()}"
    assert using(data_dir) == []


@pytest.mark.embedded
def test_dev_serves_a_demo_event_and_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    dev = Dev(tmp_path, data_dir, "first")
    try:
        banner = dev.wait_for_banner()
        found = re.search(r"^Demo event: (\S+) \(created\)", banner, re.M)
        assert found, banner
        event_id = found.group(1)
        base = f"http://127.0.0.1:{dev.port}"
        with httpx.Client(base_url=base, timeout=10) as http:
            assert http.get("/readyz").status_code == 200

            # The printed curl lines work as printed.
            curls = [
                line for line in banner.splitlines() if line.strip().startswith("curl ") and " -d " in line
            ]
            url, body = curl_body(curls[0])
            assert url == f"{base}/v1/events/{event_id}/holds"
            hold = http.post(url, json=body)
            assert hold.status_code == 201, hold.text
            url, body = curl_body(next(c for c in curls if "/confirm" in c))
            confirm = http.post(url.replace("HOLD_ID", hold.json()["hold_id"]), json=body)
            assert confirm.status_code == 201, confirm.text

            # The worker writes the order through to PostgreSQL.
            order_url = f"/v1/events/{event_id}/orders/{confirm.json()['order_id']}"
            deadline = time.monotonic() + 20
            while not http.get(order_url).json().get("persisted"):
                assert time.monotonic() < deadline, f"order not persisted\n{dev.logs()}"
                time.sleep(0.2)

        children = dev.descendants()
        names = " ".join(cmdline(p) for p in children)
        assert "service.cli serve" in names and "service.cli worker" in names
        assert "redis-server" in names and "postgres" in names, names
        embedded = " ".join(cmdline(p) for p in using(data_dir))
        assert "redis-server" in embedded and "postgres" in embedded, embedded
    except BaseException:
        dev.kill()
        raise

    assert dev.stop(signal.SIGINT) == 0, dev.logs()
    assert "stopping" in dev.output()
    assert_all_gone(children, dev, data_dir)
    assert port_closed(dev.port)


@pytest.mark.embedded
def test_dev_reuses_the_demo_event_and_stops_on_sigterm(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = Dev(tmp_path, data_dir, "first")
    try:
        created = re.search(r"^Demo event: (\S+) \(created\)", first.wait_for_banner(), re.M)
        assert created, first.output()
        children = first.descendants()
    except BaseException:
        first.kill()
        raise
    assert first.stop(signal.SIGTERM) == 0, first.logs()
    assert_all_gone(children, first, data_dir)

    second = Dev(tmp_path, data_dir, "second")  # same data: the embedded servers kept the event
    try:
        reused = re.search(r"^Demo event: (\S+) \(reused\)", second.wait_for_banner(), re.M)
        assert reused, second.output()
        assert reused.group(1) == created.group(1)
        children = second.descendants()
    except BaseException:
        second.kill()
        raise
    assert second.stop(signal.SIGTERM) == 0, second.logs()
    assert_all_gone(children, second, data_dir)


@pytest.mark.embedded
def test_dev_says_so_when_the_port_is_taken_and_leaves_nothing_running(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        dev = Dev(tmp_path, data_dir, "taken", port=taken.getsockname()[1])
        try:
            code = dev.process.wait(STARTUP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            dev.kill()
            raise
    assert code == 1, dev.logs()
    assert "already in use" in dev.output()
    assert using(data_dir) == [], "the embedded servers it started are still running"
