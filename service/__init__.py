"""boxoffice: flash-sale ticketing. Inventory and holds in Redis (Lua), orders written through to PostgreSQL."""

__version__ = "0.1.0"
