"""Spool: a temporary file that can be read while it is written, and read again."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from service.spool import Spool, SpoolError

pytestmark = pytest.mark.anyio

BATCH = 1 << 20


def batches(count: int) -> list[bytearray]:
    return [bytearray(os.urandom(BATCH)) for _ in range(count)]


async def read_all(spool: Spool, expected: int) -> bytes:
    return b"".join([bytes(chunk) async for chunk in spool.follow(expected)])


async def test_a_reader_follows_the_file_while_it_is_written(tmp_path: Path) -> None:
    data = batches(12)
    total = sum(map(len, data))
    spool = Spool(tmp_path)
    reader = asyncio.ensure_future(read_all(spool, total))
    for batch in data:
        await spool.write(batch)
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)
    assert not reader.done()  # waits for the rest: the file is not sealed yet
    await spool.close()
    assert await asyncio.wait_for(reader, 10) == b"".join(data)
    assert spool.path.read_bytes() == b"".join(data)


async def test_a_late_reader_gets_the_early_bytes_from_disk(tmp_path: Path) -> None:
    data = batches(20)  # more than stays in memory
    spool = Spool(tmp_path)
    for batch in data:
        await spool.write(batch)
    await spool.close()
    first = await read_all(spool, sum(map(len, data)))
    again = await read_all(spool, sum(map(len, data)))  # a retry reads it all again
    assert first == again == b"".join(data)


async def test_a_reader_expecting_another_size_fails_before_passing_it_on(
    tmp_path: Path,
) -> None:
    data = batches(3)
    spool = Spool(tmp_path)
    for batch in data:
        await spool.write(batch)
    await spool.close()
    seen = 0
    with pytest.raises(SpoolError, match="not"):
        async for chunk in spool.follow(2 * BATCH + 10):  # shorter than the file
            seen += len(chunk)
    assert seen <= 2 * BATCH + 10
    with pytest.raises(SpoolError):
        await read_all(spool, 3 * BATCH + 1)  # longer than the file


async def test_a_discarded_spool_stops_its_readers_and_leaves_no_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    await spool.write(bytearray(b"x" * 10))
    reader = asyncio.ensure_future(read_all(spool, 100))
    await asyncio.sleep(0.05)
    await spool.discard()
    with pytest.raises(SpoolError, match="discarded"):
        await asyncio.wait_for(reader, 10)
    assert os.listdir(tmp_path) == []
