"""The results directory: each download's result, written whole or not at all.

A result is written to a temporary name in the directory itself (``.<job>.<random>.part``,
mode 0600), hashed and counted as it goes, fsynced, and renamed to its final name
(``<job>.<format>``), so a reader only ever finds a whole file under a final name. A
write that fails or is cancelled removes its temporary file; one a killed process left
behind is removed by ``remove_leftovers`` at start-up. A temporary name is never a
final one, so such a file is never served.

File work runs in worker threads, a batch of at least ``BATCH`` bytes at a time, so the
event loop never waits on the disk and memory stays at about one batch per write. The
hashing and the writes give up the GIL while they work; the record counting does not,
so it is fed ``COUNT_SLICE`` bytes at a time, letting the event loop run in between.

A live write's temporary file must never look abandoned to ``remove_leftovers`` (which
goes by its modification time, ``LEFTOVER_AGE``): a write flushes what it holds at
least every ``FLUSH_EVERY`` seconds, batch full or not, so a slow upstream trickling
its file still touches it; and an upstream that sends nothing at all fails the read
first (the upstream client's read timeout, 30 s, is far below ``LEFTOVER_AGE``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread

from service.downloads.records import FORMATS, Format, RecordCounter, counter_for
from service.errors import BulkhookError
from service.values import job_id_ok

__all__ = [
    "BATCH",
    "FLUSH_EVERY",
    "LEFTOVER_AGE",
    "ResultFiles",
    "ResultNameError",
    "StoredResult",
    "default_results_dir",
]

BATCH = 1 << 20
_PART = ".part"
# A temporary file untouched this long belongs to no live write (a write touches its
# file at least once per batch, and at least every FLUSH_EVERY seconds); younger ones
# may be another replica's, on a shared volume, and are left alone.
LEFTOVER_AGE = 600.0
# How much the record counter is fed at a time, in its worker thread (see _Digest).
COUNT_SLICE = 64 << 10
# The longest a write holds bytes it has before writing them (so touching its file).
FLUSH_EVERY = 30.0


def default_results_dir() -> Path:
    return Path("bulkhook-results")


class ResultNameError(BulkhookError):
    """A job id or format that cannot name a result file."""

    code = "bad_result_name"
    http_status = 400


@dataclass(frozen=True, slots=True)
class StoredResult:
    path: Path
    bytes: int
    records: int
    sha256: str
    # Why the file is not well-formed for its format; None when it is.
    detail: str | None = None

    @property
    def well_formed(self) -> bool:
        return self.detail is None


class _Digest:
    """The running size, hash and count of a result being written."""

    def __init__(self, fmt: Format) -> None:
        self.size = 0
        self.hash = hashlib.sha256()
        self.counter: RecordCounter = counter_for(fmt)

    def write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        self.hash.update(data)
        # The counters' regular expressions hold the GIL while they run: fed a whole
        # batch at once, the JSON counter keeps the event loop from running for tens
        # of milliseconds. A slice at a time, the loop gets its turn between slices.
        for start in range(0, len(data), COUNT_SLICE):
            self.counter.feed(data[start : start + COUNT_SLICE])
        self.size += len(data)


def _check(job_id: str, fmt: str) -> None:
    if not job_id_ok(job_id):
        raise ResultNameError(f"not a job id: {job_id!r}")
    if fmt not in FORMATS:
        raise ResultNameError(f"not a result format: {fmt!r}")


class ResultFiles:
    """The results directory: write, find and remove each job's stored result."""

    def __init__(self, root: Path, *, flush_every: float = FLUSH_EVERY) -> None:
        self.root = root
        self.flush_every = flush_every

    def prepare(self) -> None:
        """Creates the directory (owner-only when it is new)."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, job_id: str, fmt: Format) -> Path:
        """Where the job's result is, whole, once stored."""
        _check(job_id, fmt)
        return self.root / f"{job_id}.{fmt}"

    def stored(self, job_id: str, fmt: Format) -> Path | None:
        """The job's stored result, or None while there is none."""
        path = self.path(job_id, fmt)
        return path if path.is_file() else None

    def remove(self, job_id: str, fmt: Format) -> bool:
        """Removes the job's result; whether there was one."""
        try:
            self.path(job_id, fmt).unlink()
        except FileNotFoundError:
            return False
        return True

    def remove_temporaries(self, job_id: str) -> int:
        """Removes the job's temporary files: called by the holder of the job's fetch
        lease before it writes, so an attempt cut off (by a kill) leaves nothing behind
        once the next one starts. How many there were."""
        if not job_id_ok(job_id) or not self.root.is_dir():
            return 0
        removed = 0
        for entry in self.root.glob(f".{job_id}.*{_PART}"):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed += 1
        return removed

    def remove_leftovers(self, older_than: float = LEFTOVER_AGE) -> list[Path]:
        """Removes temporary files that no write will finish (a killed process's)."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        cutoff = time.time() - older_than
        for entry in self.root.iterdir():
            if not (entry.name.startswith(".") and entry.name.endswith(_PART)):
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime <= cutoff:
                    entry.unlink()
                    removed.append(entry)
        return removed

    async def write(self, job_id: str, fmt: Format, chunks: AsyncIterator[bytes]) -> StoredResult:
        """Streams ``chunks`` into the job's result; the stored file's facts.

        Replaces a result already stored for the job. On any failure or cancellation
        the temporary file is removed and nothing is stored.
        """
        final = self.path(job_id, fmt)
        temp = self.root / f".{job_id}.{secrets.token_hex(8)}{_PART}"
        digest = _Digest(fmt)
        fd = await anyio.to_thread.run_sync(_create, temp)
        try:
            batch: list[bytes] = []
            size = 0
            flushed = time.monotonic()
            async for chunk in chunks:
                if not chunk:
                    continue
                batch.append(bytes(chunk))
                size += len(chunk)
                if size >= BATCH or time.monotonic() - flushed >= self.flush_every:
                    data = b"".join(batch)
                    batch.clear()
                    size = 0
                    flushed = time.monotonic()
                    # Not abandoned on cancellation: the thread is waited for, so no
                    # write reaches the descriptor after it is closed below.
                    await anyio.to_thread.run_sync(digest.write, fd, data)
            if batch:
                await anyio.to_thread.run_sync(digest.write, fd, b"".join(batch))
            sealing, fd = fd, -1
            await anyio.to_thread.run_sync(_seal, sealing)
            await anyio.to_thread.run_sync(_publish, temp, final)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_discard, fd, temp)
            raise
        count = digest.counter.finish()
        return StoredResult(
            final, digest.size, count.records, digest.hash.hexdigest(), count.detail
        )


def _create(temp: Path) -> int:
    temp.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def _seal(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(temp: Path, final: Path) -> None:
    """Gives the whole, durable file its final name, durably."""
    os.replace(temp, final)
    directory = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _discard(fd: int, temp: Path) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()
