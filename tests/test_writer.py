"""The SQLite write path: group-committed rounds, and the log's checkpoints beside them."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from service.store.writer import RESTART_FRAMES, SQLiteConnections

pytestmark = pytest.mark.anyio

ROW = "x" * 500  # eight rows fill a page


async def test_the_log_starts_over_while_writes_never_stop(tmp_path: Path) -> None:
    path = str(tmp_path / "db.sqlite")
    sql = SQLiteConnections(path)
    sql.start()
    largest = 0

    def insert(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (?)", (ROW,))

    try:
        await sql.write(lambda conn: conn.execute("CREATE TABLE t (x TEXT)"))

        writes = []
        for _ in range(16_000):
            # A new write each turn of the loop, as requests arriving: there is always
            # one waiting when a round ends, so rounds follow each other without a gap.
            writes.append(asyncio.ensure_future(sql.write(insert)))
            await asyncio.sleep(0)
            largest = max(largest, (tmp_path / "db.sqlite-wal").stat().st_size)
        await asyncio.gather(*writes)
    finally:
        await sql.stop()
    # 16,000 rows make about 2,000 pages, twice what the log may hold before it starts over.
    assert largest <= 2 * RESTART_FRAMES * 4096 * 1.1  # the log's pages, plus headers
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM t").fetchone() == (16_000,)
