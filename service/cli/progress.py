"""Transfer progress bars in bytes, drawn on stderr only when it is a terminal."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = ["Bar", "download_progress", "upload_progress"]

# A context that yields the function to call with each chunk's size.
Bar = contextlib.AbstractContextManager[Callable[[int], None]]


@contextlib.contextmanager
def _progress(label: str, total: int | None, force: bool | None) -> Iterator[Callable[[int], None]]:
    console = Console(file=sys.stderr, force_terminal=force)
    if not console.is_terminal:
        yield lambda _n: None
        return
    progress = Progress(
        TextColumn(label),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    with progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


def upload_progress(total: int, *, force: bool | None = None) -> Bar:
    """Yield a function to call with each chunk's size; draws nothing off a TTY."""
    return _progress("uploading", total, force)


def download_progress(total: int | None, *, force: bool | None = None) -> Bar:
    """As ``upload_progress``, for a file coming down (``total`` None: size unknown)."""
    return _progress("downloading", total, force)
