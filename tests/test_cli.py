"""The `boxoffice` CLI's event commands, in-process (Typer's CliRunner) against the real servers."""

from __future__ import annotations

import json

import pytest
from conftest import event_body
from typer.testing import CliRunner

from service.cli import app
from service.settings import get_settings


@pytest.fixture
def cli_env(settings, monkeypatch):
    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def test_event_create_show_pause_resume(cli_env, tmp_path):
    body = event_body()
    path = tmp_path / "event.json"
    path.write_text(json.dumps(body))
    eid = body["event_id"]

    r = cli_env.invoke(app, ["event", "create", str(path)])
    assert r.exit_code == 0, r.output
    r = cli_env.invoke(app, ["event", "create", str(path)])
    assert r.exit_code == 1 and "event_exists" in r.output

    r = cli_env.invoke(app, ["event", "show", eid])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.stdout)
    assert shown["status"] == "on_sale"
    assert [z["available"] for z in shown["availability"]] == [100, 20]

    assert cli_env.invoke(app, ["event", "pause", eid]).exit_code == 0
    assert json.loads(cli_env.invoke(app, ["event", "show", eid]).stdout)["status"] == "paused"
    assert cli_env.invoke(app, ["event", "resume", eid]).exit_code == 0
    assert json.loads(cli_env.invoke(app, ["event", "show", eid]).stdout)["status"] == "on_sale"


def test_event_create_refuses_an_invalid_file(cli_env, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"event_id": "x"}))
    r = cli_env.invoke(app, ["event", "create", str(path)])
    assert r.exit_code == 1 and "validation_failed" in r.output


def test_every_command_has_help(cli_env):
    for cmd in (
        ["serve"],
        ["worker"],
        ["migrate"],
        ["dev"],
        ["reconcile"],
        ["rebuild"],
        ["audit"],
        ["bench"],
        ["event", "create"],
        ["event", "show"],
        ["event", "pause"],
        ["event", "resume"],
    ):
        r = cli_env.invoke(app, [*cmd, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output, cmd


def test_bench_measures_at_the_default_concurrencies_unless_told(cli_env, monkeypatch):
    from loadtests import bench

    seen = []
    monkeypatch.setattr(bench, "run_cli", lambda settings, **kw: seen.append(kw["clients"]) or 0)
    assert cli_env.invoke(app, ["bench"]).exit_code == 0
    assert cli_env.invoke(app, ["bench", "--clients", "50, 400"]).exit_code == 0
    assert seen == [None, [50, 400]]  # None: run_cli takes bench.DEFAULT_CLIENTS


@pytest.mark.parametrize("command", ["show", "pause", "resume"])
def test_event_commands_on_an_unknown_event_say_so(cli_env, command):
    r = cli_env.invoke(app, ["event", command, "no-such-event"])
    assert r.exit_code == 2, r.output
    assert json.loads(r.stderr)["error"]["code"] == "event_not_found"
    assert "Traceback" not in r.output


def test_event_create_refuses_a_file_that_is_not_json(cli_env, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{bad")
    r = cli_env.invoke(app, ["event", "create", str(path)])
    assert r.exit_code == 1, r.output
    assert json.loads(r.stderr)["error"]["code"] == "malformed_json"


def test_event_commands_on_a_database_not_migrated_say_what_to_do(cli_env, settings, monkeypatch):
    import uuid

    import psycopg

    base, _, _ = settings.database_url.rpartition("/")
    name = f"boxoffice_empty_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        monkeypatch.setenv("DATABASE_URL", f"{base}/{name}")
        get_settings.cache_clear()
        r = cli_env.invoke(app, ["event", "show", "any"])
        assert r.exit_code == 1 and "boxoffice migrate" in r.stderr, r.output
        assert "Traceback" not in r.output
    finally:
        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
