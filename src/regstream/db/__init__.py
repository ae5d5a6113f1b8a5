"""Persistence: async SQLAlchemy engine, tables, data functions and Alembic migrations."""
