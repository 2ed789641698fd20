"""Flash sale: every user arrives within seconds for one event, demand far above supply, then the audit.

Headless, one command (the API must be up: ``boxoffice serve``; the audit needs ``REDIS_URL`` and
``DATABASE_URL`` of that deployment and a running ``boxoffice worker`` to drain the write-through)::

    locust -f loadtests/flash_sale.py --headless -u 2000 -r 1000 -t 60s --host http://127.0.0.1:8000

Web UI: ``locust -f loadtests/flash_sale.py --host http://127.0.0.1:8000`` and open http://localhost:8089.
Distributed on one machine: ``--master`` plus ``--worker`` processes (``--processes 4`` does both).
Options (``loadtests/common.py``, ``add_arguments``; the web UI shows them too): ``--sale-tickets``
(default 0: users x 2.5 / ``--demand-ratio``, default 20, so first-wave demand is 20x supply; but at least 40 tickets, 10 per
zone, so below 320 users the ratio is lower: 100 users make 6x), ``--hold-ttl`` (5 s),
``--event-id``, ``--acks-dir``, ``--audit-drain-timeout`` (30 s), ``--skip-audit``, ``--admin-token``
(``BOXOFFICE_ADMIN_TOKEN``).

On ``test_start`` a new event is created (two general-admission zones and two seated zones, a quarter of
the tickets each). Each simulated customer, in a loop with 0.5-1.5 s between customers:

* reads availability (half of them), and for seats sometimes the seat map (first available seats);
* holds 1-4 tickets: general admission (45 %), specific seats (45 %, front rows hot: most start near seat
  0 of the map), or both (10 %), with a short ``ttl_seconds``; ``sold_out`` / ``seats_unavailable`` are
  retried twice with a new pick; 10 % double-click (two concurrent POSTs, one Idempotency-Key) and 10 %
  retry the POST with the same key after the answer (expect ``200`` with the same hold);
* then 70 % confirm after a think time (of those, 10 % arrive after the hold expired and expect ``409
  hold_expired``, 10 % double-click confirm, 20 % confirm again later and expect ``200`` with the same order,
  30 % read the order back), 20 % abandon the hold (it must expire), 10 % release it.

Expected refusals (sold out, seats taken, hold expired) count as successes in Locust's stats; anything
else (5xx, a replay with another hold, a repeat confirm with another order) is a failure. Every ``201
confirmed`` and every abandoned/released/expired hold is recorded for the audit (``loadtests/common.py``);
``test_stop`` runs ``boxoffice audit`` and the process exits 1 if it finds a violation.
"""

from __future__ import annotations

import math
import random
import uuid
from typing import Any

import gevent
from locust import FastHttpUser, between, events, task

from loadtests import common

CONFIRM, ABANDON = 0.70, 0.20  # the rest (10 %) release
LATE_CONFIRM, DOUBLE_CONFIRM, REPEAT_CONFIRM, READ_ORDER = 0.10, 0.10, 0.20, 0.30
DOUBLE_HOLD, RETRY_HOLD = 0.10, 0.10
READ_AVAILABILITY, READ_SEAT_MAP = 0.5, 0.3
HOLD_ATTEMPTS = 3
LOST_RACE = {"sold_out", "seats_unavailable"}


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    common.add_arguments(parser, tickets=0, hold_ttl_seconds=5, demand_ratio=20.0)


def _event_body(event_id: str, options: Any, user_count: int) -> dict[str, Any]:
    tickets = options.sale_tickets or max(40, math.ceil(user_count * 2.5 / options.demand_ratio))
    return common.sale_event_body(event_id, tickets)


common.install(_event_body, id_prefix="flash")


def _code(resp: Any) -> str | None:
    try:
        return resp.json()["error"]["code"]
    except Exception:
        return None


