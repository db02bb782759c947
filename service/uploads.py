"""Receiving a CSV upload: stream it to a temporary file while checking it.

``POST /jobs`` must never hold an upload in memory, must refuse an oversize body
without reading past the limit, and must answer every bad file with a 4xx. The
multipart body is parsed as it arrives (python-multipart's streaming parser, not
``request.form()``, which spools without limits); the file part goes to disk through
``CsvInspector``, which checks encoding and counts records at C speed per chunk.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import anyio.to_thread
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from .errors import ApiError

__all__ = ["CsvInspector", "CsvSummary", "ReceivedUpload", "receive_upload"]

_MAX_FIELDS = 16
_MAX_FIELD_BYTES = 64 * 1024
_MAX_HEADER_BYTES = 1 << 20
_WRITE_BATCH = 1 << 20
_BOM = b"\xef\xbb\xbf"
_BLANK_LINE = re.compile(rb"\n\r?(?=\n)")


@dataclass(frozen=True)
class CsvSummary:
    columns: tuple[str, ...]
    rows: int
    size: int


def _bad(code: str, message: str) -> ApiError:
    return ApiError(message, code=code, status=400)


class CsvInspector:
    """Incremental checks on a CSV's bytes: UTF-8, not binary, a header, data rows.

    A record ends at a line break outside double quotes; every ``"`` toggles quoting,
    so ``""`` escapes work. Blank lines are not records.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._size = 0
        self._in_quotes = False
        self._records = 0
        self._line_has_content = False
        self._header: bytes | None = None
        self._header_buffer = bytearray()
        self._header_quoted = False

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if b"\x00" in chunk:
            raise _bad("binary_file", "the file looks binary (it contains NUL bytes), not CSV")
        try:
            self._decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            raise _bad(
                "not_utf8",
                f"the file is not UTF-8 text (bad byte near offset {self._size + exc.start})",
            ) from None
        if self._header is None:
            self._collect_header(chunk)
        self._count(chunk)
        self._size += len(chunk)

    def _collect_header(self, chunk: bytes) -> None:
        """Keep bytes until the first record ends; scan each byte once."""
        offset = len(self._header_buffer)
        self._header_buffer += chunk
        for index, piece in enumerate(chunk.split(b'"')):
            if index:
                self._header_quoted = not self._header_quoted
            if not self._header_quoted and (newline := piece.find(b"\n")) >= 0:
                self._header = bytes(self._header_buffer[: offset + newline])
                self._header_buffer = bytearray()
                return
            offset += len(piece) + 1
        if len(self._header_buffer) > _MAX_HEADER_BYTES:
            raise _bad("no_header", "the first line is longer than 1 MiB: no usable header row")

    def _count(self, chunk: bytes) -> None:
        for index, piece in enumerate(chunk.split(b'"')):
            if index:
                self._in_quotes = not self._in_quotes
                self._line_has_content = True
            if self._in_quotes or not piece:
                continue
            ends = piece.count(b"\n")
            if not ends:
                self._line_has_content |= bool(piece.strip(b"\r"))
                continue
            first = piece[: piece.index(b"\n")]
            last = piece[piece.rindex(b"\n") + 1 :]
            # Lines wholly inside this piece that are blank: "\n", optional "\r", "\n".
            blank = len(_BLANK_LINE.findall(piece))
            current = self._line_has_content or bool(first.strip(b"\r"))
            self._records += int(current) + (ends - 1 - blank)
            self._line_has_content = bool(last.strip(b"\r"))

    def finish(self) -> CsvSummary:
        try:
            self._decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise _bad("not_utf8", "the file is not UTF-8 text (it ends mid-character)") from None
        if self._size == 0:
            raise _bad("empty_file", "the file is empty")
        records = self._records + (1 if self._line_has_content else 0)
        header = self._header if self._header is not None else bytes(self._header_buffer)
        if header.startswith(_BOM):
            header = header[len(_BOM) :]
        try:
            columns = next(csv.reader(io.StringIO(header.decode("utf-8").rstrip("\r"))), [])
        except csv.Error:
            columns = []
        if not any(name.strip() for name in columns):
            raise _bad("no_header", "the file has no header row")
        if records < 2:
            raise _bad("no_rows", "the file has a header row but no data rows")
        return CsvSummary(tuple(columns), records - 1, self._size)


