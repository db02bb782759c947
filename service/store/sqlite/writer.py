"""One SQLite write connection driven from the event loop, and a pool of readers.

Writes are group-committed: every write waiting when a round starts runs inside one
transaction (a write that fails is undone alone, see ``_run_apart``), the transaction
commits once, and only then are the callers' futures resolved. Concurrent callback
deliveries therefore share one fsync while each caller still learns its own outcome,
and nothing is acknowledged before it is durable.

Where each step runs is the point of this module. The statements of a write are a
handful of indexed lookups on cached pages: they run on the event loop, between other
work, in microseconds. The commit (its fsync) runs on a thread of its own
(``committer``), and waiting for the write lock (held only by another process, if
any) is an ``asyncio.sleep``, never a block. Running the statements on a separate writer thread
instead costs far more than it saves: every statement releases and re-takes the GIL,
and with the event loop busy each re-take waits out a GIL switch interval, so a writer
thread crawls exactly when load is high.
Reads use their own connections on reader threads (WAL lets them run beside writes).

Checkpoints (copying the log's pages into the database file) run on a thread of their
own, not inside a COMMIT (``checkpointer``).

Every read and write goes through here, so this is where SQLite's errors that mean
the database cannot be used just now (locked, full, unreadable) become ``StoreError``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from service.store import store_error
from service.store.group_commit import Outcome, Rounds
from service.store.sqlite.checkpointer import RESTART_FRAMES, Checkpointer
from service.store.sqlite.committer import Committer

__all__ = ["SQLiteConnections", "connect"]

T = TypeVar("T")
# A write waiting for its round.
_Write = Callable[[sqlite3.Connection], Any]
_MAX_BATCH = 256
_LOCK_WAIT = 30.0  # seconds, as the busy timeout of every other connection


def connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a committed transaction survives power loss, not only a process crash.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class SQLiteConnections:
    """The write connection (group-committed from the event loop) and the readers."""

    def __init__(
        self, path: str, readers: int = 2, on_rollback: Callable[[], None] | None = None
    ) -> None:
        self._path = path
        # Told whenever writes that already ran are undone (caches built on them go).
        self._on_rollback = on_rollback or (lambda: None)
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="sqlite-reader")
        self._committer: Committer | None = None
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rounds: Rounds[_Write] = Rounds(self._run_batch, _MAX_BATCH)
        self._checkpointer: Checkpointer | None = None

    def start(self) -> None:
        """Open the write connection; writes are run from the calling event loop."""
        self._loop = asyncio.get_running_loop()
        self._conn = connect(self._path)
        # Never wait for a lock inside SQLite on the event loop: ``_begin`` retries.
        self._conn.execute("PRAGMA busy_timeout=0")
        self._conn.execute("PRAGMA wal_autocheckpoint=0")
        self._committer = Committer(self._loop)
        self._checkpointer = Checkpointer(lambda: connect(self._path))

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> Awaitable[T]:
        """``fn`` run in the next round: awaited, its result once the round committed
        (an error that means the store is unavailable raised as ``StoreError``)."""
        if self._loop is None or self._conn is None:
            raise sqlite3.ProgrammingError("the store is not open")
        if asyncio.get_running_loop() is not self._loop:
            return self._write_from_elsewhere(fn)
        return self._rounds.submit(fn)

    async def _write_from_elsewhere(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A caller on another loop (a test's, say) hands the write to the owner."""
        assert self._loop is not None
        handed = asyncio.run_coroutine_threadsafe(self._owned(fn), self._loop)
        return await asyncio.wrap_future(handed)

    async def _owned(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self.write(fn)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._readers, self._run_read, fn)
        except sqlite3.Error as exc:
            if (outage := store_error(exc)) is None:
                raise
            raise outage from exc

    def _run_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self._path)
            with self._lock:
                self._reader_conns.append(conn)
        return fn(conn)

    async def _run_batch(self, batch: list[_Write]) -> list[Outcome]:
        conn, committer = self._conn, self._committer
        assert conn is not None and committer is not None
        try:
            await _begin(conn)
            outcomes = _run_together(conn, batch)
            if outcomes is None:
                # One write failed: undo the round and run it again, each write alone.
                self._undo(conn)
                await _begin(conn)
                outcomes = _run_apart(conn, batch, self._on_rollback)
            await committer.run(lambda: self._commit(conn))
        except Exception as exc:
            self._undo(conn)
            outcomes = [(False, exc)] * len(batch)
        return [outcome if outcome[0] else (False, _outage(outcome[1])) for outcome in outcomes]

    def _undo(self, conn: sqlite3.Connection) -> None:
        """Roll back what the round wrote, and drop what was cached from it."""
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        self._on_rollback()

    def _commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")
        if self._checkpointer is not None and not self._checkpointer.committed():
            # Its thread is gone: SQLite checkpoints inside commits again, as by default.
            conn.execute(f"PRAGMA wal_autocheckpoint={RESTART_FRAMES}")
            self._checkpointer = None

    async def stop(self) -> None:
        """Finish the writes already asked for, then close every connection."""
        await self._rounds.drain()
        if self._committer is not None:
            self._committer.stop()
            self._committer = None
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._readers.shutdown(wait=True)
        with self._lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()


def _outage(exc: BaseException) -> BaseException:
    """A failed write's error as its caller gets it: ``StoreError`` (caused by the
    driver's error) when SQLite says the database cannot be used just now."""
    if not isinstance(exc, sqlite3.Error) or (outage := store_error(exc)) is None:
        return exc
    outage.__cause__ = exc
    return outage


async def _begin(conn: sqlite3.Connection) -> None:
    """Take the write lock, waiting (without blocking the loop) while another holds it.

    Only another process writing the same file holds it, which the embedded store
    does not expect but tolerates as SQLite's own busy timeout would.
    """
    deadline = time.monotonic() + _LOCK_WAIT
    delay = 0.001
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            # The extended codes (a reader recovering the log, say) are busy too.
            busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
            if not busy or time.monotonic() > deadline:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


def _run_together(
    conn: sqlite3.Connection,
    batch: list[_Write],
) -> list[Outcome] | None:
    """Every write of a round, back to back in the open transaction; None if one raised.

    Writes almost never fail, so the round runs without a savepoint: a savepoint
    around it would make SQLite copy every page the round changes into a statement
    journal, which spills to a temporary file past 64 KiB (a file created, written and
    deleted per round). Undoing a failed round is a ROLLBACK instead.
    """
    try:
        return [(True, fn(conn)) for fn in batch]
    except Exception:
        return None


def _run_apart(
    conn: sqlite3.Connection,
    batch: list[_Write],
    on_rollback: Callable[[], None],
) -> list[Outcome]:
    """The round again after a failure, a savepoint around each write, so that the
    failure is that caller's alone. Writes are functions of the database only, which
    makes running them again after the rollback safe.
    """
    outcomes: list[Outcome] = []
    for fn in batch:
        conn.execute("SAVEPOINT op")
        try:
            outcomes.append((True, fn(conn)))
            conn.execute("RELEASE op")
        except Exception as exc:
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            on_rollback()
            outcomes.append((False, exc))
    return outcomes
