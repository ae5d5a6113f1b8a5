"""Alembic environment: run with a connection handed in by ``regstream.db.engine.migrate``."""

from __future__ import annotations

from alembic import context

from regstream.db.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - we never run alembic from its own CLI
    raise RuntimeError("run migrations through regstream.db.engine.migrate()")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
