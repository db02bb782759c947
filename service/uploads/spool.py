"""An upload's temporary file: written while the upload arrives, readable while it grows.

Writes run in a worker thread, so disk and parsing overlap. ``follow`` reads the file
as it is written, so an upload can go on to the upstream before all of it has arrived,
and can be read again from the start for a retry.

The file's pages are dropped from the page cache behind its readers once written back,
so a 1 GiB upload does not fill the page cache with 1 GiB of spool (evicting the
store's pages), and so that the same memory is reused instead of fresh pages being
faulted in one by one, which is costly on a virtual machine that hands free memory
back to its host (the figures are in ``docs/performance.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import shutil
import stat
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import IO

from service.errors import BulkhookError

__all__ = [
    "AppSpool",
    "Bytes",
    "Spool",
    "SpoolDirectory",
    "SpoolError",
    "default_root",
    "out_of_space",
    "prepare_root",
]

Bytes = bytes | bytearray | memoryview

_READ = 1 << 20
# The last batches written stay in memory this long, so a reader that keeps up with
# the writer (an upload relayed as it arrives) never reads them back from disk.
_RECENT_BYTES = 8 << 20
# How far the writer gets ahead of the last drop before dropping again.
_DROP_EVERY = 8 << 20


# The errors a write gives when the disk is full, the owner's quota is used up, or the
# process may not make a file this large (RLIMIT_FSIZE; Python ignores SIGXFSZ).
_OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_LOCK = ".lock"
# A directory without its lock file may be one an app is creating this very moment.
_UNLOCKED_GRACE = 60.0


def out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` says no more bytes can be written (not that the file is bad)."""
    return isinstance(exc, OSError) and exc.errno in _OUT_OF_SPACE


def default_root() -> Path:
    return Path(tempfile.gettempdir()) / "bulkhook-spool"


