"""The deployment files and the README can't drift from the code (no Docker engine here to run them).

docker-compose.yml: every app command is a real ``boxoffice`` command with real options, every variable is
a Settings field, Redis keeps an AOF fsynced every second, Locust only runs under the ``loadtest`` profile.
Dockerfile: its CMD is a real command and it ships what the code reads from disk. README.md: its
settings table lists every Settings field with its default.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices
from typer.testing import CliRunner

from service.cli import app as cli_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
APP_IMAGE = "boxoffice:local"
APP_SERVICES = {name: s for name, s in SERVICES.items() if s.get("image") == APP_IMAGE}


def env_names(field_name: str) -> list[str]:
    """The environment variables pydantic-settings reads for a Settings field."""
    field = Settings.model_fields[field_name]
    if isinstance(field.validation_alias, AliasChoices):
        return [str(c) for c in field.validation_alias.choices]
    return [f"{Settings.model_config['env_prefix']}{field_name}".upper()]


SETTINGS_ENV = {name for field in Settings.model_fields for name in env_names(field)}


def check_cli(argv: list[str]) -> None:
    """Parse ``argv`` (without ``boxoffice``) as the CLI would, without running it.

    ``--help`` is appended: the parser still rejects an unknown command or option (exit 2), but a valid
    line stops at the help text instead of running (so option values are not type-checked). Raises
    AssertionError with the CLI's message.
    """
    result = CliRunner().invoke(cli_app, [*argv, "--help"], prog_name="boxoffice")
    assert result.exit_code == 0, f"boxoffice {' '.join(argv)}: {result.output}"
    words = [a for a in argv if not a.startswith("-")]
    assert f"Usage: boxoffice {words[0]}" in " ".join(result.output.split()), result.output


def command_of(service: dict[str, Any]) -> list[str]:
    """The service's command as a list ([] when it runs its image's default)."""
    cmd = service.get("command", [])
    return [str(c) for c in cmd] if isinstance(cmd, list) else cmd.split()


def test_the_cli_check_catches_mistakes() -> None:
    for wrong in (["serve", "--no-such-option"], ["no-such-command"], ["event", "no-such-subcommand"]):
        with pytest.raises(AssertionError):
            check_cli(wrong)
    check_cli(["serve", "--workers", "4", "--no-migrate"])
    check_cli(["event", "show", "demo"])


def test_every_app_service_runs_a_real_boxoffice_command() -> None:
    assert {"migrate", "api", "worker"} <= set(APP_SERVICES)
    expected = {"migrate": "migrate", "api": "serve", "worker": "worker"}
    for name, sub in expected.items():
        cmd = command_of(SERVICES[name])
        assert cmd[:2] == ["boxoffice", sub], name
    for name, service in APP_SERVICES.items():
        cmd = command_of(service)
        assert cmd, f"{name}: say which command it runs"
        if cmd[0] == "locust":
            continue
        assert cmd[0] == "boxoffice", name
        check_cli(cmd[1:])


def test_app_environment_names_are_settings() -> None:
    for name, service in APP_SERVICES.items():
        env = service.get("environment", {})
        assert isinstance(env, dict), f"{name}: use the mapping form for environment"
        assert {"REDIS_URL", "DATABASE_URL"} <= set(env), name
        unknown = set(env) - SETTINGS_ENV
        assert not unknown, f"{name}: {sorted(unknown)} are not Settings fields"
        for key, value in env.items():  # each value must parse as its field's type
            field = next(f for f in Settings.model_fields if key in env_names(f))
            if "${" not in str(value):
                Settings.model_validate({field: value} if key.startswith("BOXOFFICE_") else {key: value})


def test_api_runs_several_uvicorn_workers_after_migrate() -> None:
    api = SERVICES["api"]
    assert int(api["environment"]["BOXOFFICE_WEB_WORKERS"]) > 1
    for name in ("api", "worker"):
        assert SERVICES[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert SERVICES["migrate"]["restart"] == "no"
    for service in SERVICES.values():
        for dependency in service.get("depends_on", {}):
            assert dependency in SERVICES


def test_redis_keeps_an_aof_fsynced_every_second_and_never_evicts() -> None:
    cmd = command_of(SERVICES["redis"])
    options = {cmd[i]: str(cmd[i + 1]) for i in range(1, len(cmd) - 1, 2)}
    assert cmd[0] == "redis-server"
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] == "everysec"
    assert options["--maxmemory-policy"] == "noeviction"
    assert any(v.endswith(":/data") for v in SERVICES["redis"]["volumes"])


def test_locust_runs_only_under_the_loadtest_profile() -> None:
    runs_locust = {name for name, s in SERVICES.items() if command_of(s)[:1] == ["locust"]}
    assert runs_locust == {"locust"}
    for name, service in SERVICES.items():
        assert service.get("profiles", []) == (["loadtest"] if name in runs_locust else []), name
    cmd = command_of(SERVICES["locust"])
    locustfile = cmd[cmd.index("-f") + 1]
    assert locustfile == "loadtests/flash_sale.py"
    assert (ROOT / locustfile).is_file()
    assert cmd[cmd.index("--host") + 1] == "http://api:8000"


def test_dockerfile_runs_a_real_command_and_ships_what_the_code_reads() -> None:
    text = (ROOT / "Dockerfile").read_text()
    cmd_lines = [line for line in text.splitlines() if line.startswith(("CMD", "ENTRYPOINT"))]
    assert [line.split()[0] for line in cmd_lines] == ["CMD"]
    cmd = json.loads(cmd_lines[0].removeprefix("CMD"))
    assert cmd[0] == "boxoffice"
    check_cli(cmd[1:])
    copied = {line.split()[1] for line in text.splitlines() if line.startswith("COPY")}
    for needed in ("service", "workers", "loadtests", "lua", "migrations"):
        assert needed in copied, needed
    # lua/ and migrations/ are found beside the packages: the install must be in place (editable).
    assert re.search(r"pip install -e '\.\[load\]'", text)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".boxoffice" in ignored and ".git" in ignored


def readme_settings_rows() -> dict[str, list[str]]:
    """``ENV_NAME -> cells`` of the README's settings table (rows starting with a backquoted env name)."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells and re.fullmatch(r"`[A-Z_]+`( / `[A-Z_]+`)*", cells[0]):
            for name in re.findall(r"`([A-Z_]+)`", cells[0]):
                rows[name] = cells
    return rows


def test_readme_lists_every_setting_with_its_default() -> None:
    rows = readme_settings_rows()
    for field_name, field in Settings.model_fields.items():
        names = env_names(field_name)
        documented = [n for n in names if n in rows]
        assert documented, f"README settings table lacks {names[0]} ({field_name})"
        default = "none" if field.default is None else json.dumps(field.default).strip('"')
        if isinstance(field.default, bool):
            default = str(field.default).lower()
        assert f"`{default}`" in rows[documented[0]][1], f"{names[0]}: default {default!r} not in README"
    assert set(rows) <= SETTINGS_ENV, f"README documents unknown settings: {sorted(set(rows) - SETTINGS_ENV)}"
