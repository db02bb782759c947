"""Checking a CSV's bytes as they arrive: not binary, UTF-8, a header row, data rows.

An upload is refused as soon as a problem is certain, long before a 1 GiB file has
arrived, and the outcome must not depend on how the network split the bytes. Pure: no
I/O, so it is tested on any chunking of any bytes.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.errors import ApiError

__all__ = ["MAX_HEADER_BYTES", "CsvInspector", "CsvSummary", "bad_upload"]

MAX_HEADER_BYTES = 1 << 20

# feed() works through a larger chunk in windows of this size, so the temporary
# objects of one step (split pieces, the collapsed copy) stay small; a chunk up to this
# size (an upload's batch) is read where it lies, without a copy.
_WINDOW = 1 << 21
_BOM = b"\xef\xbb\xbf"
# Invalid UTF-8 is reported once this many more bytes came without a NUL byte: a binary
# file (an image, a spreadsheet, UTF-16 text) has both, and is better called binary.
# At least 3: a bad sequence shows by its 4th byte at the latest, whatever the chunks.
_BINARY_PROBE = 8192
_LF, _CR = ord("\n"), ord("\r")
# Deleting these from a window leaves only its '"' and line breaks.
_NOT_QUOTE_OR_LF = bytes(byte for byte in range(256) if byte not in b'"\n')


@dataclass(frozen=True)
class CsvSummary:
    columns: tuple[str, ...]
    rows: int
    size: int


def bad_upload(code: str, message: str) -> ApiError:
    """A 400 for an upload that cannot become a job."""
    return ApiError(message, code=code, status=400)


def _not_utf8(offset: int) -> ApiError:
    return bad_upload(
        "not_utf8", f"the file is not UTF-8 text: invalid byte sequence at byte {offset}"
    )


def _binary(offset: int) -> ApiError:
    return bad_upload(
        "binary_file", f"the file looks binary, not CSV text: a NUL byte at byte {offset}"
    )


def _same(offset: int) -> int:
    return offset


def _has_content(data: bytes | bytearray, start: int = 0, end: int | None = None) -> bool:
    """Whether ``data[start:end]`` holds anything but carriage returns (no copy)."""
    end = len(data) if end is None else end
    return data.count(b"\r", start, end) != end - start


class _Marks:
    """Where a window holds a byte, one boolean per byte, as NumPy marks it: at memory
    speed, where Python's own searches for these patterns take a loop per byte (a fifth
    of an upload's CPU). The arrays are reused from window to window: a fresh megabyte
    for every comparison costs as much in page faults as the comparison itself."""

    def __init__(self) -> None:
        self._arrays = [np.empty(0, np.bool_) for _ in range(3)]

    def _array(self, index: int, size: int) -> np.ndarray:
        if len(self._arrays[index]) < size:
            self._arrays[index] = np.empty(size, np.bool_)
        return self._arrays[index][:size]

    def line_breaks(self, text: bytes | bytearray) -> np.ndarray:
        is_lf = self._array(0, len(text))
        np.equal(np.frombuffer(text, np.uint8), _LF, out=is_lf)
        return is_lf

    def may_have_blank_lines(self, text: bytes | bytearray, is_lf: np.ndarray) -> bool:
        """Whether a line holding only "\r"s may lie between two line breaks: certainly
        not when no "\n\n", "\n\r\n" or "\r\r" occurs."""
        size = len(text)
        pairs = self._array(1, size - 1)
        if np.logical_and(is_lf[:-1], is_lf[1:], out=pairs).any():
            return True
        if text.find(b"\r") < 0:
            return False
        is_cr = np.equal(np.frombuffer(text, np.uint8), _CR, out=self._array(2, size))
        if np.logical_and(is_cr[:-1], is_cr[1:], out=pairs).any():
            return True
        np.logical_and(is_lf[:-1], is_cr[1:], out=pairs)  # "\n\r" starts here
        return bool(np.logical_and(pairs[:-1], is_lf[2:], out=pairs[:-1]).any())


def _blank_lines(lines: bytes | bytearray) -> int:
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
    csv module. Every check is made of bytes methods, C codecs and NumPy comparisons
    per window, never a Python loop per byte, line or field, and the outcome — summary
    or error, message included — does not depend on how the bytes are split into
    chunks. A problem is raised as soon as it is certain; of several, the one certain
    first wins (invalid UTF-8 is certain 8 KiB after it, unless a NUL byte comes first:
    then it is binary).
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
        self._marks = _Marks()

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        if len(chunk) <= _WINDOW:
            if chunk:
                # bytes and bytearray have every method a scan uses: no copy for them.
                self._scan(chunk if isinstance(chunk, bytes | bytearray) else bytes(chunk))
            return
        view = memoryview(chunk)
        for start in range(0, len(view), _WINDOW):
            self._scan(bytes(view[start : start + _WINDOW]))

    def _scan(self, window: bytes | bytearray) -> None:
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

    def _unquoted(
        self, window: bytes | bytearray
    ) -> tuple[bytes | bytearray, Callable[[int], int]]:
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

    def _collapse(self, rest: bytes | bytearray) -> tuple[bytes | bytearray, Callable[[int], int]]:
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

    def _take_header(self, window: bytes | bytearray, end: int) -> tuple[int, ApiError] | None:
        """Keep the first record's bytes (``end``: where it ends in the window, or -1);
        a problem, at the byte past the limit, if it is longer than allowed."""
        length = len(window) if end < 0 else end
        if self._size + length > self._max_header:
            return self._max_header, bad_upload(
                "no_header",
                f"the first record is longer than {self._max_header} bytes: no usable header row",
            )
        self._head += window[:length]
        if end >= 0:
            self._header = bytes(self._head)
            self._head = bytearray()
        return None

    def _count(self, text: bytes | bytearray) -> None:
        is_lf = self._marks.line_breaks(text)
        ends = int(np.count_nonzero(is_lf))
        if not ends:
            self._open = self._open or _has_content(text)
            return
        first = text.find(b"\n")
        last = text.rfind(b"\n")
        blank = 0
        if ends > 1 and self._marks.may_have_blank_lines(text, is_lf):
            blank = _blank_lines(text[first : last + 1])
        current = self._open or _has_content(text, 0, first)
        self._records += int(current) + (ends - 1 - blank)
        self._open = _has_content(text, last + 1)

    def finish(self) -> CsvSummary:
        if self._size == 0:
            raise bad_upload("empty_file", "the file is empty")
        if self._bad_utf8 is not None:
            raise _not_utf8(self._bad_utf8)
        pending = self._decoder.getstate()[0]
        if pending:
            raise _not_utf8(self._size - len(pending))
        records = self._records + int(self._open)
        header = self._header if self._header is not None else bytes(self._head)
        columns = _parse_header(header.removeprefix(_BOM))
        if not any(name.strip() for name in columns):
            raise bad_upload(
                "no_header", "the file has no header row (its first line names no column)"
            )
        if records < 2:
            raise bad_upload("no_rows", "the file has a header row but no data rows")
        return CsvSummary(tuple(columns), records - 1, self._size)


def _parse_header(header: bytes) -> list[str]:
    text = header.decode("utf-8", "replace").rstrip("\r")
    try:
        return next(csv.reader(io.StringIO(text)), [])
    except csv.Error as exc:
        raise bad_upload("no_header", f"the header row is not valid CSV: {exc}") from None
