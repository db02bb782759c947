"""A ``multipart/form-data`` body with one file part, streamed from disk.

The length is known up front (so no chunked encoding is needed), the file is read in
chunks (never whole), and the body can be produced again for a retry. Both the
upstream client (async) and the CLI (sync, with a progress bar) send uploads this way.
The file can also be a ``FileStream``: bytes of a known length that are still
arriving (an upload relayed upstream while it is received).

Plain form fields (no filename, no ``Content-Type``) all go before the file part, as
Open Connectors' own test client sends ``metaData``: everything but the file is in
``head``, so ``tail`` is only the line break and the closing boundary.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import anyio

__all__ = ["CHUNK", "Chunk", "FileStream", "MultipartFile"]

CHUNK = 1 << 20
# A piece of a body: any buffer, so bytes still in the spool go out without a copy.
Chunk = bytes | bytearray | memoryview


@dataclass(frozen=True)
class FileStream:
    """A file's ``size`` and a way to produce its bytes, from the start, each call."""

    size: int
    chunks: Callable[[], AsyncIterator[Chunk]]


def _part_head(boundary: str, disposition: str, content_type: str | None) -> str:
    head = f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    return head + "\r\n"


class MultipartFile:
    def __init__(
        self,
        file: Path | FileStream,
        *,
        file_field: str = "file",
        filename: str | None = None,
        fields: Mapping[str, str] | None = None,
    ) -> None:
        """``fields`` are plain form fields, sent in their order before the file."""
        self.file = file
        if isinstance(file, FileStream):
            self.file_size = file.size
            name = filename or "upload.csv"
        else:
            self.file_size = file.stat().st_size
            name = filename or file.name
        self.boundary = secrets.token_hex(16)
        name = quote(name, safe=" !#$&'()+,-.;=@[]^_`{}~")
        head = "".join(
            _part_head(self.boundary, f'name="{key}"', None) + f"{value}\r\n"
            for key, value in (fields or {}).items()
        )
        head += _part_head(self.boundary, f'name="{file_field}"; filename="{name}"', "text/csv")
        self.head = head.encode()
        self.tail = f"\r\n--{self.boundary}--\r\n".encode()
        self.length = len(self.head) + self.file_size + len(self.tail)

    @property
    def headers(self) -> dict[str, str]:
        return {
            "Content-Type": f"multipart/form-data; boundary={self.boundary}",
            "Content-Length": str(self.length),
        }

    def __iter__(self) -> Iterator[bytes]:
        return self.iter()

    def iter(self, progress: Callable[[int], None] | None = None) -> Iterator[bytes]:
        if isinstance(self.file, FileStream):
            raise TypeError("a FileStream is read asynchronously: use aiter()")
        yield self.head
        with self.file.open("rb") as source:
            while chunk := source.read(CHUNK):
                if progress is not None:
                    progress(len(chunk))
                yield chunk
        yield self.tail

    async def aiter(self, progress: Callable[[int], None] | None = None) -> AsyncIterator[Chunk]:
        yield self.head
        async for chunk in self._file_chunks():
            if progress is not None:
                progress(len(chunk))
            yield chunk
        yield self.tail

    async def _file_chunks(self) -> AsyncIterator[Chunk]:
        if isinstance(self.file, FileStream):
            async for chunk in self.file.chunks():
                yield chunk
            return
        async with await anyio.open_file(self.file, "rb") as source:
            while chunk := await source.read(CHUNK):
                yield chunk
