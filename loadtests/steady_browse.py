"""Steady browsing: availability and seat-map reads, with a trickle of holds alongside, then the audit.

Headless, one command (API up with ``boxoffice serve``; for the audit ``REDIS_URL``, ``DATABASE_URL`` and a
running ``boxoffice worker``)::

    locust -f loadtests/steady_browse.py --headless -u 500 -r 100 -t 60s --host http://127.0.0.1:8000

Web UI: ``locust -f loadtests/steady_browse.py --host http://127.0.0.1:8000``. The options are those of
``loadtests/flash_sale.py``; here ``--sale-tickets`` defaults to 20,000 (0 means that too: the event
does not sell out), ``--demand-ratio`` is not used, and ``--hold-ttl`` defaults to 10 s.

Each user, 1-3 s apart: reads availability (weight 10), pages through a seat map (weight 6: a page of
100 seats, any status or only available ones, from a random place), reads the event (weight 2), or buys
(weight 1): holds 1-4 tickets (seats, or general admission when the event has such a zone), then confirms
(60 %) or releases (40 %) after a short think time. Only the holds of users stopped in their think time are
left to expire: the audit at ``test_stop`` waits for them (at most ``--audit-drain-timeout`` or ``--hold-ttl``
+ 10 s, whichever is longer, and for the service to reap them, the audit's reap grace of 5 s more).
"""

from __future__ import annotations

import random
import uuid
from typing import Any

import gevent
from locust import FastHttpUser, between, events, task

from loadtests import common


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    common.add_arguments(parser, tickets=20_000, hold_ttl_seconds=10, demand_ratio=1.0)


def _event_body(event_id: str, options: Any, user_count: int) -> dict[str, Any]:
    return common.sale_event_body(event_id, options.sale_tickets or 20_000)


common.install(_event_body, id_prefix="browse")


class Browser(FastHttpUser):
    wait_time = between(1, 3)

    @task(10)
    def availability(self) -> None:
        sale = common.current_sale()
        if sale:
            self.client.get(f"/v1/events/{sale.event_id}/availability", name="GET availability")

    @task(6)
    def seat_map(self) -> None:
        sale = common.current_sale()
        if not sale or not sale.zone("seated"):
            return
        zone = random.choice(sale.zone("seated"))
        params = f"limit=100&after={random.choice(zone.seats)}"
        if random.random() < 0.5:
            params += "&status=available"
        self.client.get(f"/v1/events/{sale.event_id}/zones/{zone.zone_id}/seats?{params}", name="GET seats")

    @task(2)
    def event(self) -> None:
        sale = common.current_sale()
        if sale:
            self.client.get(f"/v1/events/{sale.event_id}", name="GET event")

    @task(1)
    def buy(self) -> None:
        sale = common.current_sale()
        if not sale:
            return
        base = f"/v1/events/{sale.event_id}"
        if sale.zone("seated") and (not sale.zone("ga") or random.random() < 0.5):
            zone = random.choice(sale.zone("seated"))
            n = random.randint(1, 4)
            start = random.randrange(0, max(1, len(zone.seats) - n))
            item = {"zone_id": zone.zone_id, "seats": zone.seats[start : start + n]}
        else:
            item = {
                "zone_id": random.choice(sale.zone("ga")).zone_id,
                "quantity": random.randint(1, 4),
            }
        body = {
            "customer_id": common.new_customer_id(),
            "items": [item],
            "ttl_seconds": sale.hold_ttl_seconds,
        }
        with self.client.post(
            f"{base}/holds",
            json=body,
            headers={"Idempotency-Key": uuid.uuid4().hex},
            name="POST holds",
            catch_response=True,
        ) as resp:
            if resp.status_code != 201:
                if resp.status_code == 409:
                    resp.success()  # seats taken or sold out: a normal answer
                else:
                    resp.failure(f"{resp.status_code} {(resp.text or str(resp.error))[:200]}")
                return
            hold = resp.json()
        gevent.sleep(random.uniform(0.1, 1.0))
        if random.random() < 0.6:
            with self.client.post(
                f"{base}/holds/{hold['hold_id']}/confirm",
                json={"payment_ref": "pay"},
                name="POST confirm",
                catch_response=True,
            ) as resp:
                if resp.status_code != 201:
                    resp.failure(f"{resp.status_code} {(resp.text or str(resp.error))[:200]}")
                    return
                order = resp.json()
            sale.acks.confirmed(order, hold)
        else:
            with self.client.post(
                f"{base}/holds/{hold['hold_id']}/release", name="POST release", catch_response=True
            ) as resp:
                if resp.status_code != 200:
                    resp.failure(f"{resp.status_code} {(resp.text or str(resp.error))[:200]}")
                    return
                status = resp.json()["status"]  # a hold past its TTL answers 200 {"status": "expired"}
            sale.acks.record("released" if status == "released" else "expired", hold_id=hold["hold_id"])
