"""A stored result as an HTTP response: its type, length, ETag and byte ranges.

Starlette's ``FileResponse`` streams the file and answers ``Range`` (one range: ``206``
with ``Content-Range``; a range past the end: ``416``) and ``If-Range``. Around it, this
module adds what it leaves out: the ETag is the file's SHA-256 (so it is the same on
every replica reading a shared volume, and a client can check the bytes against it),
``If-None-Match`` is answered ``304``, and a ``Range`` header that cannot be parsed, asks
for several ranges, or has a number of more than 19 digits is ignored (the whole file,
``200``) as HTTP allows, instead of Starlette's ``400``, a multipart answer or a ``500``.
(``FileResponse`` answers ranges from Starlette 0.39; the project needs 0.49.1, the
first whose range parsing is not quadratic, and only a header of one well-formed range
reaches it anyway.)

Content types: ``text/csv; charset=utf-8``, ``application/json``, and
``application/x-ndjson`` for JSON Lines (the name most tools that stream JSON Lines
send and accept).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

from starlette.responses import FileResponse, Response
from starlette.types import Receive, Scope, Send

from service.downloads.records import Format
from service.errors import ApiError

__all__ = ["CONTENT_TYPES", "result_response"]

CONTENT_TYPES: dict[Format, str] = {
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "jsonl": "application/x-ndjson",
}

# At most 19 digits a number (a 64-bit offset; no file is larger): a longer one is not
# a range this service can answer, and is ignored like any other unparseable range
# rather than reaching ``int()``'s limit on digits or Starlette's parser.
_ONE_RANGE = re.compile(
    r"bytes=[ \t]*(?:([0-9]{1,19})-([0-9]{0,19})|-[0-9]{1,19})[ \t]*", re.IGNORECASE
)
# What every answer about the stored file carries, a 304 included.
_CACHE = "private, no-cache"


def _one_range(value: bytes) -> bool:
    """Whether a Range header asks for exactly one valid range of bytes."""
    match = _ONE_RANGE.fullmatch(value.decode("latin-1"))
    if match is None:
        return False
    first, last = match.groups()
    return not (first and last and int(first) > int(last))


_UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9._-]")


def _disposition(filename: str) -> str:
    """``attachment`` with a plain ASCII ``filename`` every client reads (``curl -OJ``
    reads no other), and the exact name as ``filename*`` (RFC 6266) when the two differ:
    an object name may hold spaces, quotes or any letter."""
    plain = _UNSAFE_IN_NAME.sub("_", filename)
    if plain == filename:
        return f'attachment; filename="{filename}"'
    return f"attachment; filename=\"{plain}\"; filename*=utf-8''{quote(filename, safe='')}"


def _etag_matches(header: str, etag: str) -> bool:
    """Whether an ``If-None-Match`` list names ``etag`` (weak comparison, or ``*``)."""
    for candidate in header.split(","):
        tag = candidate.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


class _ResultFile(FileResponse):
    """A ``FileResponse`` that hands Starlette only a Range header of one range (its
    unit in lower case, as Starlette reads it; HTTP's units are case-insensitive), and
    only when an ``If-Range`` is the ETag itself: a date is a weak validator (a second
    apart), and any other value gets the whole file."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = scope.get("headers", [])
        if any(name == b"range" for name, _ in headers):
            ranges = [value for name, value in headers if name == b"range"]
            conditions = [value for name, value in headers if name == b"if-range"]
            etag = self.headers["etag"].encode("latin-1")
            kept = [(name, value) for name, value in headers if name != b"range"]
            if (
                len(ranges) == 1
                and _one_range(ranges[0])
                and all(value.strip() == etag for value in conditions)
            ):
                kept.append((b"range", ranges[0].lower()))
            scope = {**scope, "headers": kept}
        await super().__call__(scope, receive, send)


def result_response(
    path: Path,
    fmt: Format,
    sha256: str,
    request_headers: Mapping[str, str],
    *,
    filename: str | None = None,
) -> Response:
    """The answer to a GET or HEAD of the stored result at ``path``."""
    etag = f'"{sha256}"'
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise ApiError(
            "the job's result is not stored", code="result_not_found", status=404
        ) from None
    if_none_match = request_headers.get("if-none-match")
    if if_none_match is not None and _etag_matches(if_none_match, etag):
        headers = {"etag": etag, "accept-ranges": "bytes", "cache-control": _CACHE}
        return Response(status_code=304, headers=headers)
    return _ResultFile(
        path,
        media_type=CONTENT_TYPES[fmt],
        headers={
            "etag": etag,
            "cache-control": _CACHE,
            "content-disposition": _disposition(filename or path.name),
        },
        stat_result=stat,
    )
