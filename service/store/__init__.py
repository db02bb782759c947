"""Durable job state: one interface, one implementation per database."""

from .base import KEEP, Applied, Delivery, KeptCallback, Store, StoreError

__all__ = ["KEEP", "Applied", "Delivery", "KeptCallback", "Store", "StoreError", "open_store"]


def open_store(database_url: str) -> Store:
    """The store for ``database_url`` (not yet opened)."""
    if database_url.startswith("sqlite:///"):
        from .sqlite import SQLiteStore

        return SQLiteStore(database_url.removeprefix("sqlite:///"))
    if database_url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(database_url)
    raise StoreError(f"unsupported database URL scheme: {database_url.split(':', 1)[0]}")
