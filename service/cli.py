"""The ``boxoffice`` command (Typer). Every command has ``--help``.

Commands that need servers resolve them like ``make run`` does (``service.servers.choose_servers``):
REDIS_URL / DATABASE_URL if set, else local defaults if they answer, else embedded servers. The chosen
URLs are exported to the environment so child processes (uvicorn workers) use the same ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path

import typer

from service.settings import Settings, get_settings

app = typer.Typer(
    help="boxoffice: flash-sale ticketing (Redis holds, PostgreSQL orders).", no_args_is_help=True
)
event_app = typer.Typer(help="Create and inspect events.", no_args_is_help=True)
app.add_typer(event_app, name="event")

_started = []  # Servers objects this process started (stopped at exit by servers' atexit hooks)


def resolve_settings(*, quiet: bool = False) -> Settings:
    """Settings with both URLs filled in (choosing or starting servers if needed) and exported to os.environ."""
    settings = get_settings()
    if settings.redis_url and settings.database_url:  # explicit URLs win, even over BOXOFFICE_EMBEDDED
        return settings
    from service.servers import choose_servers

    servers = choose_servers(settings)
    _started.append(servers)
    if not quiet:
        typer.echo(servers.describe(), err=True)
    os.environ["REDIS_URL"] = servers.redis_url
    os.environ["DATABASE_URL"] = servers.database_url
    os.environ.pop("BOXOFFICE_EMBEDDED", None)  # children use the URLs chosen here
    get_settings.cache_clear()
    return get_settings()


def _exit(code: int) -> None:
    raise typer.Exit(code)


@app.command()
def serve(
    workers: int = typer.Option(None, help="uvicorn worker processes (default BOXOFFICE_WEB_WORKERS)."),
    host: str = typer.Option(None, help="Address to bind (default BOXOFFICE_HOST)."),
    port: int = typer.Option(None, help="Port (default BOXOFFICE_PORT)."),
    migrate_first: bool = typer.Option(
        True, "--migrate/--no-migrate", help="Apply pending migrations first."
    ),
) -> None:
    """Serve the JSON API with uvicorn (several worker processes, one Redis pool each)."""
    import tempfile

    settings = resolve_settings()
    with contextlib.ExitStack() as stack:
        if not _export_metrics_dir(settings):
            # the workers' metric files, for this serve only: removed when it stops
            temporary = tempfile.TemporaryDirectory(prefix="boxoffice-metrics-", ignore_cleanup_errors=True)
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = stack.enter_context(temporary)

        from service import serving
        from service.migrate import migrate

        if migrate_first:
            migrate(settings.database_url)
        serving.run(
            settings,
            host=host or settings.host,
            port=port or settings.port,
            workers=workers or settings.web_workers,
        )


@app.command()
def worker() -> None:
    """Run an arq worker: outbox write-through to PostgreSQL, the expiry sweeper, and the reconcile cron job
    (none with BOXOFFICE_RECONCILE_INTERVAL_SECONDS=0)."""
    settings = resolve_settings()
    _export_metrics_dir(settings)

    from workers.main import queue_redis_url, run_worker

    try:
        queue_redis_url(settings)
    except RuntimeError as exc:
        typer.echo(f"boxoffice worker: {exc}", err=True)
        _exit(2)
    run_worker(settings)


def _export_metrics_dir(settings: Settings) -> bool:
    """prometheus_client reads only ``PROMETHEUS_MULTIPROC_DIR``, once, when first imported: export
    ``BOXOFFICE_METRICS_DIR`` under that name (creating the folder) before anything imports it. True if a
    multi-process folder is set."""
    if not settings.metrics_dir:
        return False
    Path(settings.metrics_dir).mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = settings.metrics_dir
    return True


@app.command()
def migrate() -> None:
    """Apply pending SQL migrations from migrations/ (recorded by yoyo in _yoyo_migration)."""
    from service.migrate import migrate as apply

    applied = apply(resolve_settings().database_url)
    typer.echo(f"applied: {', '.join(applied)}" if applied else "database is up to date")


@app.command()
def dev() -> None:
    """What `make run` runs: serve the API and a worker, with a demo event on sale. Ctrl-C stops everything."""
    from service.devrun import run_cli

    _exit(run_cli(resolve_settings()))


@app.command()
def reconcile(
    event: str = typer.Option(None, "--event", help="Only this event (default: every event)."),
    repair: bool = typer.Option(
        False, "--repair", help="Fix what is safe to fix (pauses the event meanwhile)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Compare Redis with PostgreSQL; exit 1 if anything drifts."""
    from workers.reconcile import run_cli

    _exit(run_cli(resolve_settings(quiet=as_json), event_id=event, repair=repair, as_json=as_json))


@app.command()
def rebuild(
    event: str = typer.Option(None, "--event", help="Only this event (default: every event in PostgreSQL)."),
    resume: bool = typer.Option(False, "--resume", help="Put the event back on sale when done."),
) -> None:
    """Reload events, zones, seats and sold counts from PostgreSQL into Redis (after Redis lost data)."""
    from service.rebuild import run_cli

    _exit(run_cli(resolve_settings(), event_id=event, resume=resume))


