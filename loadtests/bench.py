"""The bounded loopback benchmark: ``boxoffice bench`` (``make bench``). Prints a report; see RESULTS.md.

Everything runs on this machine, over loopback, each load run bounded by ``duration_seconds``:

* a private PostgreSQL database ``boxoffice_bench_<pid>`` on the configured server (migrated, dropped at the
  end), and a new private ``redis-server`` (free port, no persistence) for each part of each run: the raw
  script ceiling, and each auto-pipelining mode at each concurrency. A part leaves hundreds of thousands of
  keys behind (hold records outlive their holds by a day), and on one Redis for the whole bench the later runs
  crossed 2^20 and 2^21 keys, where Redis rehashes its keyspace a step per command: for some seconds each
  hold script call took up to 1.8 times as long, and a 200,000-hold run crossing 2^21 cost Redis 36-47 % more
  CPU per hold (RESULTS.md). With one Redis per mode, a mode's 1,000-client runs still came after the keys of
  its 100-client runs, and could cross 2^18 or 2^19. So every part starts on an empty keyspace, and no run
  inherits the keys of another (each API part logs how many keys its Redis holds before the audit);
* for each ``BOXOFFICE_AUTO_PIPELINE`` mode (``true`` / ``false``) and each concurrency (``DEFAULT_CLIENTS``:
  100 and 1,000 connections), a part of its own: ``boxoffice serve --workers 2`` and ``boxoffice worker`` as
  child processes on a free port, and ``wrk`` (2 threads, Lua scripts written here) as the load generator:
  ``GET /healthz`` (the no-work HTTP ceiling), ``POST holds`` (one GA ticket of a 10,000,000-ticket
  zone, so nothing sells out: every hold measured is a ``201``; the requests are built before the run,
  for 10,000 customers per wrk thread taken in turn, as ``/healthz``'s one request is, so the load
  generator spends no more on a hold than on ``/healthz``),
  ``POST confirm`` (of holds made beforehand through ``Inventory``; confirms/s counts ``201`` only; the
  next run waits until the worker has written those orders through),
  ``GET availability`` and ``GET seats`` (a page of 100 of a 2,000-seat zone);
* the raw hold script ceiling: ``redis-benchmark`` sending ``EVALSHA hold`` (one hold per call) straight to a
  Redis of its own (50 connections, without and with pipelining of 16), while no API runs;
* write-through lag p50/p99 of the confirmed orders, from the confirm (``orders.confirmed_at``: the confirm
  script's time, in Redis) to the order row's insert in the write-through transaction (``orders.persisted_at``:
  the column's ``clock_timestamp()`` default, read at the insert, before the commit; the commit is not timed);
* the audit (``loadtests.audit.audit_event``) of every event the bench sold, with wrk's 201 bodies as acks.

Every event is new (``bench-...``), so one run never reaps another's holds. The holds of a holds run (TTL: the
run's duration + 1 s) expire and are reaped after it, outside the timing: the bench waits until the last of them
has expired (the highest score of the event's expiry set, on Redis's clock), reaps them and checks that none is
left before the next load run starts. The worker runs no reconciliation cron job
(``BOXOFFICE_RECONCILE_INTERVAL_SECONDS=0``), which would land inside a load run. CPU time per request of each
process group (API, Redis, worker, PostgreSQL backends, wrk) is read from /proc around each run. Tools are named
in the output next to each figure; the report starts with the machine (CPU, versions) and a Python speed gauge.
``wrk`` and ``redis-benchmark`` are required (Debian: ``apt-get install -y wrk redis-tools``).

Loopback only: ``DATABASE_URL`` must name a server on this machine (the bench refuses another); the API and
the worker inherit the caller's environment but bind 127.0.0.1 and lose the settings that could take them
elsewhere (``CHILD_SETTINGS``, ``DROPPED_SETTINGS``); the report lists the other ``BOXOFFICE_*`` settings
they inherited that differ from the defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import redis

from loadtests.local import free_port, stop_process, throwaway_database, throwaway_redis
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
WRK_THREADS = 2
HOLD_POOL = 10_000
"""Hold requests wrk builds per thread before a holds run, one customer each, taken in turn."""
GA_CAPACITY = 10_000_000
SEATS = 2000
ROUTES = ("healthz", "holds", "confirm", "availability", "seats")
DEFAULT_CLIENTS = (100, 1000)
"""Concurrencies of every route: the latency targets' 100 and 1,000 clients; the saturation figures are each
route's best of them. A third point, 200, was tried and dropped: on one VM it beat 100 for holds in 4 runs of 4,
then in 1 of 3 (bench AE, loadtests/RESULTS.md), for 42 % more bench time."""

# The children's environment: the bench is loopback-only ---------------------------------------------------

CHILD_SETTINGS = {
    "BOXOFFICE_HOST": "127.0.0.1",  # the API (and a worker's /metrics, were it on) bind loopback only
    "BOXOFFICE_LOG_LEVEL": "WARNING",
    # no reconciliation cron job: a pass reads every hold record of every event, and would land inside a load
    # run (hourly was not off: a bench running at minute 0 had one, in a load run at 22:00 UTC, 2026-12-04)
    "BOXOFFICE_RECONCILE_INTERVAL_SECONDS": "0",
}
"""Set for ``boxoffice serve`` and ``boxoffice worker`` whatever the caller's environment says; ``measure_mode``
adds the servers' URLs, the admin token, ``BOXOFFICE_AUTO_PIPELINE`` and ``PROMETHEUS_MULTIPROC_DIR``."""
DROPPED_SETTINGS = (
    "BOXOFFICE_QUEUE_REDIS_URL",  # arq's queue on another Redis: off loopback, and not the bench's
    "BOXOFFICE_WORKER_METRICS_PORT",  # a listening port the bench does not need
    "BOXOFFICE_REDIS_URL",  # aliases of REDIS_URL, DATABASE_URL, PROMETHEUS_MULTIPROC_DIR, which the bench sets
    "BOXOFFICE_DATABASE_URL",
    "BOXOFFICE_METRICS_DIR",
)
"""Not passed on to the children (the settings fall back to their defaults)."""
_SET_PER_MODE = (
    "REDIS_URL",
    "DATABASE_URL",
    "PROMETHEUS_MULTIPROC_DIR",
    "BOXOFFICE_ADMIN_TOKEN",
    "BOXOFFICE_AUTO_PIPELINE",
)
"""The names ``measure_mode`` sets per part, one mode at one concurrency (over the caller's)."""


