"""Receiving a CSV upload: stream it to a temporary file while checking it.

``POST /jobs`` must never hold an upload in memory, must refuse an oversize body
without reading past the limit, and must answer every bad file with a 4xx. The
multipart body is parsed as it arrives (python-multipart's streaming parser, not
``request.form()``, which spools without limits); the file part goes to disk through
``CsvInspector``, which checks encoding and counts records at C speed per chunk.
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import io
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from .errors import ApiError

__all__ = ["MAX_HEADER_BYTES", "CsvInspector", "CsvSummary", "ReceivedUpload", "receive_upload"]

MAX_HEADER_BYTES = 1 << 20
_MAX_FIELDS = 16
_MAX_FIELD_BYTES = 64 * 1024
_WRITE_BATCH = 1 << 20
# feed() works through a larger chunk in windows of this size, so the temporary
# objects of one step (split pieces, the collapsed copy) stay small.
_WINDOW = 1 << 18
_BOM = b"\xef\xbb\xbf"
# Invalid UTF-8 is reported once this many more bytes came without a NUL byte: a binary
# file (an image, a spreadsheet, UTF-16 text) has both, and is better called binary.
# At least 3: a bad sequence shows by its 4th byte at the latest, whatever the chunks.
_BINARY_PROBE = 8192
# A blank line (nothing but "\r"s) between two line breaks; a regex search for it
# beats `b"\n\n" in text`, which is slow on text with a line break every few bytes.
_BLANK_LINE = re.compile(rb"\n\r*\n")
# Deleting these from a window leaves only its '"' and line breaks.
_NOT_QUOTE_OR_LF = bytes(byte for byte in range(256) if byte not in b'"\n')


@dataclass(frozen=True)
class CsvSummary:
    columns: tuple[str, ...]
    rows: int
    size: int


def _bad(code: str, message: str) -> ApiError:
    return ApiError(message, code=code, status=400)


def _not_utf8(offset: int) -> ApiError:
    return _bad("not_utf8", f"the file is not UTF-8 text: invalid byte sequence at byte {offset}")


def _binary(offset: int) -> ApiError:
    return _bad("binary_file", f"the file looks binary, not CSV text: a NUL byte at byte {offset}")


def _same(offset: int) -> int:
    return offset


def _has_content(data: bytes, start: int = 0, end: int | None = None) -> bool:
    """Whether ``data[start:end]`` holds anything but carriage returns (no copy)."""
    end = len(data) if end is None else end
    return data.count(b"\r", start, end) != end - start


def _blank_lines(lines: bytes) -> int:
    """How many lines between the first and the last line break hold only "\r"s."""
    if b"\r" in lines:
        lines = lines.translate(None, b"\r")
    # Now the blank lines are the overlapping b"\n\n" pairs: a plain count finds every
    # other pair of a run; marking those apart reveals the ones in between (NUL cannot
    # occur: a file with NUL bytes is refused before it is counted).
    return lines.count(b"\n\n") + lines.replace(b"\n\n", b"\n\x00\n").count(b"\n\n")


class CsvInspector:
    """Incremental checks on a CSV's bytes: not binary, UTF-8, a header row, data rows.

    Pure (no I/O): ``feed`` the bytes as they arrive, then ``finish``. A record ends at
    a line break outside double quotes, and every ``"`` toggles quoting (so ``""``
    escapes work); a line holding nothing but ``\\r`` is blank and not a record. The
    first record is the header (a UTF-8 BOM before it is dropped), parsed with the
    csv module. Every check is made of bytes methods and C codecs per window, never a
    Python loop per byte, line or field, and the outcome — summary or error, message
    included — does not depend on how the bytes are split into chunks. A problem is
    raised as soon as it is certain; of several, the one certain first wins (invalid
    UTF-8 is certain 8 KiB after it, unless a NUL byte comes first: then it is binary).
    """

    def __init__(self, *, max_header_bytes: int = MAX_HEADER_BYTES) -> None:
        self._max_header = max_header_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._size = 0
        self._in_quotes = False
        self._records = 0  # complete non-blank records
        self._open = False  # the current, unfinished line has content
        self._header: bytes | None = None
        self._head = bytearray()  # the header's bytes while its end is not seen yet
        self._bad_utf8: int | None = None  # where the first invalid UTF-8 sequence starts

    def feed(self, chunk: bytes) -> None:
        if len(chunk) <= _WINDOW:
            if chunk:
                self._scan(bytes(chunk))
            return
        view = memoryview(chunk)
        for start in range(0, len(view), _WINDOW):
            self._scan(bytes(view[start : start + _WINDOW]))

    def _scan(self, window: bytes) -> None:
        # Problems, each with the offset at which it is certain; the earliest wins.
        base = self._size
        problems: list[tuple[int, ApiError]] = []
        if (nul := window.find(b"\x00")) >= 0:
            problems.append((base + nul, _binary(base + nul)))
        if self._bad_utf8 is None:
            pending = self._decoder.getstate()[0]
            if pending or not window.isascii():
                try:
                    self._decoder.decode(window)
                except UnicodeDecodeError as exc:
                    self._bad_utf8 = base - len(pending) + exc.start
        if self._bad_utf8 is not None and base + len(window) > self._bad_utf8 + _BINARY_PROBE:
            problems.append((self._bad_utf8 + _BINARY_PROBE, _not_utf8(self._bad_utf8)))

        text, record_end = self._unquoted(window)
        if self._header is None:
            problem = self._take_header(window, record_end(text.find(b"\n")))
            if problem is not None:
                problems.append(problem)
        if problems:
            raise min(problems, key=lambda problem: problem[0])[1]
        self._size += len(window)
        self._count(text)
        if self._in_quotes:
            self._open = True

    def _unquoted(self, window: bytes) -> tuple[bytes, Callable[[int], int]]:
        """The window with every quoted stretch collapsed to one '"' (so it holds exactly
        the line breaks that end records, and '"' counts as content), and a function
        mapping an offset in that text back to the window. Updates the quote state."""
        skip = 0
        if self._in_quotes:
            # The rest of a quoted stretch: part of the current line, which has content.
            skip = window.find(b'"') + 1
            if not skip:
                return b"", _same
            self._in_quotes = False
        text, to_rest = self._collapse(window[skip:] if skip else window)
        if not skip:
            return text, to_rest
        return text, lambda offset: offset if offset < 0 else skip + to_rest(offset)

    def _collapse(self, rest: bytes) -> tuple[bytes, Callable[[int], int]]:
        """``_unquoted`` for bytes that start outside quotes."""
        if b'"' not in rest:
            return rest, _same
        marks = rest.translate(None, _NOT_QUOTE_OR_LF)
        last = marks.rfind(b"\n")
        if b'"' not in marks[: last + 1].replace(b'""', b""):
            # The usual case: up to the last line break every line's quotes pair up, so
            # no line break is quoted and the bytes serve as they are.
            self._in_quotes = bool(marks.count(b'"', last + 1) & 1)
            return rest, _same
        pieces = rest.split(b'"')
        outside = pieces[0::2]
        self._in_quotes = bool((len(pieces) - 1) & 1)
        text = b'"'.join(outside)

        def to_rest(offset: int) -> int:
            if offset < 0:
                return offset
            # The offset is in outside piece k (k quote markers before it in the text),
            # which is piece 2k of the bytes; every piece but the last ended at a '"'.
            k = text.count(b'"', 0, offset)
            before = sum(map(len, pieces[: 2 * k])) + 2 * k
            return before + offset - sum(map(len, outside[:k])) - k

        return text, to_rest

    def _take_header(self, window: bytes, end: int) -> tuple[int, ApiError] | None:
        """Keep the first record's bytes (``end``: where it ends in the window, or -1);
        a problem, at the byte past the limit, if it is longer than allowed."""
        length = len(window) if end < 0 else end
        if self._size + length > self._max_header:
            return self._max_header, _bad(
                "no_header",
                f"the first record is longer than {self._max_header} bytes: no usable header row",
            )
        self._head += window[:length]
        if end >= 0:
            self._header = bytes(self._head)
            self._head = bytearray()
        return None

    def _count(self, text: bytes) -> None:
        ends = text.count(b"\n")
        if not ends:
            self._open = self._open or _has_content(text)
            return
        first = text.find(b"\n")
        last = text.rfind(b"\n")
        blank = 0
        if ends > 1 and _BLANK_LINE.search(text, first, last + 1):
            blank = _blank_lines(text[first : last + 1])
        current = self._open or _has_content(text, 0, first)
        self._records += int(current) + (ends - 1 - blank)
        self._open = _has_content(text, last + 1)

    def finish(self) -> CsvSummary:
        if self._size == 0:
            raise _bad("empty_file", "the file is empty")
        if self._bad_utf8 is not None:
            raise _not_utf8(self._bad_utf8)
        pending = self._decoder.getstate()[0]
        if pending:
            raise _not_utf8(self._size - len(pending))
        records = self._records + int(self._open)
        header = self._header if self._header is not None else bytes(self._head)
        columns = _parse_header(header.removeprefix(_BOM))
        if not any(name.strip() for name in columns):
            raise _bad("no_header", "the file has no header row (its first line is blank)")
        if records < 2:
            raise _bad("no_rows", "the file has a header row but no data rows")
        return CsvSummary(tuple(columns), records - 1, self._size)


def _parse_header(header: bytes) -> list[str]:
    text = header.decode("utf-8", "replace").rstrip("\r")
    try:
        return next(csv.reader(io.StringIO(text)), [])
    except csv.Error as exc:
        raise _bad("no_header", f"the header row is not valid CSV: {exc}") from None


@dataclass
class ReceivedUpload:
    path: Path
    filename: str
    summary: CsvSummary
    fields: dict[str, str]


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
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._header_name = b""
        self._header_value = b""
        self._name = ""
        self._is_file = False
        self._value = bytearray()

    def take(self) -> bytearray:
        data, self.pending = self.pending, bytearray()
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
            raise _bad("malformed_multipart", "a part has no Content-Disposition name")
        try:
            self._name = options[b"name"].decode("utf-8")
        except UnicodeDecodeError:
            raise _bad("bad_field", "a form field's name is not UTF-8") from None
        self._is_file = self._name == "file"
        if self._is_file:
            if self.filename is not None:
                raise _bad("bad_upload", "send exactly one 'file' part")
            self.filename = _filename(options.get(b"filename"))
        elif self._name in self.fields:
            raise _bad("bad_field", f"the field '{self._name}' is sent more than once")
        elif len(self.fields) >= _MAX_FIELDS:
            raise _bad("bad_field", f"at most {_MAX_FIELDS} form fields besides 'file'")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._is_file:
            self.inspector.feed(chunk)
            self.pending += chunk
            return
        self._value += chunk
        if len(self._value) > _MAX_FIELD_BYTES:
            raise _bad("bad_field", f"the field '{self._name}' is longer than 64 KiB")

    def on_part_end(self) -> None:
        if not self._is_file:
            try:
                self.fields[self._name] = self._value.decode("utf-8")
            except UnicodeDecodeError:
                raise _bad("bad_field", f"the field '{self._name}' is not UTF-8") from None

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
    return _bad("malformed_multipart", f"the multipart body is malformed: {message}")


def _too_large(limit: int) -> ApiError:
    return ApiError(
        f"the upload is larger than the limit of {limit} bytes",
        code="upload_too_large",
        status=413,
    )


async def receive_upload(
    request: Request, *, max_bytes: int, directory: str | Path | None = None
) -> ReceivedUpload:
    """Stream a ``multipart/form-data`` body's ``file`` part to a temporary file,
    checking the CSV on the way; the caller owns (and deletes) ``ReceivedUpload.path``.

    Every problem with the request is an ``ApiError`` (400, 413 or 415), and then no
    temporary file is left behind.
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
    spool = _Spool(directory)
    try:
        received = 0
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes:
                    raise _too_large(max_bytes)
                try:
                    parser.write(chunk)
                except ApiError:
                    raise
                except Exception as exc:  # python-multipart's errors, whatever their type
                    raise _malformed(str(exc)) from exc
                if len(receiver.pending) >= _WRITE_BATCH:
                    await spool.write(receiver.take())
        except ClientDisconnect:
            raise _malformed("the client disconnected before the body ended") from None
        if not receiver.ended:
            raise _malformed("the body ended before the closing boundary")
        if receiver.filename is None:
            raise _bad("missing_file", "the multipart part 'file' is required")
        summary = receiver.inspector.finish()
        await spool.write(receiver.take())
        await spool.close()
        return ReceivedUpload(spool.path, receiver.filename, summary, receiver.fields)
    except BaseException:
        await spool.discard()
        raise


class _Spool:
    """The temporary file, written in a worker thread: one batch is being written
    while the next one is received and checked, so disk and parsing overlap."""

    def __init__(self, directory: str | Path | None) -> None:
        self._out: BinaryIO = tempfile.NamedTemporaryFile(  # noqa: SIM115 - see close/discard
            prefix="bulkhook-upload-", suffix=".csv", dir=directory, delete=False
        )
        self.path = Path(self._out.name)
        self._writing: asyncio.Future[int] | None = None

    async def write(self, data: bytearray) -> None:
        await self._settle()
        if data:
            loop = asyncio.get_running_loop()
            self._writing = loop.run_in_executor(None, self._out.write, data)

    async def _settle(self) -> None:
        if self._writing is not None:
            writing, self._writing = self._writing, None
            await writing

    async def close(self) -> None:
        await self._settle()
        self._out.close()

    async def discard(self) -> None:
        """Remove the file; an error of the write in flight no longer matters."""
        try:
            await self._settle()
        except Exception:  # noqa: S110 - the upload is being refused already
            pass
        finally:
            self._out.close()  # if cancelled while settling: waits for the write thread
            os.unlink(self.path)
