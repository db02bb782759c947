"""Receiving a CSV upload: stream it to a temporary file while checking it.

``POST /jobs`` must never hold an upload in memory, must refuse an oversize body
without reading past the limit, and must answer every bad file with a 4xx. The
multipart body is parsed as it arrives (python-multipart's streaming parser, not
``request.form()``, which spools without limits); the file part goes to a ``Spool``
in 1 MiB batches, each read first by ``CsvInspector``, which checks encoding and
counts records at C speed. Once enough of the file has arrived, ``on_file`` hears
what is known by then (the fields sent before it, and the file's size when the body
ends as usual), so the caller can start sending it on while the rest arrives.

A body that stops, or trickles, holds a connection, a task and a spool file (and a
relay upstream) for as long as it lasts: like a proxy's body timeout, the read loop
cuts an upload that sends nothing for ``body_timeout`` seconds, or fewer than
``min_rate`` bytes a second over a window of ``rate_window`` seconds (the first window
is its grace), with ``408 upload_too_slow``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.errors import ApiError
from service.uploads.csv_checks import CsvInspector, CsvSummary, bad_upload
from service.uploads.spool import Spool, out_of_space

__all__ = [
    "BODY_TIMEOUT",
    "MIN_RATE",
    "RATE_WINDOW",
    "FileStart",
    "ReceivedUpload",
    "receive_upload",
]

# As nginx's client_body_timeout; a slow link of 8 kbit/s still passes the rate.
BODY_TIMEOUT = 60.0
MIN_RATE = 1024
RATE_WINDOW = 60.0

_MAX_FIELDS = 16
_MAX_FIELD_BYTES = 64 * 1024
_WRITE_BATCH = 1 << 20


@dataclass
class ReceivedUpload:
    path: Path
    filename: str
    summary: CsvSummary
    fields: dict[str, str]


@dataclass(frozen=True)
class FileStart:
    """What is known when the file part's first bytes arrive."""

    filename: str
    fields: dict[str, str]  # the fields sent before the file
    # The file's size if the file part is the body's last and the body ends the way
    # every client ends it: a guess to check against ``ReceivedUpload.summary.size``.
    size: int | None
    spool: Spool


def _filename(raw: bytes | None) -> str:
    name = (raw or b"").decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()[:200]
    return name if name.strip(".") else "upload.csv"


class _Receiver:
    """python-multipart callbacks: collect the text fields, inspect and buffer the file."""

    def __init__(self) -> None:
        self.inspector = CsvInspector()
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.pending = bytearray()  # file bytes not yet handed to the spool
        self._checked = 0  # how many of them the inspector has seen
        self.ended = False
        # Where the file's data starts in the body, once its first bytes were parsed
        # (-1: not known); ``chunk``/``offset``: the chunk being parsed and its offset.
        self.file_offset: int | None = None
        self.file_bytes = 0  # how many of the file's bytes have been parsed
        self.fields_before_file: dict[str, str] = {}
        self.chunk = b""
        self.offset = 0
        self._headers: dict[bytes, bytes] = {}
        self._header_name = b""
        self._header_value = b""
        self._name = ""
        self._is_file = False
        self._value = bytearray()

    def check(self) -> None:
        """Inspect the file bytes received so far. The inspector reads them in batches
        (far fewer calls than network chunks); it is also brought up to date before any
        other problem is reported, so a bad file is reported first, as it came first."""
        if self._checked < len(self.pending):
            fresh = self.pending if not self._checked else memoryview(self.pending)[self._checked :]
            self.inspector.feed(fresh)
            self._checked = len(self.pending)

    def take(self) -> bytearray:
        self.check()
        data, self.pending, self._checked = self.pending, bytearray(), 0
        return data

    def on_part_begin(self) -> None:
        self._headers.clear()
        self._value.clear()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if not options.get(b"name"):
            raise bad_upload("malformed_multipart", "a part has no Content-Disposition name")
        try:
            self._name = options[b"name"].decode("utf-8")
        except UnicodeDecodeError:
            raise bad_upload("bad_field", "a form field's name is not UTF-8") from None
        self._is_file = self._name == "file"
        if self._is_file:
            if self.filename is not None:
                raise bad_upload("bad_upload", "send exactly one 'file' part")
            self.filename = _filename(options.get(b"filename"))
        elif self._name in self.fields:
            raise bad_upload("bad_field", f"the field '{self._name}' is sent more than once")
        elif len(self.fields) >= _MAX_FIELDS:
            raise bad_upload("bad_field", f"at most {_MAX_FIELDS} form fields besides 'file'")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            if self.file_offset is None:
                self.file_offset = self.offset + start if data is self.chunk else -1
                self.fields_before_file = dict(self.fields)
            self.file_bytes += end - start
            self.pending += memoryview(data)[start:end]
            return
        self._value += data[start:end]
        if len(self._value) > _MAX_FIELD_BYTES:
            raise bad_upload("bad_field", f"the field '{self._name}' is longer than 64 KiB")

    def on_part_end(self) -> None:
        if self._is_file:
            self.check()
        else:
            try:
                self.fields[self._name] = self._value.decode("utf-8")
            except UnicodeDecodeError:
                raise bad_upload("bad_field", f"the field '{self._name}' is not UTF-8") from None

    def on_end(self) -> None:
        self.ended = True

    def callbacks(self) -> dict[str, object]:
        names = (
            "on_part_begin",
            "on_part_data",
            "on_part_end",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
            "on_end",
        )
        return {name: getattr(self, name) for name in names}