class FlashSaleCustomer(FastHttpUser):
    wait_time = between(0.5, 1.5)

    @task
    def buy(self) -> None:
        sale = common.current_sale()
        if sale is None:
            return
        base = f"/v1/events/{sale.event_id}"
        customer_id = common.new_customer_id()
        if random.random() < READ_AVAILABILITY:
            self.client.get(f"{base}/availability", name="GET availability")
        hold = None
        for _ in range(HOLD_ATTEMPTS):
            items = self._pick(sale, base)
            if not items:
                return
            hold, lost_race = self._hold(sale, base, customer_id, items)
            if hold is not None or not lost_race:
                break
        if hold is None:
            return
        fate = random.random()
        if fate < CONFIRM:
            self._confirm(sale, base, hold)
        elif fate < CONFIRM + ABANDON:
            sale.acks.record("abandoned", hold_id=hold["hold_id"])
        else:
            self._release(sale, base, hold)

    # Picking --------------------------------------------------------------------------------------

    def _pick(self, sale: common.Sale, base: str) -> list[dict[str, Any]]:
        """1-4 tickets: general admission, seats, or 1-2 of each (an existing event may lack one kind)."""
        r = random.random()
        has_ga, has_seats = bool(sale.zone("ga")), bool(sale.zone("seated"))
        if has_ga and (r < 0.45 or not has_seats):
            return [self._ga(sale, random.randint(1, 4))]
        if r < 0.90 or not has_ga:
            item = self._seats(sale, base, random.randint(1, 4))
            return [item] if item else []
        item = self._seats(sale, base, random.randint(1, 2))
        return [self._ga(sale, random.randint(1, 2))] + ([item] if item else [])

    def _ga(self, sale: common.Sale, quantity: int) -> dict[str, Any]:
        """The first general-admission zone is the hot one (weights 1, 0.43, 0.18, ...)."""
        zones = sale.zone("ga")
        zone = random.choices(zones, weights=[0.43**i for i in range(len(zones))])[0]
        return {"zone_id": zone.zone_id, "quantity": quantity}

    def _seats(self, sale: common.Sale, base: str, n: int) -> dict[str, Any] | None:
        zone = random.choice(sale.zone("seated"))
        if random.random() < READ_SEAT_MAP:
            with self.client.get(
                f"{base}/zones/{zone.zone_id}/seats?status=available&limit=50",
                name="GET seats",
                catch_response=True,
            ) as resp:
                if resp.status_code != 200:
                    resp.failure(f"{resp.status_code} {(resp.text or str(resp.error))[:200]}")
                    return None
                free = [s["seat"] for s in resp.json()["seats"]]
            if not free:
                return None
            return {"zone_id": zone.zone_id, "seats": free[:n]}
        start = common.front_heavy_index(len(zone.seats), n)
        return {"zone_id": zone.zone_id, "seats": zone.seats[start : start + n]}

    # Holding --------------------------------------------------------------------------------------

    def _post_hold(self, base: str, body: dict, key: str, name: str) -> tuple[int, dict | None, str | None]:
        """One POST; returns (status, hold or None, error code or None)."""
        with self.client.post(
            f"{base}/holds", json=body, headers={"Idempotency-Key": key}, name=name, catch_response=True
        ) as resp:
            if resp.status_code in (200, 201):
                return resp.status_code, resp.json(), None
            code = _code(resp)
            if resp.status_code == 409 and code in LOST_RACE:
                resp.success()
                return 409, None, code
            resp.failure(f"{resp.status_code} {code or (resp.text or str(resp.error))[:200]}")
            return resp.status_code, None, code

    def _hold(
        self, sale: common.Sale, base: str, customer_id: str, items: list[dict]
    ) -> tuple[dict | None, bool]:
        """Hold (with double clicks and same-key retries). Returns (hold or None, lost the race to others)."""
        body = {"customer_id": customer_id, "items": items, "ttl_seconds": sale.hold_ttl_seconds}
        key = uuid.uuid4().hex
        mode = random.random()
        if mode < DOUBLE_HOLD:
            second = gevent.spawn(self._post_hold, base, body, key, "POST holds (double click)")
            results = [self._post_hold(base, body, key, "POST holds"), second.get()]
        else:
            results = [self._post_hold(base, body, key, "POST holds")]
            if mode < DOUBLE_HOLD + RETRY_HOLD and results[0][1] is not None:
                results.append(self._post_hold(base, body, key, "POST holds (retry same key)"))
                if results[-1][0] != 200:
                    self._fail("hold retry", f"a repeat with the same Idempotency-Key got {results[-1][0]}")
        holds = {r[1]["hold_id"]: r[1] for r in results if r[1] is not None}
        if len(holds) > 1:
            self._fail("hold idempotency", f"one Idempotency-Key gave holds {', '.join(holds)}")
            for extra in list(holds)[1:]:
                sale.acks.record("abandoned", hold_id=extra)
        lost = any(r[2] in LOST_RACE for r in results)
        return (next(iter(holds.values())) if holds else None), lost

    # After the hold -------------------------------------------------------------------------------

    def _post_confirm(self, base: str, hold: dict, name: str) -> tuple[int, dict | None, str | None]:
        with self.client.post(
            f"{base}/holds/{hold['hold_id']}/confirm",
            json={"payment_ref": f"pay-{hold['hold_id']}"},
            name=name,
            catch_response=True,
        ) as resp:
            if resp.status_code in (200, 201):
                return resp.status_code, resp.json(), None
            code = _code(resp)
            if resp.status_code == 409 and code == "hold_expired":
                resp.success()
                return 409, None, code
            resp.failure(f"{resp.status_code} {code or (resp.text or str(resp.error))[:200]}")
            return resp.status_code, None, code

    def _confirm(self, sale: common.Sale, base: str, hold: dict) -> None:
        ttl = sale.hold_ttl_seconds
        late = random.random() < LATE_CONFIRM
        gevent.sleep(ttl + 0.3 + random.random() * 0.7 if late else random.uniform(0.2, ttl * 0.6))
        name = "POST confirm (late)" if late else "POST confirm"
        if random.random() < DOUBLE_CONFIRM:
            second = gevent.spawn(self._post_confirm, base, hold, "POST confirm (double click)")
            results = [self._post_confirm(base, hold, name), second.get()]
        else:
            results = [self._post_confirm(base, hold, name)]
        orders = {}
        for status, order, _ in results:
            if status == 201:
                sale.acks.confirmed(order, hold)
            if order is not None:
                orders[order["order_id"]] = order
        if len(orders) > 1:
            self._fail("confirm idempotency", f"hold {hold['hold_id']} gave orders {', '.join(orders)}")
        if not orders:
            if any(code == "hold_expired" for _, _, code in results):
                sale.acks.record("expired", hold_id=hold["hold_id"])
            return
        order = next(iter(orders.values()))
        if random.random() < REPEAT_CONFIRM:
            gevent.sleep(random.uniform(0.05, 0.5))
            status, again, _ = self._post_confirm(base, hold, "POST confirm (repeat)")
            if status != 200 or again is None or again["order_id"] != order["order_id"]:
                self._fail(
                    "confirm repeat",
                    f"repeat confirm of {hold['hold_id']}: {status} "
                    f"{again and again['order_id']} (first {order['order_id']})",
                )
                if status == 201 and again is not None:
                    sale.acks.confirmed(again, hold)
        if random.random() < READ_ORDER:
            self.client.get(f"{base}/orders/{order['order_id']}", name="GET order")

    def _release(self, sale: common.Sale, base: str, hold: dict) -> None:
        gevent.sleep(random.uniform(0.1, sale.hold_ttl_seconds * 0.5))
        with self.client.post(
            f"{base}/holds/{hold['hold_id']}/release", name="POST release", catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code} {_code(resp) or (resp.text or str(resp.error))[:200]}")
                return
            status = resp.json()["status"]
        sale.acks.record("released" if status == "released" else "expired", hold_id=hold["hold_id"])

    def _fail(self, name: str, message: str) -> None:
        """Count a broken promise of the API (idempotency) as a failure in Locust's stats."""
        self.environment.events.request.fire(
            request_type="CHECK",
            name=name,
            response_time=0,
            response_length=0,
            exception=AssertionError(message),
            context={},
        )
