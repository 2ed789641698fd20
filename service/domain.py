"""The sale's rules on the Python side: identifiers, request shapes, normalisation and the hold state machine.

The atomic rules (capacity, seat ownership, expiry, state transitions) are enforced in the Lua scripts
(``lua/``); this module validates what goes into them and names their states. HTTP, workers and load
tests import from here, never the other way round.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from service.errors import DomainError

# Hold state machine: active -> confirmed | released | expired; nothing leaves a terminal state.
HOLD_ACTIVE = "active"
HOLD_STATES = ("active", "confirmed", "released", "expired")
HOLD_TRANSITIONS = {
    "active": {"confirmed", "released", "expired"},
    "confirmed": set(),
    "released": set(),
    "expired": set(),
}

EVENT_ON_SALE, EVENT_PAUSED = "on_sale", "paused"

MAX_HOLD_TTL_SECONDS = 3600
MAX_SEATS_PER_ZONE = 200_000
MAX_SEATS_PER_EVENT = 500_000
"""Five times the largest stadium. The request that creates an event validates and loads all its seats into
Redis and PostgreSQL at once; without a bound one admin body (64 KB of ``rows``) could declare ~38 million."""
MAX_PRICE_CENTS = 1_000_000_000
"""10 million a ticket. With at most 1,000 tickets a customer, every amount stays below 1e14, which the
scripts' cjson encodes exactly (it prints 14 significant digits; a larger amount would be rounded)."""
NO_CONTROL = r"^[^\x00-\x1f\x7f]+$"
"""No control characters: PostgreSQL text cannot hold NUL, and nothing else is meant to be there."""

Ident = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
"""Event and zone ids: 1-64 of letters, digits, '.', '_', '-' (no braces: they would break the hash tag)."""
CustomerId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^\s\x00-\x1f\x7f]+$")]
"""No white space or control characters: PostgreSQL text cannot hold NUL, and an order it refuses
after the buyer saw 201 would end up a dead letter."""
SEAT_RE = re.compile(r"^[A-Z0-9][A-Z0-9._-]{0,31}$")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")


def normalize_seat(label: str) -> str:
    """Seat labels are trimmed and upper-cased: ``" a1 "`` -> ``"A1"``. Raises ValueError if malformed."""
    seat = label.strip().upper()
    if not SEAT_RE.fullmatch(seat):
        raise ValueError(f"seat label {label!r} is not 1-32 of A-Z, 0-9, '.', '_', '-'")
    return seat


def _normalize_unique(labels: list[str]) -> list[str]:
    seats = [normalize_seat(s) for s in labels]
    if len(set(seats)) != len(seats):
        dupes = sorted(s for s, n in Counter(seats).items() if n > 1)
        raise ValueError(f"duplicate seats after normalising: {', '.join(dupes[:20])}")
    return seats


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, strict=True)


class ZoneSpec(_Strict):
    zone_id: Ident
    kind: Literal["ga", "seated"]
    price_cents: int = Field(ge=0, le=MAX_PRICE_CENTS)
    capacity: int | None = Field(default=None, ge=1, le=10_000_000)
    seats: list[str] | None = None
    rows: dict[str, int] | None = None

    @model_validator(mode="after")
    def _shape(self) -> ZoneSpec:
        if self.kind == "ga":
            if self.capacity is None:
                raise ValueError("a ga zone needs capacity")
            if self.seats is not None or self.rows is not None:
                raise ValueError("a ga zone has no seats or rows")
        else:
            if (self.seats is None) == (self.rows is None):
                raise ValueError("a seated zone needs exactly one of seats or rows")
            count = (
                len(self.seats)
                if self.seats is not None
                else sum(_row_count(r, n) for r, n in self.rows.items())
            )
            if not 1 <= count <= MAX_SEATS_PER_ZONE:  # before any label is made
                raise ValueError(f"a seated zone has 1..{MAX_SEATS_PER_ZONE} seats")
            labels = (
                self.seats
                if self.seats is not None
                else [
                    f"{row}{n}"
                    for row, count in self.rows.items()
                    for n in range(1, _row_count(row, count) + 1)
                ]
            )
            self.seats = _normalize_unique(labels)
            self.rows = None  # labels are distinct (or refused above): len(self.seats) == count
            if self.capacity is not None and self.capacity != len(self.seats):
                raise ValueError("capacity of a seated zone is its number of seats")
            self.capacity = len(self.seats)
        return self


