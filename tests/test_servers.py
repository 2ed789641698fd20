"""service.servers: which Redis / PostgreSQL gets chosen, and the embedded ones really work."""

from __future__ import annotations

import socket

import psycopg
import pytest
import redis

from service.servers import Servers, choose_servers
from service.settings import Settings

SERVER_ENV = [
    "REDIS_URL",
    "BOXOFFICE_REDIS_URL",
    "DATABASE_URL",
    "BOXOFFICE_DATABASE_URL",
    "BOXOFFICE_EMBEDDED",
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in SERVER_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def port_of(url: str) -> int:
    return int(url.split("@")[-1].split("//")[-1].split("/")[0].rsplit(":", 1)[1])


def port_closed(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return True
    return False


@pytest.mark.embedded
def test_embedded_servers_work_and_keep_data_across_restarts(clean_env, tmp_path) -> None:
    servers = choose_servers(Settings(), data_dir=str(tmp_path), force_embedded=True)
    try:
        assert (servers.redis_source, servers.database_source) == ("embedded", "embedded")
        assert servers.database_url.endswith("/boxoffice")
        r = redis.Redis.from_url(servers.redis_url)
        assert r.ping()
        assert r.info("server")["redis_version"].startswith("6.2")
        r.set("survivor", "yes")
        r.close()
        with psycopg.connect(servers.database_url) as conn:
            assert "PostgreSQL 18" in conn.execute("select version()").fetchone()[0]
            conn.execute("create table survivor (name text)")
            conn.execute("insert into survivor values ('yes')")
    finally:
        servers.stop()
    assert port_closed(port_of(servers.redis_url))
    assert port_closed(port_of(servers.database_url))
    servers.stop()  # idempotent

    again = choose_servers(Settings(), data_dir=str(tmp_path), force_embedded=True)
    try:
        r = redis.Redis.from_url(again.redis_url)
        assert r.get("survivor") == b"yes"
        r.close()
        with psycopg.connect(again.database_url) as conn:
            assert conn.execute("select name from survivor").fetchall() == [("yes",)]
    finally:
        again.stop()
    assert port_closed(port_of(again.redis_url))
    assert port_closed(port_of(again.database_url))


def test_env_urls_are_used_as_given(clean_env, tmp_path) -> None:
    clean_env.setenv("REDIS_URL", "redis://cache.example:6390/2")
    clean_env.setenv("DATABASE_URL", "postgresql://app:secret@db.example:5433/tickets")
    servers = choose_servers(Settings(), data_dir=str(tmp_path))
    assert servers == Servers(
        "redis://cache.example:6390/2",
        "postgresql://app:secret@db.example:5433/tickets",
        "env",
        "env",
        servers.redis_reason,
        servers.database_reason,
    )
    assert "secret" not in servers.describe()
    assert len(servers.describe().splitlines()) == 2
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written
    servers.stop()


def test_explicit_urls_win_over_boxoffice_embedded(clean_env, tmp_path) -> None:
    """BOXOFFICE_EMBEDDED means "embedded rather than local", not "ignore the URLs I was given": child
    processes (uvicorn, workers) are handed the URLs their parent chose and must use those."""
    clean_env.setenv("BOXOFFICE_EMBEDDED", "1")
    clean_env.setenv("REDIS_URL", "redis://127.0.0.1:6390/2")
    clean_env.setenv("DATABASE_URL", "postgresql://app@127.0.0.1:5433/tickets")
    servers = choose_servers(Settings(), data_dir=str(tmp_path))
    assert (servers.redis_source, servers.database_source) == ("env", "env")
    assert list(tmp_path.iterdir()) == []
    servers.stop()


def test_local_servers_are_preferred_when_they_answer(clean_env, tmp_path) -> None:
    if port_closed(6379) or port_closed(5432):
        pytest.skip("needs Redis on 127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432")
    servers = choose_servers(Settings(), data_dir=str(tmp_path))
    assert (servers.redis_source, servers.database_source) == ("local", "local")
    assert servers.redis_url == "redis://127.0.0.1:6379/0"
    assert servers.database_url == "postgresql://postgres@127.0.0.1:5432/boxoffice"
    with psycopg.connect(servers.database_url, connect_timeout=2) as conn:
        assert conn.execute("select current_database()").fetchone() == ("boxoffice",)
    assert list(tmp_path.iterdir()) == []
    servers.stop()  # started nothing, stops nothing
    assert not port_closed(6379) and not port_closed(5432)