@dataclass
class ReceivedUpload:
    path: Path
    filename: str
    summary: CsvSummary
    fields: dict[str, str] = field(default_factory=dict)


def _filename(raw: bytes | None) -> str:
    name = (raw or b"").decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    return name[:200] or "upload.csv"


class _Receiver:
    """python-multipart callbacks, collecting fields and writing the file part."""

    def __init__(self, out: io.BufferedWriter) -> None:
        self.out = out
        self.inspector = CsvInspector()
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.pending = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._header_name = b""
        self._header_value = b""
        self._name: str | None = None
        self._is_file = False
        self._value = bytearray()
        self._files = 0

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
        if b"name" not in options:
            raise _bad("malformed_multipart", "a part has no Content-Disposition name")
        self._name = options[b"name"].decode("utf-8", "replace")
        self._is_file = self._name == "file"
        if self._is_file:
            self._files += 1
            if self._files > 1:
                raise _bad("bad_upload", "send exactly one 'file' part")
            self.filename = _filename(options.get(b"filename"))
        elif len(self.fields) >= _MAX_FIELDS:
            raise _bad("bad_upload", f"at most {_MAX_FIELDS} form fields")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._is_file:
            self.inspector.feed(chunk)
            self.pending += chunk
        else:
            self._value += chunk
            if len(self._value) > _MAX_FIELD_BYTES:
                raise _bad("bad_field", f"the field '{self._name}' is longer than 64 KiB")

    def on_part_end(self) -> None:
        if not self._is_file and self._name is not None:
            try:
                self.fields[self._name] = self._value.decode("utf-8")
            except UnicodeDecodeError:
                raise _bad("bad_field", f"the field '{self._name}' is not UTF-8") from None


def _malformed(exc: Exception) -> ApiError:
    return _bad("malformed_multipart", f"the multipart body is malformed: {exc}")


def _too_large(limit: int) -> ApiError:
    return ApiError(
        f"the upload is larger than the limit of {limit} bytes",
        code="upload_too_large",
        status=413,
    )


async def receive_upload(
    request: Request, *, max_bytes: int, directory: str | Path | None = None
) -> ReceivedUpload:
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
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below, kept on success
        prefix="bulkhook-upload-", suffix=".csv", dir=directory, delete=False
    )
    path = Path(handle.name)
    try:
        receiver = _Receiver(handle)  # type: ignore[arg-type]
        parser = MultipartParser(boundary, _callbacks(receiver))  # type: ignore[arg-type]
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise _too_large(max_bytes)
            try:
                parser.write(chunk)
            except ApiError:
                raise
            except Exception as exc:
                raise _bad(
                    "malformed_multipart", f"the multipart body is malformed: {exc}"
                ) from None
            if len(receiver.pending) >= _WRITE_BATCH:
                await _flush(handle, receiver.pending)
        try:
            parser.finalize()
        except Exception as exc:
            raise _malformed(exc) from None
        await _flush(handle, receiver.pending)
        if receiver.filename is None:
            raise _bad("missing_file", "the multipart part 'file' is required")
        summary = receiver.inspector.finish()
        handle.close()
        return ReceivedUpload(path, receiver.filename, summary, receiver.fields)
    except BaseException:
        handle.close()
        os.unlink(path)
        raise


def _callbacks(receiver: _Receiver) -> dict[str, object]:
    return {
        name: getattr(receiver, name)
        for name in (
            "on_part_begin",
            "on_part_data",
            "on_part_end",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
        )
    }


async def _flush(handle: object, pending: bytearray) -> None:
    if not pending:
        return
    data = bytes(pending)
    pending.clear()
    await anyio.to_thread.run_sync(handle.write, data)  # type: ignore[attr-defined]
