"""arq workers: outbox write-through to PostgreSQL, the expiry sweeper, reconciliation."""
