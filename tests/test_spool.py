"""Spool: a temporary file that can be read while it is written, and read again."""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
import sys
from pathlib import Path

import pytest

from service.uploads.spool import Spool, SpoolError

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


def resident_bytes(path: Path) -> int:
    """How much of the file the page cache holds (mincore over a mapping of it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with path.open("rb") as handle:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, handle.fileno(), 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            flags = ctypes.create_string_buffer(pages)
            assert libc.mincore(address, size, flags) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(address, size)
    return sum(byte & 1 for byte in flags.raw) * mmap.PAGESIZE


linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="page cache advice is Linux's"
)


@linux_only
async def test_a_large_upload_does_not_stay_in_the_page_cache(tmp_path: Path) -> None:
    data = batches(64)
    spool = Spool(tmp_path)
    reader = asyncio.ensure_future(read_all(spool, 64 * BATCH))  # a relay keeping up
    for batch in data:
        await spool.write(batch)
        await asyncio.sleep(0.01)  # the pace of an upload; lets write-back keep up
    await spool.close()
    assert await asyncio.wait_for(reader, 10) == b"".join(data)
    # What is left is the tail not yet written back when the last write dropped.
    assert resident_bytes(spool.path) <= 24 * BATCH


@linux_only
async def test_pages_a_lagging_reader_still_needs_stay_in_the_page_cache(
    tmp_path: Path,
) -> None:
    data = batches(40)
    spool = Spool(tmp_path)
    lagging = spool.follow(40 * BATCH)
    await spool.write(data[0])
    first = bytes(await anext(lagging))  # then stops reading while the writer goes on
    for batch in data[1:]:
        await spool.write(batch)
        await asyncio.sleep(0.01)
    await spool.close()
    assert resident_bytes(spool.path) >= 38 * BATCH  # all it has still to read
    rest = b"".join([bytes(chunk) async for chunk in lagging])
    assert first + rest == b"".join(data)
