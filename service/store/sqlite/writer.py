"""One SQLite write connection driven from the event loop, and a pool of readers.

Writes are group-committed: every write waiting when a round starts runs inside one
transaction (a write that fails is undone alone, see ``_run_apart``), the transaction
commits once, and only then are the callers' futures resolved. Concurrent callback
deliveries therefore share one fsync while each caller still learns its own outcome,
and nothing is acknowledged before it is durable.

Where each step runs is the point of this module. The statements of a write are a
handful of indexed lookups on cached pages: they run on the event loop, between other
work, in microseconds. The commit (its fsync) runs on a thread of its own, and
waiting for the write lock (held only by another process, if any) is an
``asyncio.sleep``, never a block. Running the statements on a separate writer thread
instead costs far more than it saves: every statement releases and re-takes the GIL,
and with the event loop busy each re-take waits out a GIL switch interval, so a writer
thread crawls exactly when load is high (measured: 27 times slower).
Reads use their own connections on reader threads (WAL lets them run beside writes).

Checkpoints (copying the log's pages into the database file) run on a thread of their
own, not inside a COMMIT: see ``Checkpointer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from service.store.rounds import Outcome, Rounds, settle

__all__ = ["Checkpointer", "SQLiteConnections", "connect"]

log = logging.getLogger("bulkhook.store")

T = TypeVar("T")
# A write waiting for its round.
_Write = Callable[[sqlite3.Connection], Any]
_MAX_BATCH = 256
_LOCK_WAIT = 30.0  # seconds, as the busy timeout of every other connection
# The log's length (in pages) past which it is made to start over: SQLite's own default.
RESTART_FRAMES = 1000
# The longest a commit waits for the pass that lets the log start over.
_RESTART_WAIT = 0.1
# The shortest time between two passes of the checkpointer, unless a commit waits.
PASS_INTERVAL = 0.05


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
        self._checkpointer = Checkpointer(self._path)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        if self._loop is None or self._conn is None:
            raise sqlite3.ProgrammingError("the store is not open")
        if loop is not self._loop:
            # A caller on another loop (a test's, say) hands the write to the owner.
            handed = asyncio.run_coroutine_threadsafe(self.write(fn), self._loop)
            return await asyncio.wrap_future(handed)
        return await self._rounds.submit(fn)  # type: ignore[no-any-return]

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._run_read, fn)

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
        return outcomes

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
    journal, which spills to a temporary file past 64 KiB (measured: a file created,
    written and deleted per round). Undoing a failed round is a ROLLBACK instead.
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


class Committer:
    """The thread that runs each round's COMMIT (its fsync) off the event loop.

    A thread of its own fed by a queue, rather than an executor: the hop there and
    back is paid once per round, and an executor's future chained to one on the loop
    cost ~110,000 more instructions per round of four writes (callgrind).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._asked: queue.SimpleQueue[tuple[Callable[[], None], asyncio.Future[None]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._serve, name="sqlite-commit", daemon=True)
        self._thread.start()

    def run(self, commit: Callable[[], None]) -> asyncio.Future[None]:
        """Run ``commit`` on the thread; the future is settled on the loop."""
        future = self._loop.create_future()
        self._asked.put((commit, future))
        return future

    def _serve(self) -> None:
        while (asked := self._asked.get()) is not None:
            commit, future = asked
            error: BaseException | None = None
            try:
                commit()
            except BaseException as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                self._loop.call_soon_threadsafe(settle, future, (error is None, error))

    def stop(self) -> None:
        self._asked.put(None)
        self._thread.join()


class Checkpointer:
    """Copies the log's pages into the database file on its own thread, after commits.

    Left to SQLite, the COMMIT that takes the log past 1,000 pages runs the checkpoint
    itself, and every caller of that round waits while the pages are copied and the
    file synced: measured, commits' p99 was 13-15 ms that way and 2-5 ms with the
    copying here. One thing a checkpoint beside the writer cannot do alone is let the
    log start over from its beginning: SQLite does that only when a transaction begins
    with every page already copied, which back-to-back rounds never allow. So once the
    log is past ``RESTART_FRAMES`` pages, a commit waits for one pass that starts
    after it (the copy of a round or two), and the next transaction restarts the log.

    Passes are at least ``PASS_INTERVAL`` apart unless a commit waits for one. A pass
    after every commit copied the same busy pages (the jobs' rows, the tops of the
    indexes) again and again, synced the database file each time, and let the log
    start over at nearly every transaction, which costs the commit an extra sync.
    """

    def __init__(
        self, path: str, restart_frames: int = RESTART_FRAMES, interval: float = PASS_INTERVAL
    ) -> None:
        self._path = path
        self._restart_frames = restart_frames
        self._interval = interval
        self._changed = threading.Condition()
        self._asked = 0  # commits told about so far
        self._covered = 0  # commits the last finished pass started after
        self._waiting = 0  # commits waiting for a pass
        self._frames = 0  # the log's length in pages, as the last pass found it
        self._stopping = False
        self._alive = True
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> bool:
        """Told by the committing thread after each COMMIT; False once the thread is gone."""
        with self._changed:
            if not self._alive:
                return False
            self._asked += 1
            ticket = self._asked
            if ticket == self._covered + 1:
                self._changed.notify_all()  # the checkpointer sleeps until a commit
            if self._frames < self._restart_frames:
                return True
            self._waiting += 1
            self._changed.notify_all()
            try:
                if self._changed.wait_for(
                    lambda: self._covered >= ticket or not self._alive, timeout=_RESTART_WAIT
                ):
                    self._frames = 0  # the next transaction starts the log over
            finally:
                self._waiting -= 1
            return self._alive

    def _run(self) -> None:
        try:
            self._checkpoint_after_commits()
        except Exception:
            log.exception("the SQLite checkpointer stopped; commits checkpoint instead")
        finally:
            with self._changed:
                self._alive = False
                self._changed.notify_all()

    def _checkpoint_after_commits(self) -> None:
        conn = connect(self._path)
        last = time.monotonic() - self._interval  # the first pass need not wait
        try:
            while True:
                with self._changed:
                    self._changed.wait_for(lambda: self._asked > self._covered or self._stopping)
                    self._changed.wait_for(
                        lambda: self._waiting > 0 or self._stopping,
                        timeout=max(0.0, last + self._interval - time.monotonic()),
                    )
                    if self._stopping:
                        return
                    ticket = self._asked
                last = time.monotonic()
                try:
                    busy, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error:
                    busy, frames = 1, 0  # tried again after the next commit
                with self._changed:
                    self._covered = ticket
                    if not busy:
                        self._frames = frames
                    self._changed.notify_all()
        finally:
            conn.close()

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join()
