"""The bench's report arithmetic and helpers (no load run here: ``boxoffice bench`` itself is run by hand, see
RESULTS.md; the expiry wait is tried on a throw-away redis-server)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import pytest
import redis

from loadtests.bench import (
    Measure,
    _median_measures,
    child_env,
    expire_and_reap,
    inherited_settings,
    load_ceiling_event,
    loopback_database_problem,
    make_holds,
    python_gauge_us,
    render,
    seconds_until_expired,
    summarize,
)
from loadtests.local import throwaway_redis
from service.settings import Settings


def _m(
    route: str, clients: int, ok_rps: float, auto_pipeline: bool = True, cpu: dict[str, float] | None = None
) -> Measure:
    return Measure(
        tool="wrk",
        route=route,
        auto_pipeline=auto_pipeline,
        clients=clients,
        requests=int(ok_rps * 5),
        seconds=5.0,
        rps=ok_rps,
        ok_rps=ok_rps,
        p50_ms=1.0,
        p95_ms=2.0,
        p99_ms=3.0,
        max_ms=4.0,
        cpu_us_per_request=cpu or {"api": 50.0, "wrk": 20.0},
    )


def test_each_runs_ratio_pairs_the_holds_and_healthz_of_that_run_at_the_holds_best_concurrency():
    runs = [
        # run 1: a fast minute; run 2: a slow one, where healthz at 1,000 happened to be the best healthz
        [
            _m("healthz", 100, 20_000),
            _m("holds", 100, 12_000),
            _m("healthz", 1000, 19_000),
            _m("holds", 1000, 9_000),
        ],
        [
            _m("healthz", 100, 10_000),
            _m("holds", 100, 7_000),
            _m("healthz", 1000, 21_000),
            _m("holds", 1000, 5_000),
        ],
        # run 3 lost its holds run at 100: no pair for it
        [_m("healthz", 100, 15_000), _m("healthz", 1000, 15_000), _m("holds", 1000, 8_000)],
        # the other mode's figures never pair with this one's
        [_m("healthz", 100, 1_000, auto_pipeline=False), _m("holds", 100, 900, auto_pipeline=False)],
    ]
    measures = _median_measures(runs)
    s = summarize(measures, [], {}, [], [100, 1000], runs=runs)
    on = s["modes"]["on"]
    assert on["holds_at_clients"] == 100  # median 9,500 at 100 against 8,000 at 1,000
    assert on["holds_vs_healthz"] == pytest.approx(9_500 / 19_000)  # medians: holds @100, healthz @1000
    assert on["holds_vs_healthz_per_run"] == pytest.approx([0.6, 0.7])  # within each run, at 100
    assert s["modes"]["off"]["holds_vs_healthz_per_run"] == pytest.approx([0.9])


def test_the_report_prints_the_ratio_of_each_run(capsys):
    runs = [
        [_m("healthz", 100, 20_000), _m("holds", 100, 12_000)],
        [_m("healthz", 100, 10_000), _m("holds", 100, 7_000)],
    ]
    report = _report(runs, [100])
    report["machine"]["python_gauge_us"] = 27.19
    render(report)
    out = capsys.readouterr().out
    assert "60/70 %" in out
    # persisted_at is the order row's insert time (a clock_timestamp() default), not the commit
    words = " ".join(out.split())
    assert "from the confirm to the order row's insert in the write-through transaction" in words
    assert "sum(range(1000)) in 27.2 us" in out


def _report(runs: list[list[Measure]], clients: list[int]) -> dict:
    measures = _median_measures(runs)
    return {
        "date": "2026-12-02T13:00:00+00:00",
        "machine": {
            "nproc": "2",
            "cpu": "test",
            "python": "3",
            "wrk": "wrk",
            "loadavg_at_start": (0.0, 0.0, 0.0),
        },
        "runs": len(runs),
        "duration_seconds": 5.0,
        "measures": [vars(m) for m in measures],
        "ceilings": [],
        "audits": [],
        "summary": summarize(measures, [], {}, [], clients, runs=runs),
    }


def test_the_summary_says_at_which_concurrency_each_figure_of_the_ratio_and_cpu_pair_was_taken(capsys):
    # holds are best at 1,000 clients, /healthz at 50: the ratio and the CPU pair use exactly those two
    runs = [
        [
            _m("healthz", 50, 20_000, cpu={"api": 60.0, "wrk": 15.0}),
            _m("holds", 50, 8_000, cpu={"api": 90.0, "wrk": 20.0}),
            _m("healthz", 1000, 18_000, cpu={"api": 70.0, "wrk": 17.0}),
            _m("holds", 1000, 9_000, cpu={"api": 100.0, "wrk": 21.0}),
        ]
    ]
    report = _report(runs, [50, 1000])
    on = report["summary"]["modes"]["on"]
    assert (on["holds_at_clients"], on["healthz_at_clients"]) == (1000, 50)
    assert (on["holds_cpu_us"], on["healthz_cpu_us"]) == (121, 75)
    render(report)
    out = capsys.readouterr().out
    assert "121 @1000 / 75 @50" in out
    assert "20000 @50" in out  # /healthz/s
    assert report["summary"]["holds_p99_at_clients"] == 50
    # the header cell "holds p99 @50", wrapped by the table; nothing says @100
    assert "@50 ┃" in out and not re.search(r"@100\b", out)


def test_counts_over_runs_are_medians_but_errors_are_totals_and_the_cpu_total_is_the_median_of_each_runs_total(
    capsys,
):
    runs = []
    for requests, s409, timeouts, cpu in (
        (1000, 0, 0, {"api": 100.0, "wrk": 0.0}),  # total 100
        (3000, 4, 2, {"api": 0.0, "wrk": 100.0}),  # total 100
        (2000, 2, 0, {"api": 60.0, "wrk": 60.0}),  # total 120
    ):
        m = _m("holds", 100, requests / 5, cpu=cpu)
        m.statuses = {"201": requests - s409, **({"409": s409} if s409 else {})}
        m.errors = {"timeout": timeouts} if timeouts else {}
        runs.append([m, _m("healthz", 100, 20_000)])
    (holds,) = [m for m in _median_measures(runs) if m.route == "holds"]
    assert holds.requests == 2000  # not 6,000, the sum
    assert holds.statuses == {"201": 1998, "409": 2}
    assert holds.errors == {"timeout": 2}  # 0, 2, 0 timeouts: the total, never hidden by a median of 0
    assert holds.cpu_us_per_request == {"api": 60.0, "wrk": 60.0}
    assert holds.cpu_us_total == 100  # the median run's total; the per-group medians add up to 120
    report = _report(runs, [100])
    assert report["summary"]["modes"]["on"]["holds_cpu_us"] == 100
    render(report)
    out = capsys.readouterr().out
    holds_cpu_row = next(ln for ln in out.splitlines() if ln.startswith("│ holds") and "wrk" not in ln)
    assert holds_cpu_row.split("│")[-4].strip() == "100"  # the CPU table's total column
    assert '{"201": 1998, "409": 2}' in out


def test_the_python_gauge_is_in_microseconds():
    # microseconds: a thousand additions take more than 0.5 us and less than 10 ms on any machine that runs this
    assert 0.5 < python_gauge_us(repeat=1, number=10) < 10_000


def test_the_wait_after_a_holds_run_lasts_until_its_last_hold_has_expired():
    assert seconds_until_expired(10_000, 6_000, margin_seconds=0.05) == pytest.approx(4.05)
    assert seconds_until_expired(10_000, 12_000) == 0.0


def test_every_hold_of_a_holds_run_is_expired_and_reaped_before_the_next_run():
    # A holds run of 2 s with TTL 3 s: its first holds expire 3 s after it starts, its last 3 s after it ends.
    # The old wait (TTL - duration + 0.5 s after the run) reaped only the first ones.
    from service import keys

    with throwaway_redis() as url:
        settings = Settings(redis_url=url, database_url=None)
        event_id = f"bench-t-{uuid.uuid4().hex[:6]}"
        load_ceiling_event(settings, event_id)
        make_holds(settings, event_id, 20, ttl_seconds=1)  # the run's first holds
        time.sleep(1.0)
        make_holds(settings, event_id, 30, ttl_seconds=2)  # its last holds, made 1 s later
        started = time.monotonic()
        x = expire_and_reap(settings, event_id, timeout_seconds=10)
        waited = time.monotonic() - started
        client = redis.Redis.from_url(url)
        assert client.zcard(keys.expiry(event_id)) == 0
        assert x["reaped"] == 50  # no worker here: the bench reaped them all
        assert waited >= 1.9  # until the last hold expired, not the first


def test_holds_left_past_the_timeout_fail_loudly():
    with throwaway_redis() as url:
        settings = Settings(redis_url=url, database_url=None)
        event_id = f"bench-t-{uuid.uuid4().hex[:6]}"
        load_ceiling_event(settings, event_id)
        make_holds(settings, event_id, 5, ttl_seconds=60)
        with pytest.raises(RuntimeError, match="5 active holds"):
            expire_and_reap(settings, event_id, timeout_seconds=1)


def test_the_children_bind_and_talk_loopback_only_whatever_the_caller_set():
    caller = {
        "PATH": "/usr/bin",
        "BOXOFFICE_HOST": "0.0.0.0",
        "boxoffice_host": "0.0.0.0",  # settings names are case-insensitive
        "BOXOFFICE_QUEUE_REDIS_URL": "redis://queue.example.com:6379/0",
        "BOXOFFICE_WORKER_METRICS_PORT": "9100",
        "BOXOFFICE_REDIS_URL": "redis://cache.example.com:6379/0",
        "REDIS_URL": "redis://cache.example.com:6379/0",
        "BOXOFFICE_WEB_WORKERS": "4",
    }
    env = child_env(caller, {"REDIS_URL": "redis://127.0.0.1:4000/0"})
    assert env["BOXOFFICE_HOST"] == "127.0.0.1" and "boxoffice_host" not in env
    assert env["REDIS_URL"] == "redis://127.0.0.1:4000/0"
    for dropped in ("BOXOFFICE_QUEUE_REDIS_URL", "BOXOFFICE_WORKER_METRICS_PORT", "BOXOFFICE_REDIS_URL"):
        assert dropped not in env
    assert env["PATH"] == "/usr/bin" and env["BOXOFFICE_WEB_WORKERS"] == "4"
    assert "example.com" not in json.dumps(env)


def test_the_worker_the_bench_starts_runs_no_reconciliation_cron_job(monkeypatch):
    """A reconciliation pass reads every hold record of every event: in a load run it is part of no route's
    cost. Hourly was not off (the cron runs at minute 0; one landed in a load run at 22:00 UTC), so the
    bench's worker must have no cron job at all, whatever the caller set."""
    from workers.main import schedule

    caller = {"BOXOFFICE_RECONCILE_INTERVAL_SECONDS": "30"}
    env = child_env(caller, {})
    for name in [k for k in os.environ if k.upper().startswith("BOXOFFICE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.upper().startswith("BOXOFFICE_"):
            monkeypatch.setenv(name, value)
    assert schedule(Settings(redis_url=None, database_url=None)) == []


def test_the_report_names_the_inherited_settings_that_differ_from_the_defaults():
    inherited, dropped = inherited_settings(
        {
            "BOXOFFICE_WEB_WORKERS": "4",  # differs (default 2)
            "BOXOFFICE_COALESCE_WRITES": "true",  # the default, spelt as the environment does
            "BOXOFFICE_REAP_BATCH": "200",  # the default
            "BOXOFFICE_GC_YOUNG_THRESHOLD": "lots",  # invalid: not the default
            "BOXOFFICE_NO_SUCH_SETTING": "1",
            "BOXOFFICE_AUTO_PIPELINE": "false",  # set by the bench per mode
            "BOXOFFICE_HOST": "0.0.0.0",  # pinned by the bench
            "BOXOFFICE_QUEUE_REDIS_URL": "redis://queue.example.com/0",
            "HOME": "/root",
        }
    )
    assert inherited == {
        "BOXOFFICE_GC_YOUNG_THRESHOLD": "lots",
        "BOXOFFICE_NO_SUCH_SETTING": "1",
        "BOXOFFICE_WEB_WORKERS": "4",
    }
    assert dropped == ["BOXOFFICE_QUEUE_REDIS_URL"]


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres@127.0.0.1:5432/postgres",
        "postgresql://postgres@localhost/postgres",
        "postgresql://postgres@[::1]:5432/postgres",
        "postgresql:///postgres?host=/var/run/postgresql",
        "postgresql:///postgres",  # the default Unix socket
    ],
)
def test_a_loopback_database_is_accepted(url):
    assert loopback_database_problem(url, environ={}) is None