def _row_count(row: str, count: int) -> int:
    if not isinstance(count, int) or not 1 <= count <= 10_000:
        raise ValueError(f"row {row!r} needs 1..10000 seats")
    return count


class EventSpec(_Strict):
    """``POST /v1/events`` body; ``zones`` in catalog order."""

    event_id: Ident
    name: str = Field(min_length=1, max_length=200, pattern=NO_CONTROL)
    starts_at: datetime = Field(strict=False)  # strict would refuse the string in validate_python
    hold_ttl_seconds: int = Field(default=600, ge=1, le=MAX_HOLD_TTL_SECONDS)
    max_tickets_per_customer: int = Field(default=10, ge=1, le=1000)
    zones: list[ZoneSpec] = Field(min_length=1, max_length=1000)

    @field_validator("zones", mode="before")
    @classmethod
    def _few_enough_seats(cls, zones: Any) -> Any:
        """The seats of all zones counted from the input, before any zone makes its labels."""
        if isinstance(zones, list):
            count = 0
            for z in zones:
                if isinstance(z, dict) and isinstance(z.get("seats"), list):
                    count += len(z["seats"])
                elif isinstance(z, dict) and isinstance(z.get("rows"), dict):
                    count += sum(n for n in z["rows"].values() if isinstance(n, int) and n > 0)
            if count > MAX_SEATS_PER_EVENT:
                raise ValueError(f"an event has at most {MAX_SEATS_PER_EVENT} seats")
        return zones

    @field_validator("zones")
    @classmethod
    def _distinct(cls, zones: list[ZoneSpec]) -> list[ZoneSpec]:
        ids = [z.zone_id for z in zones]
        if len(set(ids)) != len(ids):
            raise ValueError("zone ids must be distinct")
        if sum(len(z.seats or ()) for z in zones) > MAX_SEATS_PER_EVENT:  # zones given as ZoneSpec objects
            raise ValueError(f"an event has at most {MAX_SEATS_PER_EVENT} seats")
        return zones

    @field_validator("starts_at", mode="before")
    @classmethod
    def _not_a_number(cls, v: Any) -> Any:
        # lax datetime parsing would read a number, or a string of one, as Unix time
        if isinstance(v, int | float) or (isinstance(v, str) and _NUMBER.fullmatch(v)):
            raise ValueError("starts_at is an RFC 3339 date-time string, e.g. 2027-05-24T19:00:00Z")
        return v

    @field_validator("starts_at")
    @classmethod
    def _utc_ms(cls, v: datetime) -> datetime:
        """UTC (assumed when no zone is given), whole milliseconds like every other time of the API, and in
        years 1970-2199: PostgreSQL's timestamptz would store the far ends as +-infinity or refuse them."""
        if 1970 <= v.year <= 2199:  # first as given: converting the far ends to UTC could overflow
            v = v.astimezone(UTC) if v.tzinfo else v.replace(tzinfo=UTC)
        if not 1970 <= v.year <= 2199:
            raise ValueError("starts_at must be in the years 1970-2199 (UTC)")
        return v.replace(microsecond=v.microsecond // 1000 * 1000)


class HoldItem(_Strict):
    zone_id: Ident
    quantity: int | None = Field(default=None, ge=1, le=1000, strict=True)
    seats: list[str] | None = Field(default=None, min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _one_of(self) -> HoldItem:
        if (self.quantity is None) == (self.seats is None):
            raise ValueError("give exactly one of quantity (general admission) or seats (seated zone)")
        if self.seats is not None:
            self.seats = _normalize_unique(self.seats)
        return self

    def as_script_item(self) -> dict[str, Any]:
        if self.seats is not None:
            return {"zone_id": self.zone_id, "seats": self.seats}
        return {"zone_id": self.zone_id, "quantity": self.quantity}


class HoldRequest(_Strict):
    """``POST /v1/events/{event_id}/holds`` body. ``ttl_seconds`` defaults to the event's hold_ttl_seconds."""

    customer_id: CustomerId
    items: list[HoldItem] = Field(min_length=1, max_length=100)
    ttl_seconds: int | None = Field(default=None, ge=1, le=MAX_HOLD_TTL_SECONDS)

    @field_validator("items")
    @classmethod
    def _distinct_zones(cls, items: list[HoldItem]) -> list[HoldItem]:
        ids = [i.zone_id for i in items]
        if len(set(ids)) != len(ids):
            raise ValueError("each zone may appear once in items")
        return items

    def body_sha256(self) -> str:
        """Digest of the normalised request: the same hold asked twice hashes the same (idempotency)."""
        canon = orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(canon).hexdigest()


class ConfirmRequest(_Strict):
    payment_ref: str = Field(min_length=1, max_length=200, pattern=NO_CONTROL)


@dataclass
class DeadOrder:
    """An acknowledged order PostgreSQL refused (``dead_letters``) and its ``orders`` lacks: a person decides
    (refund or re-seat), and until then its stock stays sold (``dead_stock``; read by ``db.dead_orders``,
    which leaves out a second order of a hold that has one in ``orders``: its stock is that order's)."""

    order_id: str
    confirmed_at_ms: float
    ga: dict[str, int]
    """zone -> general-admission tickets."""
    seats: list[tuple[str, str]]
    """(zone, seat) of its seats that the event's seat map has (one it lacks was refused as unknown)."""


def dead_stock(
    orders: list[DeadOrder], taken: dict[tuple[str, str], str] | set[tuple[str, str]]
) -> tuple[dict[str, int], dict[tuple[str, str], str]]:
    """What ``orders`` keep sold: (zone -> tickets, (zone, seat) -> order id). A seat counts only where it is
    theirs: not in ``taken`` (seats other orders have) and not an earlier dead order's (one seat, one owner;
    a dead order refused for a seat sold twice keeps nothing there). General-admission tickets all count."""
    tickets: dict[str, int] = defaultdict(int)
    seats: dict[tuple[str, str], str] = {}
    for o in orders:
        for zone_id, n in o.ga.items():
            tickets[zone_id] += n
        for seat in o.seats:
            if seat not in taken and seat not in seats:
                seats[seat] = o.order_id
                tickets[seat[0]] += 1
    return dict(tickets), seats


def iso_ms(ms: int | None) -> str | None:
    """Epoch milliseconds -> RFC 3339 UTC string with millisecond precision (``2027-05-24T19:00:00.000Z``)."""
    if ms is None:
        return None
    ms = int(ms)
    return _iso_seconds(ms // 1000) + _MILLIS_Z[ms % 1000]


_MILLIS_Z = [f".{m:03d}Z" for m in range(1000)]
"""".000Z" ... ".999Z": a list index instead of a format per timestamp (two per hold reply)."""


@functools.lru_cache(maxsize=4096)
def _iso_seconds(seconds: int) -> str:
    """Cached: every hold of one second shares it, and strftime costs more than the rest of a reply's view."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def check_ident(value: str, what: str) -> str:
    """Path parameters: 404-shaped ids are rejected early as not found, never passed into a key."""
    if not ID_RE.fullmatch(value):
        raise DomainError(f"{what}_not_found")
    return value


def check_idempotency_key(value: str | None) -> str:
    if value is None:
        return ""
    if not IDEMPOTENCY_KEY_RE.fullmatch(value):
        raise DomainError(
            "validation_failed",
            details={"errors": [{"field": "Idempotency-Key", "message": "1-255 visible ASCII characters"}]},
        )
    return value
