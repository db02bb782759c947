"""The SQLite log's checkpoints, on a thread of their own beside the writer."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable

__all__ = ["PASS_INTERVAL", "RESTART_FRAMES", "Checkpointer"]

log = logging.getLogger("bulkhook.store")

# The log's length (in pages) past which it is made to start over: SQLite's own default.
RESTART_FRAMES = 1000
# The longest a commit waits for the pass that lets the log start over.
_RESTART_WAIT = 0.1
# The shortest time between two passes of the checkpointer, unless a commit waits.
PASS_INTERVAL = 0.05


class Checkpointer:
    """Copies the log's pages into the database file on its own thread, after commits.

    Left to SQLite, the COMMIT that takes the log past 1,000 pages runs the checkpoint
    itself, and every caller of that round waits while the pages are copied and the
    file synced; here the copying runs beside the rounds. One thing a checkpoint beside
    the writer cannot do alone is let the log start over from its beginning: SQLite does
    that only when a transaction begins with every page already copied, which
    back-to-back rounds never allow. So once the
    log is past ``RESTART_FRAMES`` pages, a commit waits for one pass that starts
    after it (the copy of a round or two), and the next transaction restarts the log.

    Passes are at least ``PASS_INTERVAL`` apart unless a commit waits for one. A pass
    after every commit copied the same busy pages (the jobs' rows, the tops of the
    indexes) again and again, synced the database file each time, and let the log
    start over at nearly every transaction, which costs the commit an extra sync.
    """

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        restart_frames: int = RESTART_FRAMES,
        interval: float = PASS_INTERVAL,
    ) -> None:
        # Opens the connection the passes run on, in the checkpointer's thread.
        self._connect = connect
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
        conn = self._connect()
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