@pytest.mark.parametrize(
    "url, environ",
    [
        ("postgresql://postgres@db.example.com:5432/postgres", {}),
        ("postgresql://postgres@10.0.0.5/postgres", {}),
        ("postgresql://postgres@127.0.0.1,10.0.0.5/postgres", {}),
        ("postgresql://postgres@localhost/postgres?hostaddr=10.0.0.5", {}),
        ("postgresql:///postgres", {"PGHOST": "db.example.com"}),
    ],
)
def test_a_database_off_this_machine_is_refused(url, environ):
    problem = loopback_database_problem(url, environ=environ)
    assert problem is not None and "loopback-only" in problem


def test_a_failed_bench_keeps_its_working_directory_with_the_childrens_logs(monkeypatch):
    import contextlib

    from loadtests import bench

    @contextlib.contextmanager
    def redis_that_fails():
        raise RuntimeError("redis-server did not start")
        yield  # pragma: no cover

    monkeypatch.setattr(bench.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(bench, "machine", lambda: {})
    monkeypatch.setattr(bench, "throwaway_redis", redis_that_fails)
    logged: list[str] = []
    with pytest.raises(RuntimeError, match="did not start"):
        bench._run(
            Settings(redis_url=None, database_url="postgresql://postgres@127.0.0.1:5432/postgres"),
            duration_seconds=1,
            runs=1,
            clients=[100],
            modes=[True],
            json_path=None,
            log=logged.append,
        )
    kept = [Path(m.rsplit(": ", 1)[1]) for m in logged if "working directory is kept" in m]
    assert kept and kept[0].is_dir() and kept[0].name.startswith("boxoffice-bench-")
    shutil.rmtree(kept[0])


def test_each_part_of_each_run_starts_on_a_new_empty_redis(monkeypatch, tmp_path):
    """The script ceiling and each auto-pipelining mode at each concurrency of each run get a Redis of their
    own, empty at the start: on one Redis, the keys a part leaves behind piled up until a later part paid for
    Redis rehashing its keyspace (RESULTS.md). The load itself is stubbed; the servers and the database are
    real. A mode's write-through lag is taken over the orders of all its parts."""
    from loadtests import bench

    seen: list[tuple[str, str, str, list[bytes]]] = []  # (part, URL, server run_id, keys found at the start)

    def look(part: str, redis_url: str) -> redis.Redis:
        r = redis.Redis.from_url(redis_url)
        seen.append((part, redis_url, r.info("server")["run_id"], sorted(r.keys())))
        return r

    def ceiling(redis_url, event_id, *, pipeline, requests):
        r = look(f"ceiling -P {pipeline}", redis_url)
        r.set(f"left-behind-by-ceiling-{pipeline}", 1)
        return _m("EVALSHA hold", 50, 30_000.0)

    lag_events: list[list[str]] = []

    def mode(settings, auto_pipeline, *, clients, **_):
        assert "/boxoffice_bench_" in settings.database_url  # the bench's own database, as before
        (c,) = clients
        r = look(f"mode {auto_pipeline} c{c}", settings.redis_url)
        r.set("left-behind-by-mode", 1)
        measures = [_m("healthz", c, 30_000.0, auto_pipeline), _m("holds", c, 18_000.0, auto_pipeline)]
        events = [f"confirm-{auto_pipeline}-{c}"]
        return {"measures": measures, "audits": [], "holds_expiry": [], "confirm_events": events}

    def lag(database_url, confirm_events):
        assert "/boxoffice_bench_" in database_url
        lag_events.append(list(confirm_events))
        return {"orders": 0, "p50_ms": 0.0, "p99_ms": 0.0}

    which = shutil.which  # the real one finds redis-server, for the throw-away servers
    monkeypatch.setattr(
        bench.shutil,
        "which",
        lambda tool: "/usr/bin/x" if tool in ("wrk", "redis-benchmark") else which(tool),
    )
    box = {"nproc": "2", "cpu": "a CPU", "python": "3", "kernel": "6", "wrk": "wrk", "python_gauge_us": 10.0}
    monkeypatch.setattr(bench, "machine", lambda: box)
    monkeypatch.setattr(bench, "script_ceiling", ceiling)
    monkeypatch.setattr(bench, "measure_mode", mode)
    monkeypatch.setattr(bench, "write_through_lag", lag)
    rc = bench._run(
        Settings(redis_url=None, database_url="postgresql://postgres@127.0.0.1:5432/postgres"),
        duration_seconds=1,
        runs=2,
        clients=[100, 1000],
        modes=[True, False],
        json_path=tmp_path / "report.json",
        log=lambda msg: None,
    )
    assert rc == 0
    assert [part for part, _, _, _ in seen] == [
        "ceiling -P 1",
        "ceiling -P 16",
        "mode True c100",
        "mode True c1000",
        "mode False c100",
        "mode False c1000",
    ] * 2
    # the two calls of one ceiling share its Redis (and its event); every other part has a new server
    servers = [run_id for _, _, run_id, _ in seen]
    assert servers[0] == servers[1] and servers[6] == servers[7]
    assert len(set(servers)) == len(servers) - 2
    assert (
        lag_events
        == [["confirm-True-100", "confirm-True-1000"], ["confirm-False-100", "confirm-False-1000"]] * 2
    )
    for part, _, _, keys in seen:  # nothing an earlier part left behind, but -P 1's key in its own Redis
        left = [k for k in keys if k.startswith(b"left-behind")]
        assert left == ([b"left-behind-by-ceiling-1"] if part == "ceiling -P 16" else []), part
        if part.startswith("mode"):
            assert keys == [], part
    for url, run_id in {(url, run_id) for _, url, run_id, _ in seen}:  # and none of them is left running
        try:
            answering = redis.Redis.from_url(url, socket_connect_timeout=0.5).info("server")["run_id"]
        except redis.exceptions.ConnectionError:
            continue
        assert answering != run_id  # another server took the port since
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["summary"]["modes"]["on"]["holds_vs_healthz"] == 0.6


def test_children_already_started_are_stopped_when_a_later_set_up_step_fails(monkeypatch, tmp_path):
    """The API and the worker start before the bench asks Redis for its process id; a Redis that does not
    answer then must not leave them running."""
    import subprocess

    from loadtests import bench

    children: list[subprocess.Popen] = []

    def child(*args, env, log_path=None):  # a real process in its own group, as boxoffice() starts them
        proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
        children.append(proc)
        return proc

    monkeypatch.setattr(bench, "boxoffice", child)
    unreachable = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            bench.measure_mode(
                Settings(redis_url=unreachable, database_url="postgresql://postgres@127.0.0.1:5432/postgres"),
                True,
                clients=[100],
                duration_seconds=1,
                workdir=tmp_path,
                log=lambda msg: None,
            )
        assert len(children) == 2
        assert [proc.poll() for proc in children] == [-15, -15]  # both ended by the bench's SIGTERM
    finally:
        for proc in children:  # on a failure above, not left behind by the test either
            proc.kill()
            proc.wait()


def test_stopping_one_child_interrupted_still_stops_the_next():
    from loadtests.bench import stop_all

    stopped = []

    def stop(name):
        stopped.append(name)
        if name == "worker":
            raise KeyboardInterrupt("signal 15")

    with pytest.raises(KeyboardInterrupt):
        stop_all(["worker", "api"], stop=stop)
    assert stopped == ["worker", "api"]


def test_a_second_signal_during_the_cleanup_does_not_cut_it_short(monkeypatch):
    import os
    import signal

    from loadtests import bench

    cleaned = []

    def run_then_clean_up(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the first signal interrupts the run
            time.sleep(5)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # a second one while the children are being stopped
            time.sleep(0.05)
            cleaned.append("api stopped, database dropped")

    monkeypatch.setattr(bench, "_run", run_then_clean_up)
    assert bench.run_cli(Settings(redis_url=None, database_url=None)) == 130
    assert cleaned == ["api stopped, database dropped"]


def test_the_machines_idle_share_of_a_run_comes_from_proc_stat_and_over_runs_is_the_median(tmp_path):
    from loadtests.bench import _median_measures, idle_pct, machine_times

    # user nice system idle iowait irq softirq steal: 1,000 ticks of which 60 idle and 20 iowait
    assert idle_pct((100, 1000), (180, 2000)) == 8.0
    assert idle_pct(None, (1, 2)) is None and idle_pct((5, 10), (5, 10)) is None
    before = machine_times()
    assert before is not None and 0 <= before[0] <= before[1]  # this machine's own /proc/stat
    sum(range(2_000_000))  # some CPU time passes
    share = idle_pct(before, machine_times())
    assert share is None or 0.0 <= share <= 100.0

    runs = []
    for idle in (3.0, 9.0, 5.0):
        m = _m("holds", 100, 10_000)
        m.idle_pct = idle
        runs.append([m])
    (med,) = _median_measures(runs)
    assert med.idle_pct == 5.0


def test_the_cpu_table_shows_each_runs_idle_share(capsys):
    m = _m("holds", 100, 10_000)
    m.idle_pct = 6.25
    render(_report([[m]], [100]))
    out = capsys.readouterr().out.splitlines()
    cpu_row = next(ln for ln in out if ln.startswith("│ holds") and "wrk" not in ln)
    assert cpu_row.split("│")[-2].strip() == "6.2"  # the CPU table's last column


def test_a_modes_write_through_lag_is_taken_over_the_orders_of_the_events_named(database_url):
    """``write_through_lag`` reads the orders' ``persisted_at - confirmed_at`` in PostgreSQL, in milliseconds,
    over the events it is given only (a mode's confirm events, from all its parts)."""
    import psycopg

    from loadtests.bench import write_through_lag

    tag = uuid.uuid4().hex[:8]
    mine, theirs = [f"lag-{tag}-a", f"lag-{tag}-b"], f"lag-{tag}-other"
    with psycopg.connect(database_url, autocommit=True) as conn:
        for eid in (*mine, theirs):
            conn.execute(
                "INSERT INTO events (event_id, name, starts_at, hold_ttl_seconds, max_tickets_per_customer)"
                " VALUES (%s, 'lag', now(), 60, 4)",
                (eid,),
            )
        for i, (eid, lag_ms) in enumerate([(mine[0], 10), (mine[1], 20), (mine[1], 30), (theirs, 5000)]):
            conn.execute(
                "INSERT INTO orders (order_id, event_id, hold_id, customer_id, amount_cents, confirmed_at,"
                " persisted_at) VALUES (%s, %s, %s, 'c', 0, now(), now() + make_interval(secs => %s))",
                (f"o-{tag}-{i}", eid, f"h-{tag}-{i}", lag_ms / 1000),
            )
    try:
        lag = write_through_lag(database_url, mine)
        assert lag["orders"] == 3
        assert lag["p50_ms"] == pytest.approx(20.0)
        assert lag["p99_ms"] == pytest.approx(29.8)  # percentile_cont: 20 + 0.98 * (30 - 20)
        assert write_through_lag(database_url, [f"lag-{tag}-none"]) == {
            "orders": 0,
            "p50_ms": 0.0,
            "p99_ms": 0.0,
        }
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("DELETE FROM orders WHERE event_id = ANY(%s)", ([*mine, theirs],))
            conn.execute("DELETE FROM events WHERE event_id = ANY(%s)", ([*mine, theirs],))
