"""The SQLite write path: group-committed rounds, and the log's checkpoints beside them."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import pytest

from service.store import writer
from service.store.writer import RESTART_FRAMES, SQLiteConnections, connect

pytestmark = pytest.mark.anyio

ROW = "x" * 500  # eight rows fill a page


def insert(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT INTO t VALUES (?)", (ROW,))


async def fill_without_pause(tmp_path: Path, rows: int) -> int:
    """Write ``rows`` rows through a fresh store, a new write each turn of the loop as
    requests arriving: one is always waiting when a round ends, so rounds follow each
    other without a gap. Returns the largest size the log file reached."""
    path = tmp_path / "db.sqlite"
    sql = SQLiteConnections(str(path))
    sql.start()
    largest = 0
    try:
        await sql.write(lambda conn: conn.execute("CREATE TABLE t (x TEXT)"))
        writes = []
        for _ in range(rows):
            writes.append(asyncio.ensure_future(sql.write(insert)))
            await asyncio.sleep(0)
            largest = max(largest, os.stat(f"{path}-wal").st_size)
        await asyncio.gather(*writes)
    finally:
        await sql.stop()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM t").fetchone() == (rows,)
    return largest


# 16,000 rows make about 2,000 pages, twice what the log may hold before it starts over;
# the file holds the log's pages plus a header per page.
MOST = 2 * RESTART_FRAMES * 4096 * 1.1


async def test_the_log_starts_over_while_writes_never_stop(tmp_path: Path) -> None:
    assert await fill_without_pause(tmp_path, 16_000) <= MOST


async def test_without_its_checkpointer_the_store_checkpoints_in_commits_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    opened = []

    def connect_once(path: str) -> sqlite3.Connection:
        if opened:
            raise sqlite3.OperationalError("unable to open database file")
        opened.append(path)
        return connect(path)

    monkeypatch.setattr(writer, "connect", connect_once)  # the checkpointer's fails
    assert await fill_without_pause(tmp_path, 16_000) <= MOST
    assert "the SQLite checkpointer stopped" in caplog.text
