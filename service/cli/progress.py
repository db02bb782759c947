"""An upload progress bar in bytes, drawn on stderr only when it is a terminal."""

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

__all__ = ["upload_progress"]


@contextlib.contextmanager
def upload_progress(total: int, *, force: bool | None = None) -> Iterator[Callable[[int], None]]:
    """Yield a function to call with each chunk's size; draws nothing off a TTY."""
    console = Console(file=sys.stderr, force_terminal=force)
    if not console.is_terminal:
        yield lambda _n: None
        return
    progress = Progress(
        TextColumn("uploading"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    with progress:
        task = progress.add_task("upload", total=total)
        yield lambda n: progress.advance(task, n)
