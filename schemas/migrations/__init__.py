"""Alembic migrations for the tables in schemas.tables; run by dispatcher.store.open_database."""
