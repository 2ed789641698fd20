"""Apply the SQL migrations in ``migrations/`` with yoyo (it records what ran in ``_yoyo_migration``)."""

from __future__ import annotations

from pathlib import Path

from yoyo import get_backend, read_migrations

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def yoyo_url(database_url: str) -> str:
    """``postgresql://...`` -> ``postgresql+psycopg://...`` (yoyo's driver name for psycopg 3)."""
    scheme, rest = database_url.split("://", 1)
    return f"postgresql+psycopg://{rest}" if scheme in ("postgres", "postgresql") else database_url


def migrate(database_url: str) -> list[str]:
    """Apply every pending migration under yoyo's lock; returns the ids applied (empty if up to date).

    Raises psycopg.OperationalError if the database does not answer; a failing migration is rolled back
    and its error raised.
    """
    backend = get_backend(yoyo_url(database_url))
    migrations = read_migrations(str(MIGRATIONS_DIR))
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    return [m.id for m in pending]
