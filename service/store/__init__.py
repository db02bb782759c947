"""Durable job state: one interface, one implementation per database."""

from __future__ import annotations

import sqlite3
import sys

from service.config import redact
from service.store.base import (
    KEEP,
    Applied,
    ApplyOptions,
    Delivery,
    KeptCallback,
    Store,
    StoreError,
)

__all__ = [
    "KEEP",
    "Applied",
    "ApplyOptions",
    "Delivery",
    "KeptCallback",
    "Store",
    "StoreError",
    "open_store",
    "store_error",
    "unavailable",
]

# SQLite's primary result codes that say the database cannot be used just now, as
# opposed to a statement that is wrong (a bug) or a constraint that refused a write.
_SQLITE_UNAVAILABLE = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOTADB,
    }
)


def open_store(database_url: str) -> Store:
    """The store for ``database_url`` (not yet opened)."""
    if database_url.startswith("sqlite:///"):
        from service.store.sqlite.store import SQLiteStore

        return SQLiteStore(database_url.removeprefix("sqlite:///"))
    if database_url.startswith(("postgresql://", "postgres://")):
        from service.store.postgres.store import PostgresStore

        return PostgresStore(database_url)
    raise StoreError(f"unsupported database URL scheme: {database_url.split(':', 1)[0]}")


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the store cannot be reached or written just now.

    Such a request is answered 503, not 500: nothing about it was wrong, and retrying
    later (as Open Connectors does with a callback) will work once the store is back.
    """
    if isinstance(exc, StoreError):
        return True
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code is not None and code & 0xFF in _SQLITE_UNAVAILABLE
    psycopg = sys.modules.get("psycopg")  # imported only by the PostgreSQL store
    # Connection failures, a pool timeout, deadlocks and serialisation failures.
    return psycopg is not None and isinstance(exc, psycopg.OperationalError)


def store_error(exc: BaseException) -> StoreError | None:
    """``exc`` as the ``StoreError`` it means, if a driver's error says the store is
    unavailable; None for any other (a wrong statement, a refused constraint: bugs).
    The stores raise what this returns where they call their drivers."""
    if isinstance(exc, StoreError):
        return exc
    if unavailable(exc):
        # One line, and no password a connection string in it may carry.
        return StoreError(redact(" ".join(str(exc).split())) or type(exc).__name__)
    return None
