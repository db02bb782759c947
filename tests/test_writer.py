"""The SQLite write path: group-committed rounds, and the log's checkpoints beside them."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from service.store.sqlite import writer
from service.store.sqlite.checkpointer import PASS_INTERVAL, RESTART_FRAMES
from service.store.sqlite.writer import SQLiteConnections, connect

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


async def test_checkpoints_are_spaced_out_however_often_rounds_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes: list[str] = []

    def counting(path: str) -> sqlite3.Connection:
        conn = connect(path)
        conn.set_trace_callback(passes.append)
        return conn

    monkeypatch.setattr(writer, "connect", counting)
    sql = SQLiteConnections(str(tmp_path / "db.sqlite"))
    sql.start()
    started = time.monotonic()
    try:
        await sql.write(lambda conn: conn.execute("CREATE TABLE t (x TEXT)"))
        for _ in range(300):  # one round each, every one committed before the next
            await sql.write(insert)
    finally:
        await sql.stop()
    elapsed = time.monotonic() - started
    checkpoints = [statement for statement in passes if "wal_checkpoint" in statement]
    assert 1 <= len(checkpoints) <= elapsed / PASS_INTERVAL + 2


# A round that changes 100 rows, each on a page of its own that existed before the
# round (400 KiB): far more than SQLite keeps of a statement journal in memory (64 KiB)
# before it spills the rest to a temporary file.
_ONE_BIG_ROUND = textwrap.dedent(
    """
    import asyncio, sys
    from service.store.sqlite.writer import SQLiteConnections

    def fill(conn):
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, x TEXT)")
        conn.executemany("INSERT INTO t VALUES (?, ?)", ((i, "x" * 500) for i in range(800)))

    def change(row):
        return lambda conn: conn.execute("UPDATE t SET x = 'y' WHERE id = ?", (row,))

    async def main(path):
        sql = SQLiteConnections(path)
        sql.start()
        try:
            await sql.write(fill)
            await asyncio.gather(*(sql.write(change(row)) for row in range(0, 800, 8)))
        finally:
            await sql.stop()

    asyncio.run(main(sys.argv[1]))
    """
)


def test_a_round_writes_no_temporary_file(tmp_path: Path) -> None:
    """A round is undone by rolling its transaction back, not by a savepoint, whose
    statement journal would be written to a temporary file round after round."""
    temporary = tmp_path / "sqlite-tmp"
    temporary.mkdir()
    before = temporary.stat().st_mtime_ns
    env = {**os.environ, "SQLITE_TMPDIR": str(temporary)}
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-c", _ONE_BIG_ROUND, str(tmp_path / "db.sqlite")],
        env=env,
        cwd=root,
        check=True,
        timeout=60,
    )
    # SQLite removes its temporary files as soon as it opens them; the folder's
    # modification time still shows that one was made.
    assert temporary.stat().st_mtime_ns == before
    with sqlite3.connect(tmp_path / "db.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM t WHERE x = 'y'").fetchone() == (100,)
