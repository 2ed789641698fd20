-- The catalog (events, zones, seats) and the durable record of sales (orders, order_items),
-- with the backstops that make PostgreSQL refuse an oversell even if Redis were wrong:
--   * zones.sold is bumped in the same transaction as the order rows, and CHECK (sold <= capacity);
--   * a seat can appear in one order item only (unique index), and only a seat of the catalog (FK).
-- Applied by `boxoffice migrate` (yoyo records it in _yoyo_migration).

CREATE TABLE events (
    event_id                  text PRIMARY KEY,
    name                      text NOT NULL,
    starts_at                 timestamptz NOT NULL,
    hold_ttl_seconds          integer NOT NULL CHECK (hold_ttl_seconds BETWEEN 1 AND 3600),
    max_tickets_per_customer  integer NOT NULL CHECK (max_tickets_per_customer >= 1),
    status                    text NOT NULL DEFAULT 'on_sale' CHECK (status IN ('on_sale', 'paused')),
    created_at                timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE zones (
    event_id     text NOT NULL REFERENCES events (event_id) ON DELETE CASCADE,
    zone_id      text NOT NULL,
    position     integer NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('ga', 'seated')),
    capacity     integer NOT NULL CHECK (capacity >= 1),
    price_cents  bigint NOT NULL CHECK (price_cents >= 0),
    sold         integer NOT NULL DEFAULT 0,
    PRIMARY KEY (event_id, zone_id),
    CONSTRAINT zone_not_oversold CHECK (sold >= 0 AND sold <= capacity)
);

CREATE TABLE seats (
    event_id  text NOT NULL,
    zone_id   text NOT NULL,
    seat      text NOT NULL,
    position  integer NOT NULL,
    PRIMARY KEY (event_id, zone_id, seat),
    FOREIGN KEY (event_id, zone_id) REFERENCES zones (event_id, zone_id) ON DELETE CASCADE
);

CREATE TABLE orders (
    order_id      text PRIMARY KEY,
    event_id      text NOT NULL REFERENCES events (event_id),
    hold_id       text NOT NULL UNIQUE,
    customer_id   text NOT NULL,
    amount_cents  bigint NOT NULL CHECK (amount_cents >= 0),
    payment_ref   text,
    confirmed_at  timestamptz NOT NULL,
    persisted_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX orders_event ON orders (event_id);

CREATE TABLE order_items (
    order_id  text NOT NULL REFERENCES orders (order_id) ON DELETE CASCADE,
    event_id  text NOT NULL,
    zone_id   text NOT NULL,
    seat      text,                       -- NULL for general admission
    quantity  integer NOT NULL CHECK (quantity >= 1),
    FOREIGN KEY (event_id, zone_id) REFERENCES zones (event_id, zone_id),
    FOREIGN KEY (event_id, zone_id, seat) REFERENCES seats (event_id, zone_id, seat),
    CONSTRAINT seat_item_is_one_ticket CHECK (seat IS NULL OR quantity = 1)
);
CREATE INDEX order_items_order ON order_items (order_id);
CREATE UNIQUE INDEX order_items_one_sale_per_seat ON order_items (event_id, zone_id, seat) WHERE seat IS NOT NULL;

-- Outbox entries PostgreSQL refused (a backstop fired): kept with the reason, never retried blindly.
CREATE TABLE dead_letters (
    id          bigserial PRIMARY KEY,
    event_id    text NOT NULL,
    order_id    text,
    entry_id    text NOT NULL,
    payload     jsonb NOT NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (event_id, entry_id)
);