def child_env(environ: dict[str, str], overrides: dict[str, str]) -> dict[str, str]:
    """The caller's environment without ``DROPPED_SETTINGS``, with ``CHILD_SETTINGS`` and ``overrides`` set.
    Settings names are case-insensitive (pydantic-settings), so every spelling of those names is dropped."""
    replaced = {k.upper() for k in (*DROPPED_SETTINGS, *CHILD_SETTINGS, *overrides)}
    return {
        **{k: v for k, v in environ.items() if k.upper() not in replaced},
        **CHILD_SETTINGS,
        **overrides,
    }


def inherited_settings(environ: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """The ``BOXOFFICE_*`` settings the children inherit from the caller and that differ from the defaults
    (they change what is measured: say them in the report), and the dropped ones that were set."""
    from pydantic import TypeAdapter

    set_here = {k.upper() for k in (*CHILD_SETTINGS, *_SET_PER_MODE)}
    inherited, dropped = {}, []
    for key, value in sorted(environ.items()):
        name = key.upper()
        if not name.startswith("BOXOFFICE_") or name in set_here:
            continue
        if name in DROPPED_SETTINGS:
            dropped.append(key)
            continue
        f = Settings.model_fields.get(name.removeprefix("BOXOFFICE_").lower())
        try:
            if f is not None and TypeAdapter(f.annotation).validate_python(value) == f.default:
                continue
        except ValueError:  # not even valid: certainly not the default
            pass
        inherited[key] = value
    return inherited, dropped


def loopback_database_problem(database_url: str, environ: dict[str, str] | None = None) -> str | None:
    """Why ``database_url`` is not a PostgreSQL server on this machine (None when it is: a loopback address,
    ``localhost`` or a Unix socket). libpq takes a host left out of the URL from PGHOST / PGHOSTADDR."""
    import ipaddress

    from psycopg.conninfo import conninfo_to_dict

    environ = os.environ if environ is None else environ
    try:
        params = conninfo_to_dict(database_url)
    except Exception as exc:  # psycopg.ProgrammingError, for one
        return f"DATABASE_URL cannot be parsed: {exc}"
    problems = []
    for name, env in (("host", "PGHOST"), ("hostaddr", "PGHOSTADDR")):
        value = str(params.get(name) or environ.get(env) or "")
        for h in filter(None, (x.strip() for x in value.split(","))):
            if h.startswith(("/", "@")) or (name == "host" and h.lower() == "localhost"):
                continue  # a Unix socket (or its abstract namespace), or localhost
            try:
                if ipaddress.ip_address(h.strip("[]")).is_loopback:
                    continue
            except ValueError:
                pass
            problems.append(f"{name} {h}")
    if problems:
        return (
            f"boxoffice bench is loopback-only, and DATABASE_URL names {', '.join(problems)}: give a PostgreSQL "
            "server on this machine (127.0.0.1, ::1, localhost or a Unix socket)"
        )
    return None


def boxoffice(*args: str, env: dict[str, str], log_path: Path | None = None) -> subprocess.Popen:
    """Start ``boxoffice ARGS`` (``python -m service.cli``) in its own process group, output to ``log_path``."""
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(log_path.open("ab")) if log_path else subprocess.DEVNULL
        return subprocess.Popen(  # the child has its own copy of the log's descriptor; ours is closed here
            [sys.executable, "-m", "service.cli", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=REPO,
        )


def stop_all(procs: list[subprocess.Popen], stop: Any = stop_process) -> None:
    """Stop each process in turn (``stop_process``). One whose stopping fails or is interrupted does not leave
    the next ones running: the first error is raised once all were tried."""
    first: BaseException | None = None
    for proc in procs:
        try:
            stop(proc)
        except BaseException as exc:
            first = first or exc
    if first is not None:
        raise first


def wait_ready(base_url: str, proc: subprocess.Popen, timeout_seconds: float = 30.0) -> None:
    """Poll ``GET /readyz`` until 200. Raises RuntimeError if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API exited with {proc.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            # trust_env=False: no HTTP(S)_PROXY from the caller sends the bench's requests off loopback
            if httpx.get(f"{base_url}/readyz", timeout=1, trust_env=False).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{base_url} not ready after {timeout_seconds:g} s")


# wrk ---------------------------------------------------------------------------------------------------

WRK_SCRIPT = r"""
-- Written by loadtests/bench.py. args: route, path, then for holds: ttl_seconds, run tag;
-- for confirm: file of hold ids (one a line), directory for the 201 bodies (acks).
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  tid = wrk.thread:get("tid")
  route, path = args[1], args[2]
  n, s200, s201, s409, sother = 0, 0, 0, 0, 0
  headers = {["Content-Type"] = "application/json"}
  if route == "holds" then
    -- Built here, not per request: building each body in Lua cost wrk ~10 us more per hold than /healthz.
    -- Each customer comes round every HOLD_POOL requests, far below its 1,000-ticket limit in one run.
    holds = {}
    for i = 1, HOLD_POOL do
      local body = '{"customer_id":"w' .. args[4] .. '-' .. tid .. '-' .. i ..
        '","items":[{"zone_id":"ga","quantity":1}],"ttl_seconds":' .. args[3] .. '}'
      holds[i] = wrk.format("POST", path, headers, body)
    end
  elseif route == "confirm" then
    ids = {}
    local i = 0
    for line in io.lines(args[3]) do
      if i % NTHREADS == tid - 1 then ids[#ids + 1] = line end
      i = i + 1
    end
    -- Fully buffered: a write system call per 64 KiB, not per ack (line buffering cost wrk ~10 us more per
    -- confirm). C's exit() flushes it when wrk ends; the bench checks that every 201 left its line.
    acks = io.open(args[4] .. "/wrk-" .. tid .. ".jsonl", "a")
    acks:setvbuf("full", 65536)
  else
    fixed = wrk.format("GET", path)
  end
end

function request()
  n = n + 1
  if route == "holds" then
    return holds[((n - 1) % HOLD_POOL) + 1]
  elseif route == "confirm" then
    return wrk.format("POST", path .. ids[((n - 1) % #ids) + 1] .. "/confirm", headers, '{"payment_ref":"bench"}')
  end
  return fixed
end

function response(status, hdrs, body)
  if status == 201 then
    s201 = s201 + 1
    if acks then acks:write(body, "\n") end
  elseif status == 200 then s200 = s200 + 1
  elseif status == 409 then s409 = s409 + 1
  else sother = sother + 1 end
end

function done(summary, latency, requests)
  local t = {s200 = 0, s201 = 0, s409 = 0, sother = 0}
  for _, th in ipairs(threads) do
    for k, _ in pairs(t) do t[k] = t[k] + th:get(k) end
  end
  local e = summary.errors
  io.write(string.format('BENCH_JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p95_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"s200":%d,"s201":%d,"s409":%d,"sother":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d}\n',
    summary.requests, summary.duration, math.floor(latency:percentile(50)), math.floor(latency:percentile(95)),
    math.floor(latency:percentile(99)), latency.max, t.s200, t.s201, t.s409, t.sother,
    e.connect, e.read, e.write, e.timeout))
end
""".replace("NTHREADS", str(WRK_THREADS)).replace("HOLD_POOL", str(HOLD_POOL))


@dataclass
class Measure:
    """One load run of one route at one concurrency. Latencies in milliseconds."""

    tool: str
    route: str
    auto_pipeline: bool | None
    clients: int
    requests: int | float
    """Responses in the run; over runs, like ``statuses``, the median (x.5 between two runs). ``errors`` (socket
    errors and timeouts) over runs are the total of all runs."""
    seconds: float
    rps: float
    """All responses per second."""
    ok_rps: float
    """Responses with the route's success status per second (201 for holds and confirms, 200 for reads)."""
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[str, int | float] = field(default_factory=dict)
    errors: dict[str, int | float] = field(default_factory=dict)
    cpu_us_per_request: dict[str, float] = field(default_factory=dict)
    """CPU time (user + system) per request by process group: api, redis, worker, postgres, wrk."""
    cpu_us_total: float | None = None
    """CPU time per request of all the groups: in one run, their sum (the default); over runs, the median of
    each run's sum (not the sum of the per-group medians)."""
    idle_pct: float | None = None
    """Share of the machine's CPU time left idle during the run, percent (``/proc/stat``; over runs, the
    median). Where it is above 0, the run was not CPU-bound: its rate is below its CPU-bound ceiling."""

    def __post_init__(self) -> None:
        if self.cpu_us_total is None:
            self.cpu_us_total = sum(self.cpu_us_per_request.values())


# CPU accounting from /proc (Linux) ----------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds user + system) of a process, None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_times() -> tuple[int, int] | None:
    """(idle, total) CPU time of the whole machine so far, in clock ticks: the ``cpu`` line of ``/proc/stat``
    (idle counts idle and iowait; https://docs.kernel.org/filesystems/proc.html). None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields[:8])  # user nice system idle iowait irq softirq steal


def idle_pct(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Percent of the machine's CPU time spent idle between two ``machine_times`` readings."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return 100.0 * (after[0] - before[0]) / (after[1] - before[1])


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (scan of /proc)."""
    parents = {pid: st[0] for pid in _all_pids() if (st := _stat(pid))}
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        tree.extend(frontier)
    return tree


def postgres_backends(database: str) -> list[int]:
    """PostgreSQL backend processes serving ``database`` (their command line names it)."""
    out = []
    for pid in _all_pids():
        try:
            if database.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            pass
    return out


def wrk(
    url: str,
    script: Path,
    clients: int,
    seconds: float,
    args: list[str],
    *,
    route: str,
    auto_pipeline: bool | None,
    groups: dict[str, Any] | None = None,
) -> Measure:
    """Run wrk (``WRK_THREADS`` threads) for ``seconds``; parse the line the script's ``done`` prints.

    ``groups`` maps a name to a callable returning pids; their CPU time during the run (and wrk's own) is
    reported per request.
    """
    cmd = [
        "wrk",
        f"-t{WRK_THREADS}",
        f"-c{clients}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
        "--",
        route,
        *args,
    ]
    groups = groups or {}
    before = {name: {pid: st[1] for pid in fn() if (st := _stat(pid))} for name, fn in groups.items()}
    t0, machine0 = os.times(), machine_times()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    t1, machine1 = os.times(), machine_times()
    used = {}
    for name, fn in groups.items():  # a process started during the run counts from zero
        after = {pid: st[1] for pid in fn() if (st := _stat(pid))}
        used[name] = sum(cpu - before[name].get(pid, 0.0) for pid, cpu in after.items())
    used["wrk"] = (t1.children_user - t0.children_user) + (t1.children_system - t0.children_system)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(
            f"wrk printed no result (exit {out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}"
        )
    d = json.loads(line.removeprefix("BENCH_JSON "))
    secs = d["duration_us"] / 1e6
    ok = d["s201"] if route in ("holds", "confirm") else d["s200"]
    return Measure(
        tool="wrk",
        route=route,
        auto_pipeline=auto_pipeline,
        clients=clients,
        requests=d["requests"],
        seconds=secs,
        rps=d["requests"] / secs,
        ok_rps=ok / secs,
        p50_ms=d["p50_us"] / 1000,
        p95_ms=d["p95_us"] / 1000,
        p99_ms=d["p99_us"] / 1000,
        max_ms=d["max_us"] / 1000,
        statuses={k[1:]: d[k] for k in ("s200", "s201", "s409", "sother") if d[k]},
        errors={k: d[k] for k in ("connect", "read", "write", "timeout") if d[k]},
        cpu_us_per_request={k: v / max(d["requests"], 1) * 1e6 for k, v in used.items()},
        idle_pct=idle_pct(machine0, machine1),
    )


# redis-benchmark: the raw hold script -------------------------------------------------------------------


def script_ceiling(redis_url: str, event_id: str, *, pipeline: int, requests: int) -> Measure:
    """``redis-benchmark`` sending ``EVALSHA hold`` (one hold per call, with a new random hold id and customer
    each call, one GA ticket) to the event; 50 connections, ``pipeline`` commands in flight per connection.
    The API sends an event's holds of one event-loop tick as one call, which costs Redis less per hold."""
    from service import keys
    from service.scripts import script_source

    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    sha = redis.Redis.from_url(redis_url).script_load(script_source("hold"))
    args = [  # one hold per call (see lua/hold.lua): retention, reap limit, then the hold's 5 arguments
        sha,
        "1",
        keys.meta(event_id),
        "86400",
        "200",
        "h__rand_int__",
        "c__rand_int__",
        "0",
        '[{"zone_id":"ga","quantity":1}]',
        "",
    ]
    cmd = [
        "redis-benchmark",
        "-h",
        "127.0.0.1",
        "-p",
        port,
        "-c",
        "50",
        "-n",
        str(requests),
        "-P",
        str(pipeline),
        "-r",
        "1000000000",
        "--csv",
        "EVALSHA",
        *args,
    ]
    started = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    secs = time.monotonic() - started
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith('"') and not ln.startswith('"test"')]
    # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    # (the test name is the command line, commas and quotes included: split from the right)
    cols = [c.strip('"') for c in rows[-1].rsplit(",", 7)]
    rps = float(cols[1])
    return Measure(
        tool=f"redis-benchmark -c 50 -P {pipeline}",
        route="EVALSHA hold",
        auto_pipeline=None,
        clients=50,
        requests=requests,
        seconds=secs,
        rps=rps,
        ok_rps=rps,
        p50_ms=float(cols[4]),
        p95_ms=float(cols[5]),
        p99_ms=float(cols[6]),
        max_ms=float(cols[7]),
    )


# Set-up: events, holds for the confirm runs -------------------------------------------------------------


def event_body(event_id: str) -> dict[str, Any]:
    """A 10,000,000-ticket GA zone and a 2,000-seat zone (20 rows of 100)."""
    return {
        "event_id": event_id,
        "name": f"Bench {event_id}",
        "starts_at": (datetime.now(UTC) + timedelta(days=30)).isoformat(),
        "hold_ttl_seconds": 600,
        "max_tickets_per_customer": 1000,
        "zones": [
            {"zone_id": "ga", "kind": "ga", "capacity": GA_CAPACITY, "price_cents": 5000},
            {
                "zone_id": "s",
                "kind": "seated",
                "price_cents": 9000,
                "rows": {chr(ord("A") + i): SEATS // 20 for i in range(20)},
            },
        ],
    }


def create_event(base: str, token: str, event_id: str) -> None:
    r = httpx.post(
        f"{base}/v1/events",
        json=event_body(event_id),
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
        trust_env=False,
    )
    if r.status_code != 201:
        raise RuntimeError(f"POST /v1/events: {r.status_code} {r.text[:300]}")


async def _with_inventory(settings: Settings, fn):
    from service.app import redis_client
    from service.inventory import Inventory

    client = redis_client(settings.redis_url, settings)
    inventory = Inventory(client, settings)
    try:
        return await fn(inventory)
    finally:
        inventory.close()
        await client.aclose()


async def _gather_chunks(coros, chunk: int = 1000) -> list:
    out = []
    coros = list(coros)
    for i in range(0, len(coros), chunk):
        out.extend(await asyncio.gather(*coros[i : i + chunk], return_exceptions=True))
    return out


def make_holds(settings: Settings, event_id: str, n: int, ttl_seconds: int) -> list[str]:
    """``n`` one-ticket GA holds made through ``Inventory`` (not timed). Returns their ids."""
    from service.domain import HoldRequest

    async def go(inv):
        reqs = [
            HoldRequest.model_validate(
                {
                    "customer_id": f"p-{i}",
                    "items": [{"zone_id": "ga", "quantity": 1}],
                    "ttl_seconds": ttl_seconds,
                }
            )
            for i in range(n)
        ]
        res = await _gather_chunks(inv.hold(event_id, r) for r in reqs)
        bad = [r for r in res if isinstance(r, BaseException)]
        if bad:
            raise bad[0]
        return [h["hold_id"] for h, _ in res]

    return asyncio.run(_with_inventory(settings, go))


def release_holds(settings: Settings, event_id: str, hold_ids: list[str]) -> int:
    """Release the holds still active (the confirmed ones refuse with hold_confirmed). Returns how many."""

    async def go(inv):
        res = await _gather_chunks(inv.release(event_id, h) for h in hold_ids)
        return sum(1 for r in res if r == "released")

    return asyncio.run(_with_inventory(settings, go))


def seconds_until_expired(last_expiry_ms: float, now_ms: float, margin_seconds: float = 0.05) -> float:
    """Seconds to wait from ``now_ms`` (Redis's clock) until a hold expiring at ``last_expiry_ms`` has expired,
    plus ``margin_seconds``; 0 if it already has."""
    return max(0.0, (last_expiry_ms - now_ms) / 1000 + margin_seconds)


def expire_and_reap(settings: Settings, event_id: str, timeout_seconds: float) -> dict[str, Any]:
    """Wait until the LAST active hold of the event has expired (the highest score of its expiry set, against
    Redis's clock), reap them all, and check that the expiry set is empty, so the next load run neither reaps
    them (the worker's sweeper) nor pays for them (not timed). Returns ``{"waited_seconds", "reaped"}``
    (reaped here; the sweeper reaps the rest meanwhile). Raises RuntimeError if active holds are left after
    ``timeout_seconds``."""
    from service import keys

    client = redis.Redis.from_url(settings.redis_url)
    key = keys.expiry(event_id)
    started = time.monotonic()
    reaped = 0

    async def go(inv):
        return await inv.reap(event_id)

    try:
        while True:
            last = client.zrange(key, -1, -1, withscores=True)
            if not last:
                return {"waited_seconds": time.monotonic() - started, "reaped": reaped}
            sec, usec = client.time()
            wait = seconds_until_expired(last[0][1], sec * 1000 + usec / 1000)
            if time.monotonic() - started + wait > timeout_seconds:
                raise RuntimeError(
                    f"{client.zcard(key)} active holds of {event_id} left; the last expires in {wait:.1f} s, "
                    f"past the {timeout_seconds:g} s allowed: the next load run would reap them"
                )
            time.sleep(wait)
            reaped += asyncio.run(_with_inventory(settings, go))
    finally:
        client.close()


def drain_outbox(settings: Settings, event_id: str, timeout_seconds: float = 120.0) -> int:
    """Wait until the worker has written every confirmed order of the event through to PostgreSQL, so that
    its write-through does not run inside the next load run. Returns the backlog left (0 when drained)."""
    import redis.asyncio as aioredis

    from loadtests.audit import drain

    async def go() -> int:
        client = aioredis.Redis.from_url(settings.redis_url)
        try:
            return await drain(client, event_id, timeout_seconds)
        finally:
            await client.aclose()

    return asyncio.run(go())


def load_ceiling_event(settings: Settings, event_id: str) -> None:
    from service.domain import EventSpec

    async def go(inv):
        await inv.load_event(EventSpec.model_validate(event_body(event_id)))

    asyncio.run(_with_inventory(settings, go))


# Audit and lag ----------------------------------------------------------------------------------------


def audit_sold(settings: Settings, sold: dict[str, Path | None], expiry_timeout_seconds: float) -> list[dict]:
    """Audit each event (acks from the directory, if any) against this part's Redis and the bench's database.
    Returns one verdict an event: {"event_id", "ok", "acks", "orders", "violations" (the first 5),
    "violation_count"}."""
    from loadtests.audit import audit_event, load_acks
    from service import db
    from service.app import redis_client

    async def go():
        client = redis_client(settings.redis_url, settings)
        pool = await db.create_pool(settings.database_url, min_size=1, max_size=2)
        try:
            verdicts = []
            for eid, acks_dir in sold.items():
                acks = load_acks(acks_dir, eid) if acks_dir else None
                rep = await audit_event(
                    client,
                    pool,
                    eid,
                    acks,
                    drain_timeout_seconds=60,
                    hold_expiry_timeout_seconds=expiry_timeout_seconds,
                    settings=settings,
                )
                verdicts.append(
                    {
                        "event_id": eid,
                        "ok": rep.ok,
                        "acks": rep.acks,
                        "orders": rep.orders,
                        "violations": [f"{v.check}: {v.detail}" for v in rep.violations[:5]],
                        "violation_count": len(rep.violations),
                    }
                )
            return verdicts
        finally:
            await pool.close()
            await client.aclose()

    return asyncio.run(go())


def write_through_lag(database_url: str, confirm_events: list[str]) -> dict[str, Any]:
    """Write-through lag over the confirm events' orders, in milliseconds: {"orders", "p50_ms", "p99_ms"} of
    ``persisted_at - confirmed_at``, from the confirm to the order row's insert in the write-through
    transaction (``persisted_at`` is the insert's ``clock_timestamp()``, not the commit). Zeros without orders."""
    import psycopg

    with psycopg.connect(database_url) as conn:
        n, p50, p99 = conn.execute(
            "SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY lag),"
            " percentile_cont(0.99) WITHIN GROUP (ORDER BY lag) FROM ("
            "  SELECT extract(epoch FROM persisted_at - confirmed_at) * 1000 AS lag FROM orders"
            "  WHERE event_id = ANY(%s)) t",
            (confirm_events,),
        ).fetchone()
    return {"orders": n, "p50_ms": float(p50 or 0), "p99_ms": float(p99 or 0)}


# Private PostgreSQL database ------------------------------------------------------------------------


# One part: API + worker up, every route at the concurrencies given (one, from _run) ----------------


def measure_mode(
    settings: Settings,
    auto_pipeline: bool,
    *,
    clients: list[int],
    duration_seconds: float,
    workdir: Path,
    log: Any,
) -> dict[str, Any]:
    """Start ``boxoffice serve --workers 2`` and ``boxoffice worker`` with BOXOFFICE_AUTO_PIPELINE set; run
    the routes with wrk at each of ``clients``; audit what was sold. Returns {"measures", "audits",
    "holds_expiry", "confirm_events"} (the write-through lag is the caller's, over all of a mode's parts)."""
    token = secrets.token_hex(16)
    mode = "on" if auto_pipeline else "off"
    part = f"{mode}-c{'-'.join(map(str, clients))}"  # names this part's logs
    metrics_dir = Path(tempfile.mkdtemp(prefix="boxoffice-bench-metrics-"))
    per_mode = {
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "BOXOFFICE_ADMIN_TOKEN": token,
        "BOXOFFICE_AUTO_PIPELINE": str(auto_pipeline).lower(),
    }
    env = child_env(dict(os.environ), per_mode)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    script = workdir / "bench.lua"
    script.write_text(WRK_SCRIPT)
    measures: list[Measure] = []
    sold: dict[str, Path | None] = {}
    confirm_events: list[str] = []
    hold_ttl = int(duration_seconds) + 1  # outlives the run; expired and reaped after it (expire_and_reap)
    expiries: list[dict[str, Any]] = []
    tag = uuid.uuid4().hex[:6]
    database = settings.database_url.rpartition("/")[2]
    started: list[subprocess.Popen] = []  # stopped in the finally below, whatever fails after the first start
    try:
        api = boxoffice(
            "serve",
            "--workers",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-migrate",
            env=env,
            log_path=workdir / f"serve-{part}.log",
        )
        started.append(api)
        worker = boxoffice("worker", env=env, log_path=workdir / f"worker-{part}.log")
        started.insert(0, worker)  # stopped first, then the API, as always
        redis_pid = int(redis.Redis.from_url(settings.redis_url).info("server")["process_id"])
        groups = {
            "api": lambda: process_tree(api.pid),
            "redis": lambda: [redis_pid],
            "worker": lambda: process_tree(worker.pid),
            "postgres": lambda: postgres_backends(database),
        }
        wait_ready(base, api)
        warm = f"bench-warm-{mode}-{tag}"
        create_event(base, token, warm)
        sold[warm] = None
        wrk(base, script, 50, 1, ["/healthz"], route="healthz", auto_pipeline=auto_pipeline)
        wrk(
            base,
            script,
            50,
            1,
            [f"/v1/events/{warm}/holds", "1", f"warm{tag}"],
            route="holds",
            auto_pipeline=auto_pipeline,
        )
        expire_and_reap(settings, warm, timeout_seconds=30)
        last_hold_rps = 5000.0
        for c in clients:

            def run(route: str, args: list[str], c: int = c) -> Measure:
                m = wrk(
                    base,
                    script,
                    c,
                    duration_seconds,
                    args,
                    route=route,
                    auto_pipeline=auto_pipeline,
                    groups=groups,
                )
                measures.append(m)
                log(
                    f"  auto_pipeline={mode:<3} c={c:<5} {route:<13} {m.rps:8.0f} req/s  ok {m.ok_rps:8.0f}/s  "
                    f"p50 {m.p50_ms:6.1f}  p95 {m.p95_ms:6.1f}  p99 {m.p99_ms:6.1f} ms  {m.statuses} {m.errors}  "
                    f"CPU us/req {_cpu_text(m.cpu_us_per_request)}; machine idle "
                    + (f"{m.idle_pct:.1f} %" if m.idle_pct is not None else "-")
                )
                return m

            run("healthz", ["/healthz"])
            holds_event, confirm_event, read_event = (f"bench-{k}-{mode}-c{c}-{tag}" for k in ("h", "c", "r"))
            for eid in (holds_event, confirm_event, read_event):
                create_event(base, token, eid)
                sold[eid] = None
            last_hold_rps = run(
                "holds", [f"/v1/events/{holds_event}/holds", str(hold_ttl), f"{mode}{c}{tag}"]
            ).ok_rps
            # every hold of the run expires and is reaped here, before the confirm run, not inside it
            x = expire_and_reap(settings, holds_event, timeout_seconds=hold_ttl + 30)
            expiries.append({"event_id": holds_event, **x})
            log(
                f"  holds of the run expired and reaped in {x['waited_seconds']:.1f} s after it ({x['reaped']} "
                "by the bench, the rest by the worker's sweeper): 0 active before the next run"
            )
            n = min(150_000, max(2000, int(last_hold_rps * duration_seconds * 1.5) + 1000))
            hold_ids = make_holds(settings, confirm_event, n, ttl_seconds=600)
            ids_file = workdir / f"holds-{confirm_event}.txt"
            ids_file.write_text("\n".join(hold_ids) + "\n")
            acks_dir = workdir / "acks" / confirm_event
            acks_dir.mkdir(parents=True, exist_ok=True)
            confirmed = run("confirm", [f"/v1/events/{confirm_event}/holds/", str(ids_file), str(acks_dir)])
            recorded = sum(len(f.read_bytes().splitlines()) for f in acks_dir.glob("*.jsonl"))
            if recorded != confirmed.statuses.get("201", 0):
                raise RuntimeError(
                    f"wrk recorded {recorded} acks of {confirmed.statuses.get('201', 0)} 201s ({acks_dir})"
                )
            release_holds(settings, confirm_event, hold_ids)
            left = drain_outbox(settings, confirm_event)  # the next run starts with the worker idle
            if left:
                log(f"  write-through backlog still {left} after 120 s: the next runs share the CPU with it")
            sold[confirm_event] = acks_dir
            confirm_events.append(confirm_event)
            run("availability", [f"/v1/events/{read_event}/availability"])
            run("seats", [f"/v1/events/{read_event}/zones/s/seats?limit=100"])
        log(f"  this part's Redis holds {redis.Redis.from_url(settings.redis_url).dbsize():,} keys")
        audits = audit_sold(settings, sold, expiry_timeout_seconds=hold_ttl + 5)
        return {
            "measures": measures,
            "audits": audits,
            "holds_expiry": expiries,
            "confirm_events": confirm_events,
        }
    finally:
        try:
            stop_all(started)
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)


# The report ---------------------------------------------------------------------------------------------


def _cpu_text(cpu: dict[str, float]) -> str:
    if not cpu:
        return "-"
    parts = [f"{k} {v:.0f}" for k, v in cpu.items() if v >= 0.5]
    return ", ".join(parts) + f"; total {sum(cpu.values()):.0f}"


def python_gauge_us(repeat: int = 5, number: int = 2000) -> float:
    """The machine's pure-Python speed: microseconds for one ``sum(range(1000))``, best of ``repeat`` timings of
    ``number`` calls (~0.1-0.3 s in all). VMs of one kind differ by 2-3x here, and a no-work request is mostly
    such Python, so its ceiling moves with the gauge more than a hold does (loadtests/RESULTS.md, bench S)."""
    import timeit

    return min(timeit.repeat("sum(range(1000))", number=number, repeat=repeat)) / number * 1e6


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout.split(
        "\n"
    )[0]
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "wrk": wrk_version.split("Copyright")[0].strip(),
        "python_gauge_us": round(python_gauge_us(), 2),
    }


def _median(values: list[float]) -> float:
    """The median; a whole number as an int (counts stay counts when the median falls on one)."""
    med = statistics.median(values)
    return int(med) if float(med).is_integer() else med


def _median_counts(counts: list[dict[str, int]]) -> dict[str, float]:
    """Per key, the median over the runs (a run without the key counted 0); zero medians left out."""
    keys = sorted({k for c in counts for k in c})
    med = {k: _median([c.get(k, 0) for c in counts]) for k in keys}
    return {k: v for k, v in med.items() if v}


def _sum_counts(counts: list[dict[str, int]]) -> dict[str, int]:
    """Per key, the total over the runs: socket errors of one run are never hidden by a median of 0."""
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def _median_measures(runs: list[list[Measure]]) -> list[Measure]:
    """Per (tool, route, mode, clients): the median of each figure over the runs, counts (requests, statuses)
    included, but socket errors, which are the total of all runs; the CPU total is the median of each run's
    total."""
    groups: dict[tuple, list[Measure]] = {}
    for ms in runs:
        for m in ms:
            groups.setdefault((m.tool, m.route, m.auto_pipeline, m.clients), []).append(m)
    out = []
    for ms in groups.values():
        med = {
            k: statistics.median(getattr(m, k) for m in ms)
            for k in ("seconds", "rps", "ok_rps", "p50_ms", "p95_ms", "p99_ms", "max_ms")
        }
        groups_seen = list(dict.fromkeys(k for m in ms for k in m.cpu_us_per_request))
        cpu = {k: statistics.median(m.cpu_us_per_request.get(k, 0.0) for m in ms) for k in groups_seen}
        out.append(
            Measure(
                tool=ms[0].tool,
                route=ms[0].route,
                auto_pipeline=ms[0].auto_pipeline,
                clients=ms[0].clients,
                requests=_median([m.requests for m in ms]),
                statuses=_median_counts([m.statuses for m in ms]),
                errors=_sum_counts([m.errors for m in ms]),
                cpu_us_per_request=cpu,
                cpu_us_total=statistics.median(m.cpu_us_total for m in ms) if cpu else None,
                idle_pct=statistics.median(m.idle_pct for m in ms if m.idle_pct is not None)
                if any(m.idle_pct is not None for m in ms)
                else None,
                **med,
            )
        )
    return out


def ratios_per_run(runs: list[list[Measure]], auto_pipeline: bool, clients: int) -> list[float]:
    """holds/s over ``/healthz``/s of each run at ``clients`` connections, in run order; runs without both
    are left out. The two load runs of a pair ran back to back, so both saw the VM at the same speed: their
    spread shows how far a single bench's ratio can move on this machine."""
    out = []
    for ms in runs:
        ok = {
            m.route: m.ok_rps
            for m in ms
            if m.auto_pipeline is auto_pipeline and m.clients == clients and m.route in ("holds", "healthz")
        }
        if ok.get("healthz") and "holds" in ok:
            out.append(ok["holds"] / ok["healthz"])
    return out


def summarize(
    measures: list[Measure],
    ceilings: list[Measure],
    lags: dict[str, list[dict]],
    audits: list[dict],
    clients: list[int],
    runs: list[list[Measure]] | None = None,
) -> dict[str, Any]:
    """Saturation figures and targets per auto-pipeline mode; ``runs`` (each run's own measures) adds the
    per-run holds/healthz ratios at the holds' best concurrency."""
    script_ceiling_rps = max((m.rps for m in ceilings), default=0.0)
    out: dict[str, Any] = {
        "script_ceiling_rps": script_ceiling_rps,
        "holds_p99_at_clients": min(clients),
        "modes": {},
    }
    for mode in (True, False):
        ms = [m for m in measures if m.auto_pipeline is mode]
        if not ms:
            continue

        def best(route: str, ms=ms) -> Measure | None:
            return max((m for m in ms if m.route == route), key=lambda m: m.ok_rps, default=None)

        holds, confirms, healthz = best("holds"), best("confirm"), best("healthz")
        at_min = next((m for m in ms if m.route == "holds" and m.clients == min(clients)), None)
        lag = lags.get("on" if mode else "off", [])
        out["modes"]["on" if mode else "off"] = {
            "holds_per_second": holds.ok_rps if holds else 0,
            "holds_at_clients": holds.clients if holds else 0,
            "confirms_per_second": confirms.ok_rps if confirms else 0,
            "confirms_at_clients": confirms.clients if confirms else 0,
            "healthz_per_second": healthz.ok_rps if healthz else 0,
            "healthz_at_clients": healthz.clients if healthz else 0,
            "holds_vs_healthz": (holds.ok_rps / healthz.ok_rps)
            if holds and healthz and healthz.ok_rps
            else 0,
            "holds_vs_healthz_per_run": ratios_per_run(runs or [], mode, holds.clients) if holds else [],
            "holds_vs_script": (holds.ok_rps / script_ceiling_rps) if holds and script_ceiling_rps else 0,
            "holds_p99_ms_at_min_clients": at_min.p99_ms if at_min else 0,
            # the CPU pair is taken at the ratio's two concurrencies: holds_at_clients, healthz_at_clients
            "holds_cpu_us": holds.cpu_us_total if holds else 0,
            "healthz_cpu_us": healthz.cpu_us_total if healthz else 0,
            "lag_p50_ms": statistics.median(x["p50_ms"] for x in lag) if lag else 0,
            "lag_p99_ms": statistics.median(x["p99_ms"] for x in lag) if lag else 0,
        }
    out["audit_events"] = len(audits)
    out["audit_violations"] = sum(a["violation_count"] for a in audits)
    return out


def render(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 170)
    m = report["machine"]
    console.print(
        f"[bold]boxoffice bench[/bold] {report['date']}  nproc {m['nproc']}, {m['cpu']}, Python "
        f"{m['python']}, Redis {m.get('redis', '?')}, PostgreSQL {m.get('postgres', '?')}, {m['wrk']}"
    )
    console.print(
        f"{report['runs']} run(s), {report['duration_seconds']:g} s per load run, medians over the runs shown "
        "(counts too; a CPU total is the median of each run's total); "
        f"load generator on this machine; load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['loadavg_at_start'])}"
    )
    if "python_gauge_us" in m:  # absent from reports saved before it was measured
        console.print(
            f"Python speed gauge: sum(range(1000)) in {m['python_gauge_us']:.1f} us (best of 5, timeit)"
        )
    inherited = report.get("inherited_settings") or {}
    console.print(
        "BOXOFFICE_* settings the API and the worker inherited, differing from the defaults: "
        + (", ".join(f"{k}={v}" for k, v in inherited.items()) or "none"),
        markup=False,
    )
    t = Table(title="Per route (HTTP: wrk, 2 threads; API: boxoffice serve --workers 2)")
    for col in (
        "route",
        "auto-pipeline",
        "clients",
        "req/s",
        "ok/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "statuses",
        "errors (all runs)",
        "tool",
    ):
        t.add_column(
            col, justify="left" if col in ("route", "statuses", "errors (all runs)", "tool") else "right"
        )
    for x in report["measures"] + report["ceilings"]:
        ap = "-" if x["auto_pipeline"] is None else ("on" if x["auto_pipeline"] else "off")
        t.add_row(
            x["route"],
            ap,
            str(x["clients"]),
            f"{x['rps']:.0f}",
            f"{x['ok_rps']:.0f}",
            f"{x['p50_ms']:.1f}",
            f"{x['p95_ms']:.1f}",
            f"{x['p99_ms']:.1f}",
            json.dumps(x["statuses"]),
            json.dumps(x["errors"]),
            x["tool"],
        )
    console.print(t)
    groups = ("api", "redis", "worker", "postgres", "wrk")
    ct = Table(
        title="CPU time per request, microseconds (user + system, from /proc; 2 cores = 2,000,000 us/s); "
        "idle %: the machine's CPU time left idle during the run (/proc/stat)"
    )
    for col in ("route", "auto-pipeline", "clients", *groups, "total", "CPU-bound ceiling req/s", "idle %"):
        ct.add_column(col, justify="left" if col == "route" else "right")
    for x in report["measures"]:
        cpu = x["cpu_us_per_request"]
        total = x["cpu_us_total"]
        ceiling = f"{int(m['nproc']) * 1e6 / total:.0f}" if total else "-"
        idle = x.get("idle_pct")
        ct.add_row(
            x["route"],
            "on" if x["auto_pipeline"] else "off",
            str(x["clients"]),
            *(f"{cpu.get(g, 0):.0f}" for g in groups),
            f"{total:.0f}",
            ceiling,
            f"{idle:.1f}" if idle is not None else "-",
        )
    console.print(ct)
    s = report["summary"]
    st = Table(title="Summary")
    for col in (
        "auto-pipeline",
        "holds/s (wrk)",
        "confirms/s (wrk)",
        "/healthz/s (wrk)",
        "holds/healthz",
        "per run",
        "holds/script",
        f"holds p99 @{s['holds_p99_at_clients']}",
        "CPU us: hold / healthz",
        "lag p50 ms",  # confirm to the order row's insert (see the note under the table)
        "lag p99 ms",
    ):
        st.add_column(col, justify="right", no_wrap=col in ("per run", "CPU us: hold / healthz"))
    for mode, v in s["modes"].items():
        st.add_row(
            mode,
            f"{v['holds_per_second']:.0f} @{v['holds_at_clients']}",
            f"{v['confirms_per_second']:.0f} @{v['confirms_at_clients']}",
            f"{v['healthz_per_second']:.0f} @{v['healthz_at_clients']}",
            f"{v['holds_vs_healthz']:.0%}",
            "/".join(f"{r * 100:.0f}" for r in v.get("holds_vs_healthz_per_run", [])) + " %"
            if v.get("holds_vs_healthz_per_run")
            else "-",
            f"{v['holds_vs_script']:.0%}",
            f"{v['holds_p99_ms_at_min_clients']:.1f} ms",
            f"{v['holds_cpu_us']:.0f} @{v['holds_at_clients']} / {v['healthz_cpu_us']:.0f} @{v['healthz_at_clients']}",
            f"{v['lag_p50_ms']:.0f}",
            f"{v['lag_p99_ms']:.0f}",
        )
    console.print(st)
    console.print(
        "holds/healthz: the median holds/s at its best concurrency over the median /healthz/s at its best (each "
        "@ the concurrency shown, which may differ); CPU us: hold / healthz: CPU per request at those same two "
        "concurrencies; per run: holds/s over /healthz/s within each run, both at the holds' best concurrency "
        "(the two load runs back to back). On a shared VM their spread shows how far one run's ratio can move."
    )
    console.print(
        "lag: write-through lag, from the confirm to the order row's insert in the write-through transaction "
        "(orders.persisted_at - confirmed_at; persisted_at is the insert's clock_timestamp(), the commit comes "
        "after it)."
    )
    console.print(
        f"raw hold script ceiling (redis-benchmark EVALSHA, best of pipelined/unpipelined): "
        f"{s['script_ceiling_rps']:.0f}/s"
    )
    bad = [a for a in report["audits"] if not a["ok"]]
    verdict = "[bold green]PASS[/bold green]" if not bad else "[bold red]FAIL[/bold red]"
    console.print(
        f"audit: {verdict} — {s['audit_events']} events audited, {s['audit_violations']} violations"
    )
    for a in bad[:5]:
        console.print(f"  {a['event_id']}: {a['violations']}")


def run_cli(
    settings: Settings,
    *,
    duration_seconds: float = 5.0,
    runs: int = 1,
    clients: list[int] | None = None,
    modes: list[bool] | None = None,
    json_path: Path | None = None,
) -> int:
    """``boxoffice bench``: 0 when the audit passes, 1 on an audit violation, 2 when a tool is missing,
    130 when interrupted (SIGINT / SIGTERM)."""
    clients = clients or list(DEFAULT_CLIENTS)
    modes = [True, False] if modes is None else modes

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # Ctrl-C or SIGTERM (also when started in the background, where SIGINT is ignored): stop the children and
    # drop the database on the way out (the finally blocks below). Only the first signal interrupts: another
    # one raised inside those finally blocks would skip the rest of them (an API left running, a database
    # left behind), so later ones are only acknowledged (os.write: print is not reentrant).
    stopping: list[int] = []

    def interrupted(signum, frame):
        if stopping:
            os.write(
                2, f"signal {signum} again: still stopping the children and dropping the database\n".encode()
            )
            return
        stopping.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(
            settings,
            duration_seconds=duration_seconds,
            runs=runs,
            clients=clients,
            modes=modes,
            json_path=json_path,
            log=log,
        )
    except KeyboardInterrupt:
        log("interrupted: child processes stopped, bench database dropped")
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(
    settings: Settings,
    *,
    duration_seconds: float,
    runs: int,
    clients: list[int],
    modes: list[bool],
    json_path: Path | None,
    log: Any,
) -> int:
    for tool, hint in (
        ("wrk", "apt-get update && apt-get install -y wrk"),
        ("redis-benchmark", "it ships with redis-server: apt-get install -y redis-tools"),
    ):
        if shutil.which(tool) is None:
            log(
                f"boxoffice bench needs `{tool}` on PATH and did not find it. Install it ({hint}) and run again."
            )
            return 2
    if not settings.database_url:
        log("boxoffice bench needs DATABASE_URL (a PostgreSQL server where it may create a database)")
        return 2
    problem = loopback_database_problem(settings.database_url)
    if problem:
        log(problem)
        return 2
    inherited, dropped = inherited_settings(dict(os.environ))
    if dropped:
        log(f"not passed on to the API and the worker (the bench is loopback-only): {', '.join(dropped)}")
    if inherited:
        log(
            "inherited by the API and the worker, differing from the defaults: "
            + ", ".join(f"{k}={v}" for k, v in inherited.items())
        )
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**machine(), "loadavg_at_start": os.getloadavg()},
        "runs": runs,
        "duration_seconds": duration_seconds,
        "clients": clients,
        "inherited_settings": inherited,
    }
    all_measures: list[list[Measure]] = []
    all_ceilings: list[list[Measure]] = []
    audits: list[dict] = []
    expiries: list[dict] = []
    lags: dict[str, list[dict]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="boxoffice-bench-"))
    started = time.monotonic()
    rc: int | None = None
    try:
        with throwaway_database(settings.database_url) as database_url:
            import psycopg

            with psycopg.connect(database_url) as conn:
                report["machine"]["postgres"] = conn.execute("SHOW server_version").fetchone()[0]
            for i in range(runs):
                log(f"run {i + 1}/{runs}: raw hold script (redis-benchmark)")
                # each part on a new, empty Redis (see the module docstring: keyspace rehashing)
                with throwaway_redis() as redis_url:
                    server = redis.Redis.from_url(redis_url).info("server")
                    report["machine"]["redis"] = server["redis_version"]
                    ceiling_event = f"bench-script-{uuid.uuid4().hex[:6]}"
                    stores = {"redis_url": redis_url, "database_url": database_url}
                    load_ceiling_event(settings.model_copy(update=stores), ceiling_event)
                    ceilings = [
                        script_ceiling(redis_url, ceiling_event, pipeline=1, requests=100_000),
                        script_ceiling(redis_url, ceiling_event, pipeline=16, requests=200_000),
                    ]
                for c in ceilings:
                    log(f"  {c.tool}: {c.rps:.0f} EVALSHA hold/s, p50 {c.p50_ms} p99 {c.p99_ms} ms")
                all_ceilings.append(ceilings)
                run_measures: list[Measure] = []
                for mode in modes:
                    mode_audits: list[dict] = []
                    confirm_events: list[str] = []
                    for c in clients:  # each concurrency on a Redis of its own (the module docstring)
                        log(
                            f"run {i + 1}/{runs}: API with BOXOFFICE_AUTO_PIPELINE={str(mode).lower()}, {c} clients"
                        )
                        with throwaway_redis() as redis_url:
                            stores = {"redis_url": redis_url, "database_url": database_url}
                            res = measure_mode(
                                settings.model_copy(update=stores),
                                mode,
                                clients=[c],
                                duration_seconds=duration_seconds,
                                workdir=workdir,
                                log=log,
                            )
                        run_measures.extend(res["measures"])
                        mode_audits.extend(res["audits"])
                        expiries.extend(res["holds_expiry"])
                        confirm_events.extend(res["confirm_events"])
                    lag = write_through_lag(database_url, confirm_events)
                    audits.extend(mode_audits)
                    lags.setdefault("on" if mode else "off", []).append(lag)
                    log(
                        "  write-through lag (confirm to order-row insert) "
                        f"p50 {lag['p50_ms']:.0f} ms, p99 {lag['p99_ms']:.0f} ms over {lag['orders']} orders; audit: "
                        f"{sum(a['violation_count'] for a in mode_audits)} violations in {len(mode_audits)} events"
                    )
                all_measures.append(run_measures)
        measures = _median_measures(all_measures)
        ceilings = _median_measures(all_ceilings)
        report["measures"] = [asdict(m) for m in measures]
        report["ceilings"] = [asdict(m) for m in ceilings]
        report["lag"] = lags
        report["audits"] = audits
        report["holds_expiry"] = expiries
        report["summary"] = summarize(measures, ceilings, lags, audits, clients, runs=all_measures)
        report["elapsed_seconds"] = round(time.monotonic() - started, 1)
        report["machine"]["loadavg_at_end"] = os.getloadavg()
        render(report)
        log(f"bench took {report['elapsed_seconds']:.0f} s")
        if json_path:
            json_path.write_text(json.dumps(report, indent=2))
        rc = 0 if report["summary"]["audit_violations"] == 0 else 1
        return rc
    finally:
        if rc == 0:
            shutil.rmtree(workdir, ignore_errors=True)
        else:  # failed, interrupted or an audit violation: what the children logged is evidence
            log(
                "the bench did not pass: its working directory is kept, with the API's and the worker's logs "
                f"(serve-*.log, worker-*.log), wrk's script and the confirm runs' acks: {workdir}"
            )