class SpoolDirectory:
    """The directory one running app spools into, under a root the service owns.

    The app holds an exclusive ``flock`` on the directory's lock file for as long as it
    runs; the kernel drops the lock when the process dies, however it dies. So at
    start-up every directory whose lock can be taken belonged to a dead process and is
    removed with the upload files it left; a live app's lock cannot be taken, and its
    directory is left alone.
    """

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd: int | None = lock_fd

    @classmethod
    def claim(cls, root: str | Path) -> SpoolDirectory:
        """Sweep the dead apps' directories under ``root``, then make and lock our own."""
        root = prepare_root(root)
        sweep(root)
        for _ in range(10):
            path = Path(tempfile.mkdtemp(prefix=f"app-{os.getpid()}-", dir=root))
            fd = os.open(path / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # A sweeper may have taken the lock first and removed the directory.
                if os.stat(path / _LOCK).st_ino == os.fstat(fd).st_ino:
                    return cls(path, fd)
            except OSError:
                pass
            os.close(fd)
        raise OSError(errno.EAGAIN, f"cannot claim a spool directory under {root}")

    def close(self) -> None:
        """Remove the directory (whatever upload is still in it is abandoned) and unlock."""
        if self._lock_fd is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = None


class AppSpool:
    """Where one app spools its uploads: a ``SpoolDirectory`` under ``root``, claimed
    when the app starts (claiming sweeps and locks, so it waits for the lifespan) and
    removed when it stops. Handlers read ``path`` at each upload."""

    def __init__(self, root: str | Path) -> None:
        self.root = root
        self._claimed: SpoolDirectory | None = None

    @property
    def path(self) -> Path | None:
        """The claimed directory; None before the app started (the system's temporary
        directory is used then)."""
        return self._claimed.path if self._claimed is not None else None

    def claim(self) -> None:
        self._claimed = SpoolDirectory.claim(self.root)

    def close(self) -> None:
        if self._claimed is not None:
            self._claimed.close()


def prepare_root(root: str | Path) -> Path:
    """Make the spool root if needed, and make sure it is ours alone: in a shared
    temporary directory another user could have made it first, to read the uploads."""
    root = Path(root)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = root.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(errno.ENOTDIR, f"{root} is not a directory (a link is not followed)")
    if info.st_uid != os.getuid():
        raise OSError(errno.EPERM, f"{root} belongs to another user")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(errno.EPERM, f"{root} is writable by other users")
    if not os.access(root, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, f"{root} cannot be written")
    return root


def sweep(root: Path) -> list[Path]:
    """Remove the directories under ``root`` whose owner is gone; return them."""
    removed = []
    for path in root.iterdir():
        if not path.is_dir() or path.is_symlink():
            continue
        try:
            fd = os.open(path / _LOCK, os.O_RDWR)
        except FileNotFoundError:
            # Crashed between making the directory and its lock file, or being made now.
            with contextlib.suppress(FileNotFoundError):
                if time.time() - path.stat().st_mtime > _UNLOCKED_GRACE:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # held: a live app's
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


class SpoolError(BulkhookError):
    """The file cannot be followed to the size expected: discarded, or another size."""

    code = "upload_unreadable"
    http_status = 400


class Spool:
    def __init__(self, directory: str | Path | None = None) -> None:
        self._out: IO[bytes] = tempfile.NamedTemporaryFile(  # noqa: SIM115 - see close/discard
            prefix="bulkhook-upload-", suffix=".csv", dir=directory, delete=False
        )
        self.path = Path(self._out.name)
        self.size = 0  # bytes written and flushed: what a reader sees
        self.sealed = False  # every byte is written
        self.discarded = False
        self._writing: asyncio.Future[None] | None = None
        self._changed = asyncio.Event()
        self._recent: deque[tuple[int, bytearray]] = deque()  # (offset, batch)
        self._recent_bytes = 0
        self._readers: dict[object, int] = {}  # reader -> the offset it reads from next
        self._dropped = 0

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _write(self, data: bytearray, drop: int) -> None:
        self._out.write(data)
        self._out.flush()
        if drop:
            # Drops the pages already written back; starts writing back the others,
            # which the next call drops. Linux only; elsewhere the cache keeps them.
            os.posix_fadvise(self._out.fileno(), 0, drop, os.POSIX_FADV_DONTNEED)

    def _drop_point(self) -> int:
        """The bytes at the start that no reader will take from the page cache: 0 for
        none yet. A reader behind the writer keeps what it has still to read."""
        if not hasattr(os, "posix_fadvise") or self.size - self._dropped < _DROP_EVERY:
            return 0
        self._dropped = min([self.size, *self._readers.values()])
        return self._dropped

    def _written(self, data: bytearray, future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is None:
            self._recent.append((self.size, data))
            self._recent_bytes += len(data)
            while self._recent_bytes - len(self._recent[0][1]) >= _RECENT_BYTES:
                self._recent_bytes -= len(self._recent.popleft()[1])
            self.size += len(data)
            self._notify()

    def _remembered(self, offset: int) -> Bytes | None:
        """The bytes from ``offset`` to the end of the batch holding it, if in memory."""
        for start, batch in self._recent:
            if start <= offset < start + len(batch):
                return batch if start == offset else memoryview(batch)[offset - start :]
        return None

    async def write(self, data: bytearray) -> None:
        """Hand ``data`` to the writer thread once the previous batch is on disk."""
        await self._settle()
        if data:
            loop = asyncio.get_running_loop()
            self._writing = loop.run_in_executor(None, self._write, data, self._drop_point())
            self._writing.add_done_callback(partial(self._written, data))

    async def _settle(self) -> None:
        if self._writing is not None:
            writing, self._writing = self._writing, None
            await writing

    async def close(self) -> None:
        await self._settle()
        self._out.close()
        self.sealed = True
        self._notify()

    async def discard(self) -> None:
        """Remove the file; an error of the write in flight no longer matters."""
        try:
            with contextlib.suppress(Exception):
                await self._settle()
        finally:
            # If cancelled while settling, closing waits for the write thread. Closing
            # flushes what a failed write left buffered, which fails again on a full
            # disk: the file is removed all the same.
            with contextlib.suppress(OSError):
                self._out.close()
            os.unlink(self.path)
            self.discarded = True
            self._notify()

    async def follow(self, expected: int) -> AsyncIterator[Bytes]:
        """The file's bytes from the start, as they are written, until it is sealed.

        Raises ``SpoolError`` as soon as the file is discarded or certain not to be
        ``expected`` bytes long, so a reader never passes on a wrong length.
        """
        if self.discarded:
            raise SpoolError("the upload was discarded")
        loop = asyncio.get_running_loop()
        fd = os.open(self.path, os.O_RDONLY)
        reader = object()
        self._readers[reader] = 0
        try:
            offset = 0
            while True:
                if self.discarded:
                    raise SpoolError("the upload was discarded")
                if self.size > expected or (self.sealed and self.size != expected):
                    raise SpoolError(f"the file is {self.size} bytes, not {expected}")
                if offset < self.size:
                    chunk = self._remembered(offset)
                    if chunk is None:
                        length = min(_READ, self.size - offset)
                        chunk = await loop.run_in_executor(None, os.pread, fd, length, offset)
                        if len(chunk) != length:
                            raise SpoolError("the file changed while it was read")
                    offset += len(chunk)
                    self._readers[reader] = offset
                    yield chunk
                elif self.sealed:
                    return
                else:
                    await self._changed.wait()
        finally:
            del self._readers[reader]
            os.close(fd)
