"""Redis key names. Every key of one event shares the hash tag ``{evt:<event_id>}`` (one Cluster slot).

The full layout is documented once, in ``lua/includes/common.lua``.
"""

EVENTS_KEY = "boxoffice:events"
"""Set of every event id loaded into Redis (read by the sweeper and ops tools, never inside a script)."""


def prefix(event_id: str) -> str:
    return f"{{evt:{event_id}}}:"


def meta(event_id: str) -> str:
    return prefix(event_id) + "meta"


def zone(event_id: str, zone_id: str) -> str:
    return f"{prefix(event_id)}zone:{zone_id}"


def seats(event_id: str, zone_id: str) -> str:
    return f"{prefix(event_id)}seats:{zone_id}"


def owners(event_id: str, zone_id: str) -> str:
    return f"{prefix(event_id)}owner:{zone_id}"


def hold(event_id: str, hold_id: str) -> str:
    return f"{prefix(event_id)}hold:{hold_id}"


def expiry(event_id: str) -> str:
    return prefix(event_id) + "expiry"


def customers(event_id: str) -> str:
    return prefix(event_id) + "customers"


def order(event_id: str, order_id: str) -> str:
    return f"{prefix(event_id)}order:{order_id}"


def outbox(event_id: str) -> str:
    return prefix(event_id) + "outbox"