@app.command()
def audit(
    event: str = typer.Option(..., "--event", help="The event to audit."),
    acks: Path = typer.Option(
        None,
        "--acks",
        help="A load run's acks (JSON lines): a file, or a directory such as Locust's --acks-dir.",
    ),
    drain_timeout: float = typer.Option(30.0, help="Seconds to wait for the write-through to drain."),
    hold_expiry_timeout: float = typer.Option(
        None,
        help="Seconds to wait for the event's active holds to expire (default: --drain-timeout); at least the "
        "longest hold TTL of the run.",
    ),
    reap_grace: float = typer.Option(
        5.0,
        min=0,
        help="Seconds after its expiry a hold may still be active: past that, the service (boxoffice worker's "
        "sweeper) failed to reap it, a violation.",
    ),
) -> None:
    """Check a sale: no oversell, no seat sold twice, Redis agrees with PostgreSQL, every ack persisted once.
    Exit 0: pass; 1: a violation; 2: no verdict (acks unreadable or missing, a store unreachable)."""
    from loadtests.audit import run_cli

    _exit(
        run_cli(
            resolve_settings(),
            event_id=event,
            acks_file=acks,
            drain_timeout_seconds=drain_timeout,
            hold_expiry_timeout_seconds=hold_expiry_timeout,
            reap_grace_seconds=reap_grace,
        )
    )


@app.command()
def bench(
    duration: float = typer.Option(5.0, help="Seconds per load run (each route, each concurrency)."),
    runs: int = typer.Option(1, help="Repeat everything this often; medians are reported."),
    clients: str | None = typer.Option(
        None, help="Concurrent connections, comma-separated (default: 100,1000, bench.DEFAULT_CLIENTS)."
    ),
    modes: str = typer.Option("on,off", help="BOXOFFICE_AUTO_PIPELINE modes to measure: on, off or on,off."),
    json_path: Path = typer.Option(None, "--json", help="Also write the full report as JSON here."),
) -> None:
    """Run the bounded loopback benchmark and print the report (see loadtests/RESULTS.md)."""
    from loadtests.bench import run_cli

    _exit(
        run_cli(
            resolve_settings(),
            duration_seconds=duration,
            runs=runs,
            clients=[int(c) for c in clients.split(",") if c.strip()] if clients else None,
            modes=[m.strip() == "on" for m in modes.split(",") if m.strip()],
            json_path=json_path,
        )
    )


def _refuse(err) -> None:
    """Print a DomainError's JSON body (the API's error contract) on stderr and exit: 2 for an unknown
    event, 1 for any other refusal."""
    import orjson

    typer.echo(orjson.dumps(err.body(), option=orjson.OPT_INDENT_2).decode(), err=True)
    _exit(2 if err.code == "event_not_found" else 1)


def _event_call(coro_fn, *args):
    """Run ``coro_fn(pool, inventory, *args)`` against the chosen servers; a DomainError exits (``_refuse``)."""
    import asyncpg
    from redis.exceptions import RedisError

    from service import db
    from service.app import redis_client
    from service.errors import DomainError
    from service.inventory import Inventory

    settings = resolve_settings(quiet=True)

    async def go():
        client = redis_client(settings.redis_url, settings)
        pool = await db.create_pool(settings.database_url)
        inventory = Inventory(client, settings)
        try:
            return await coro_fn(pool, inventory, *args)
        finally:
            await pool.close()
            inventory.close()
            await client.aclose()

    try:
        return asyncio.run(go())
    except DomainError as err:
        _refuse(err)
    except asyncpg.UndefinedTableError:
        typer.echo(f"{settings.database_url}: no boxoffice tables; run `boxoffice migrate` first", err=True)
        _exit(1)
    except (RedisError, asyncpg.PostgresError, OSError) as exc:  # a store unreachable or refusing
        typer.echo(f"{type(exc).__name__}: {exc}", err=True)
        _exit(1)


@event_app.command("create")
def event_create(
    file: Path = typer.Argument(..., exists=True, help="Event JSON, as POST /v1/events takes."),
) -> None:
    """Create an event (PostgreSQL and Redis) from a JSON file. Exits 1 with the API's JSON error if refused."""
    import orjson

    from service import catalog
    from service.domain import EventSpec
    from service.errors import DomainError
    from service.http import validate

    try:
        data = orjson.loads(file.read_bytes())
    except orjson.JSONDecodeError as exc:
        _refuse(DomainError("malformed_json", details={"reason": str(exc)}))
    try:
        spec = validate(EventSpec, data)
    except DomainError as err:
        _refuse(err)
    _event_call(catalog.create_event, spec)
    typer.echo(f"created {spec.event_id}")


@event_app.command("show")
def event_show(event_id: str) -> None:
    """Print an event and its live availability as JSON."""
    import orjson

    from service import api, db

    async def show(pool, inventory, eid):
        spec, status = await db.get_event(pool, eid)
        view = api.event_view(spec, status)
        view["availability"] = (await inventory.availability(eid))["zones"]
        return view

    typer.echo(orjson.dumps(_event_call(show, event_id), option=orjson.OPT_INDENT_2).decode())


@event_app.command("pause")
def event_pause(event_id: str) -> None:
    """Refuse new holds (holds already given can still be confirmed)."""
    from service import catalog

    _event_call(catalog.set_status, event_id, "paused")
    typer.echo(f"{event_id}: paused")


@event_app.command("resume")
def event_resume(event_id: str) -> None:
    """Put the event back on sale."""
    from service import catalog

    _event_call(catalog.set_status, event_id, "on_sale")
    typer.echo(f"{event_id}: on_sale")


if __name__ == "__main__":
    sys.exit(app())
