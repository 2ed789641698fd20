"""Clients for MULTI / WATCH on the keys of one hash slot, on a single Redis server and on a Redis Cluster.

Every key of one event shares the hash tag ``{evt:<event_id>}`` (``service/keys.py``), so a transaction over
an event's keys is legal on a Redis Cluster too (https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/#hash-tags).
redis-py's cluster client cannot send one: its pipeline refuses ``transaction=True`` and it has no WATCH
(redis-py 5, ``RedisCluster.pipeline``; arq's Cluster issue python-arq/arq#385 describes the same gap). The
scripts do not need this (EVALSHA is routed by its first key); the ops paths that read or repair an event
with MULTI / WATCH (outbox acks, reconciliation, rebuild, loading an event) do.

``SlotClients(client).for_key(key)`` answers ``client`` itself for a single server, and for a cluster a plain
``redis.asyncio.Redis`` on the primary that owns ``key``'s slot (one per node, kept until ``aclose``), with
the cluster client's connection options (password, timeouts, retries). Everything sent through it must
touch that slot only.

Failure: a slot that moved to another node after the cluster client last read the slot map is answered
with a ``MOVED`` error reply (``redis.exceptions.ResponseError``), before anything of the transaction ran
(https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/#moved-redirection). Callers
treat it like any other Redis error: the outbox retries the pass, reconcile and rebuild exit and can be run
again. The next ``for_key`` call sees the new owner once the cluster client has followed a redirection
(its own commands do, e.g. the outbox's reads).
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

MAX_CONNECTIONS = 64
"""Most connections a ``SlotClients`` opens to one node (the cluster client's own cap, if lower, wins)."""


class SlotClients:
    """Per-node plain clients of one cluster client; for a single server, that client itself."""

    def __init__(self, client: aioredis.Redis | RedisCluster):
        self.client = client
        self._nodes: dict[str, aioredis.Redis] = {}

    async def for_key(self, key: str) -> aioredis.Redis:
        """A client whose MULTI / WATCH reach the server that owns ``key``'s slot. Raises RedisError when
        the cluster's slot map cannot be read (no node answers), ``SlotNotCoveredError`` for a slot no
        node serves."""
        client = self.client
        if not isinstance(client, RedisCluster):
            return client
        await client.initialize()  # reads the slot map once; a no-op after that
        node = client.get_node_from_key(key)
        plain = self._nodes.get(node.name)
        if plain is None:
            # As many connections as the cluster client allows a node; more callers wait for one.
            kwargs = node.connection_kwargs
            pool = aioredis.BlockingConnectionPool(
                connection_class=node.connection_class,
                max_connections=min(node.max_connections, MAX_CONNECTIONS),
                timeout=kwargs.get("socket_timeout") or 5.0,
                **kwargs,
            )
            plain = self._nodes[node.name] = aioredis.Redis.from_pool(pool)
        return plain

    async def aclose(self) -> None:
        """Close the per-node clients and their connections (not the cluster client, which the caller owns)."""
        nodes, self._nodes = list(self._nodes.values()), {}
        for plain in nodes:
            await plain.aclose()  # from_pool: closes the pool's connections too