def _malformed(message: str) -> ApiError:
    return bad_upload("malformed_multipart", f"the multipart body is malformed: {message}")


class _Pace:
    """When an upload that brings no more bytes is too slow: ``deadline`` on the loop's
    clock. Windows are fixed, so each chunk costs a few comparisons."""

    def __init__(self, now: float, gap: float, rate: int, window: float) -> None:
        self.gap, self.rate, self.window = gap, rate, window
        self.last = now
        self.window_end = now + window
        self.in_window = 0
        self.quota = rate * window

    def deadline(self) -> float:
        short = self.window_end if self.in_window < self.quota else self.window_end + self.window
        return min(self.last + self.gap, short)

    def received(self, size: int, now: float) -> None:
        while now >= self.window_end:
            if self.in_window < self.quota:
                raise self.too_slow(now)
            self.window_end += self.window
            self.in_window = 0
        self.in_window += size
        self.last = now

    def too_slow(self, now: float) -> ApiError:
        if now >= self.last + self.gap:
            message = f"the upload sent nothing for {self.gap:g} s"
        else:
            message = (
                f"the upload brought {self.in_window} bytes in {self.window:g} s, fewer than"
                f" the least of {self.rate} bytes a second"
            )
        return ApiError(
            message,
            code="upload_too_slow",
            status=408,
            # The rest of the body is not read: the connection cannot serve another request.
            headers={"Connection": "close"},
        )


def _too_large(limit: int) -> ApiError:
    return ApiError(
        f"the upload is larger than the limit of {limit} bytes",
        code="upload_too_large",
        status=413,
    )


def _full_disk() -> ApiError:
    # Nothing about the request was wrong: the client may send it again later.
    return ApiError(
        "the service has no room to store the upload just now; try again later",
        code="insufficient_storage",
        status=507,
    )


async def receive_upload(
    request: Request,
    *,
    max_bytes: int,
    directory: str | Path | None = None,
    on_file: Callable[[FileStart], Awaitable[None]] | None = None,
    announce_after: int = 1,
    body_timeout: float = BODY_TIMEOUT,
    min_rate: int = MIN_RATE,
    rate_window: float = RATE_WINDOW,
) -> ReceivedUpload:
    """Stream a ``multipart/form-data`` body's ``file`` part to a temporary file,
    checking the CSV on the way; the caller owns (and deletes) ``ReceivedUpload.path``.

    ``on_file`` is called once ``announce_after`` bytes of the file have arrived (never
    for a smaller file). Every problem with the request is an ``ApiError`` (400, 408,
    413 or 415; 507 when the disk is full), and then no temporary file is left behind.
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise ApiError(
            "send the CSV as multipart/form-data with a 'file' part",
            code="unsupported_media_type",
            status=415,
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    receiver = _Receiver()
    try:
        parser = MultipartParser(boundary, receiver.callbacks())  # type: ignore[arg-type]
    except ValueError as exc:  # python-multipart refuses the boundary (too long)
        raise _malformed(str(exc)) from None
    try:
        spool = Spool(directory)
    except OSError as exc:
        if out_of_space(exc):
            raise _full_disk() from exc
        raise
    # A body ends with its closing delimiter and a line break (curl, browsers, httpx).
    closing = len(b"\r\n--" + boundary + b"--\r\n")
    loop = asyncio.get_running_loop()
    pace = _Pace(loop.time(), body_timeout, min_rate, rate_window)
    chunks = request.stream()
    try:
        received = 0
        try:
            while True:
                try:
                    async with asyncio.timeout_at(pace.deadline()):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    receiver.check()
                    raise pace.too_slow(loop.time()) from None
                pace.received(len(chunk), loop.time())
                receiver.chunk, receiver.offset = chunk, received
                received += len(chunk)
                if received > max_bytes:
                    receiver.check()
                    raise _too_large(max_bytes)
                try:
                    parser.write(chunk)
                except ApiError:
                    raise
                except Exception as exc:  # python-multipart's errors, whatever their type
                    receiver.check()
                    raise _malformed(str(exc)) from exc
                if on_file is not None and receiver.file_bytes >= max(1, announce_after):
                    size, offset = None, receiver.file_offset
                    if declared.isdigit() and offset is not None and offset >= 0:
                        size = int(declared) - offset - closing
                    start = FileStart(
                        str(receiver.filename), receiver.fields_before_file, size, spool
                    )
                    announce, on_file = on_file, None
                    await announce(start)
                if len(receiver.pending) >= _WRITE_BATCH:
                    await spool.write(receiver.take())
        except ClientDisconnect:
            receiver.check()
            raise _malformed("the client disconnected before the body ended") from None
        if not receiver.ended:
            receiver.check()
            raise _malformed("the body ended before the closing boundary")
        if receiver.filename is None:
            raise bad_upload("missing_file", "the multipart part 'file' is required")
        rest = receiver.take()
        summary = receiver.inspector.finish()
        await spool.write(rest)
        await spool.close()
        return ReceivedUpload(spool.path, receiver.filename, summary, receiver.fields)
    except BaseException as exc:
        await spool.discard()
        if out_of_space(exc):
            raise _full_disk() from exc
        raise
