"""Counting a download's records while its bytes stream past (pure, no I/O).

A counter is fed chunks of any size, split anywhere (inside a UTF-8 sequence, a quoted
field, a string or a CRLF), and says at the end how many records it saw and whether
the file was well-formed. Each format's rules:

* ``csv`` (RFC 4180): the first non-blank row is the header, not a record. A record
  ends at a line feed outside quotes (a CR before it belongs to the line end); quoted
  fields may hold commas, doubled quotes and line breaks. A last line without a line
  end counts; blank lines (empty, or a lone CR) do not. Not well-formed: a quote left
  open at the end, a quote inside an unquoted field, or text right after a closing
  quote.
* ``json``: one top-level array; its elements are the records. Strings (with their
  escapes, and brackets inside them) are skipped whole; whitespace may be anywhere.
  The check is structural (brackets match, strings close, no empty elements, nothing
  but whitespace around the array), not a full JSON parse: numbers and literals are
  not checked.
* ``jsonl``: every line holding anything but whitespace (JSON's: space, tab, CR) is a
  record. Lines are not parsed.

Speed matters (results reach gigabytes): the scanning is done by ``bytes.find``,
``bytes.count`` and compiled patterns, never a Python step per byte. A CSV's quoted
fields are collapsed in one pass per chunk; a JSON array's elements nested up to two
deep are matched whole, a run at a time, and deeper ones take a step per bracket.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Protocol

__all__ = [
    "FORMATS",
    "Count",
    "CsvCounter",
    "Format",
    "JsonArrayCounter",
    "JsonLinesCounter",
    "RecordCounter",
    "counter_for",
]

Format = Literal["csv", "json", "jsonl"]
FORMATS: tuple[Format, ...] = ("csv", "json", "jsonl")

_LF = 10
_CR = 13
_QUOTE = 34
_COMMA = 44
_BACKSLASH = 92
# A blank CSV line inside a stretch without quotes: its line feed is preceded by another
# (with at most a CR between). The lookahead lets runs of blank lines all be found.
_CSV_BLANK = re.compile(rb"\n\r?(?=\n)")
# A whole quoted field, doubled quotes and line breaks inside it, in one match.
_QUOTED_FIELD = re.compile(rb'"[^"]*+(?:""[^"]*+)*+"')
# Once each quoted field is a lone quote: one not at a field's start, or followed by
# anything but a field's or row's end.
_QUOTE_INSIDE = re.compile(rb'[^,\n]"')
_TEXT_AFTER = re.compile(rb'"[^,\r\n]')
_JSONL_BLANK = re.compile(rb"\n[ \t\r]*(?=\n)")
# JSON's whitespace: a vertical tab or form feed is content (a blank JSON Lines line
# holds only these, less the line feed), in one chunk or split across many.
_JSON_SPACE = b" \t\r\n"
_JSONL_SPACE = b" \t\r"
# Outside a string: everything up to the next bracket (or comma, at the array's own
# level) that is not inside a string, whole strings included, in one match. It stops
# at a quote only when that string goes on past this chunk.
_STRING = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_SKIP_DEEP = re.compile(rb'[^"\[\]{}]*+(?:' + _STRING + rb'[^"\[\]{}]*+)*+', re.DOTALL)
_SKIP_TOP = re.compile(rb'[^"\[\]{},]*+(?:' + _STRING + rb'[^"\[\]{},]*+)*+', re.DOTALL)
# Elements nested at most two deep, each with its comma, matched in C: a run of them is
# counted in two passes instead of one Python step per bracket.
_INNER = rb'[^"\[\]{}]*+(?:' + _STRING + rb'[^"\[\]{}]*+)*+'
_SHALLOW = rb"\{" + _INNER + rb"\}|\[" + _INNER + rb"\]"
_MIDDLE = rb'[^"\[\]{}]*+(?:(?:' + _STRING + rb"|" + _SHALLOW + rb')[^"\[\]{}]*+)*+'
_ELEMENT = (
    rb"[ \t\r\n]*+(?:\{"
    + _MIDDLE
    + rb"\}|\["
    + _MIDDLE
    + rb"\]|"
    + _STRING
    + rb'|[^ \t\r\n"\[\]{},]++)[ \t\r\n]*+,'
)
_ELEMENT_ONE = re.compile(_ELEMENT, re.DOTALL)
_ELEMENT_RUN = re.compile(rb"(?:" + _ELEMENT + rb")++", re.DOTALL)
# Deeper than this is refused: the open brackets are kept on a stack.
MAX_JSON_DEPTH = 10_000


@dataclass(frozen=True, slots=True)
class Count:
    """What a counter saw: the records, and why the file is not well-formed (if not)."""

    records: int
    detail: str | None = None

    @property
    def well_formed(self) -> bool:
        return self.detail is None


class RecordCounter(Protocol):
    def feed(self, data: bytes) -> None: ...

    def finish(self) -> Count: ...


def counter_for(fmt: Format) -> RecordCounter:
    if fmt == "csv":
        return CsvCounter()
    if fmt == "json":
        return JsonArrayCounter()
    if fmt == "jsonl":
        return JsonLinesCounter()
    raise ValueError(f"unknown result format {fmt!r}")


# What the current line holds so far: nothing, a lone CR, or content.
_EMPTY, _ONLY_CR, _CONTENT = 0, 1, 2


class CsvCounter:
    """Counts RFC 4180 CSV records (the header row excluded)."""

    def __init__(self) -> None:
        self._rows = 0  # non-blank rows ended so far, the header included
        self._line = _EMPTY
        self._in_quotes = False
        # A closing quote was the last byte seen: the next one decides whether it was
        # one (anything else) or the first half of a doubled quote ('"').
        self._after_close = False
        self._prev = _LF  # the last byte seen; a line feed stands for the file's start
        self._detail: str | None = None

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._in_quotes:
                j = data.find(b'"', i)
                if j < 0:
                    self._prev = data[n - 1]
                    return
                self._in_quotes = False
                self._after_close = True
                self._prev = _QUOTE
                i = j + 1
                continue
            if self._after_close:
                self._after_close = False
                following = data[i]
                if following == _QUOTE:  # a doubled quote: still inside the field
                    self._in_quotes = True
                    self._prev = _QUOTE
                    i += 1
                    continue
                if following not in (_COMMA, _CR, _LF) and self._detail is None:
                    self._detail = "text follows a closing quote"
            quotes = data.count(b'"', i)
            if quotes == 0:
                self._unquoted(data, i, n)
                return
            # An odd count leaves the last quote open: its field goes on past this chunk.
            end = n if quotes % 2 == 0 else data.rfind(b'"')
            if end > i:
                self._fields(data[i:end])
            if end < n:
                # After a closing quote, the open one doubles it: the field goes on.
                doubled = end > i and data[end - 1] == _QUOTE
                if not doubled and self._prev not in (_COMMA, _LF) and self._detail is None:
                    self._detail = "a quote inside an unquoted field"
                self._in_quotes = True
                self._line = _CONTENT
                self._prev = _QUOTE
                i = end + 1
                continue
            # A closing quote last: the next chunk may start with its other half.
            self._after_close = data[n - 1] == _QUOTE
            return

    def _fields(self, stretch: bytes) -> None:
        """A stretch whose quoted fields all close in it.

        Each quoted field becomes a lone quote, in one pass in C, so the line feeds
        left are the ones that end rows; what remains is counted like a stretch
        without quotes.
        """
        flat = _QUOTED_FIELD.sub(b'"', stretch)
        if self._detail is None:
            # The first problem in the file is the one reported, however it is split:
            # each found is placed by its offending byte (collapsing keeps the order).
            found: list[tuple[int, str]] = []
            if _QUOTE_INSIDE.search(bytes((self._prev,)) + flat[:1]):
                found.append((0, "a quote inside an unquoted field"))
            inside = _QUOTE_INSIDE.search(flat)
            if inside is not None:
                found.append((inside.start() + 1, "a quote inside an unquoted field"))
            after = _TEXT_AFTER.search(flat)
            if after is not None:
                found.append((after.start() + 1, "text follows a closing quote"))
            if found:
                self._detail = min(found)[1]
        self._unquoted(flat, 0, len(flat))

    def _unquoted(self, data: bytes, start: int, end: int) -> None:
        """A stretch without quotes: its line feeds all end rows."""
        self._prev = data[end - 1]
        breaks = data.count(b"\n", start, end)
        if breaks == 0:
            self._line = _grow(self._line, data, start, end)
            return
        first = data.find(b"\n", start, end)
        blank = 1 if _grow(self._line, data, start, first) != _CONTENT else 0
        if data.find(b"\n\n", first, end) >= 0 or data.find(b"\n\r\n", first, end) >= 0:
            blank += len(_CSV_BLANK.findall(data, first, end))
        self._rows += breaks - blank
        last = data.rfind(b"\n", start, end)
        self._line = _grow(_EMPTY, data, last + 1, end)

    def finish(self) -> Count:
        rows = self._rows + (1 if self._line == _CONTENT else 0)
        detail = self._detail  # the first problem is the one reported
        if detail is None and self._in_quotes:
            detail = "a quoted field is not closed"
        return Count(max(rows - 1, 0), detail)


def _grow(line: int, data: bytes, start: int, end: int) -> int:
    """The current line's state once ``data[start:end]`` (no line feed) is added."""
    if end <= start:
        return line
    if line == _EMPTY and end - start == 1 and data[start] == _CR:
        return _ONLY_CR
    return _CONTENT


class JsonLinesCounter:
    """Counts JSON Lines records: the lines holding anything but whitespace."""

    def __init__(self) -> None:
        self._lines = 0
        self._content = False  # the current line holds something but whitespace

    def feed(self, data: bytes) -> None:
        n = len(data)
        breaks = data.count(b"\n")
        if breaks == 0:
            self._content = self._content or bool(data.strip(_JSONL_SPACE))
            return
        first = data.find(b"\n")
        blank = 0 if (self._content or data[:first].strip(_JSONL_SPACE)) else 1
        blank += len(_JSONL_BLANK.findall(data, first, n))
        self._lines += breaks - blank
        self._content = bool(data[data.rfind(b"\n") + 1 :].strip(_JSONL_SPACE))

    def finish(self) -> Count:
        return Count(self._lines + (1 if self._content else 0))


_BEFORE, _INSIDE, _AFTER, _DEAD = 0, 1, 2, 3
_CLOSER = {ord("["): ord("]"), ord("{"): ord("}")}


class JsonArrayCounter:
    """Counts the top-level elements of one JSON array, checking its structure."""

    def __init__(self) -> None:
        self._stage = _BEFORE
        self._stack = bytearray()  # the closer each open bracket expects
        self._records = 0  # elements ended so far
        self._value = False  # the current element has something in it
        self._in_string = False
        self._escaped = False  # a string's last byte so far was an unpaired backslash
        self._detail: str | None = None

    def _fail(self, detail: str) -> None:
        self._detail = detail
        self._stage = _DEAD

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n and self._stage != _DEAD:
            if self._in_string:
                i = self._string_rest(data, i)
                continue
            deep = len(self._stack) > 1
            if not deep and not self._value and self._stage == _INSIDE:
                run = _ELEMENT_RUN.match(data, i)
                if run is not None:
                    self._records += len(_ELEMENT_ONE.findall(data, i, run.end()))
                    i = run.end()
                    continue
            pos = (_SKIP_DEEP if deep else _SKIP_TOP).match(data, i).end()  # type: ignore[union-attr]
            # Text only matters around the array or at its own level.
            if pos > i and not deep and data[i:pos].strip(_JSON_SPACE):
                self._text()
            if pos == n or self._stage == _DEAD:
                # Text around the array ended the count: the bracket after it
                # (``null]``) is not looked at, having nothing open to close.
                return
            token = data[pos]
            i = pos + 1
            if token == _QUOTE:  # a string that goes on past this chunk
                self._text()
                self._in_string = True
                self._escaped = False
            else:
                self._structural(token)

    def _string_rest(self, data: bytes, i: int) -> int:
        """Skips a string's bytes from ``i``; where scanning goes on."""
        n = len(data)
        if self._escaped:
            self._escaped = False
            i += 1
        while True:
            j = data.find(b'"', i)
            if j < 0:
                k = n
                while k > i and data[k - 1] == _BACKSLASH:
                    k -= 1
                self._escaped = (n - k) % 2 == 1
                return n
            k = j
            while k > i and data[k - 1] == _BACKSLASH:
                k -= 1
            if (j - k) % 2 == 0:
                self._in_string = False
                return j + 1
            i = j + 1

    def _text(self) -> None:
        """A value's text (a string, number or literal) where it stands."""
        if self._stage == _BEFORE:
            self._fail("the result is not a JSON array")
        elif self._stage == _AFTER:
            self._fail("text after the JSON array")
        elif len(self._stack) == 1:
            self._value = True

    def _structural(self, token: int) -> None:
        if self._stage == _BEFORE:
            if token != ord("["):
                self._fail("the result is not a JSON array")
                return
            self._stage = _INSIDE
            self._stack.append(ord("]"))
            return
        if self._stage == _AFTER:
            self._fail("text after the JSON array")
            return
        depth = len(self._stack)
        if token in _CLOSER:
            if depth == 1:
                self._value = True
            if depth >= MAX_JSON_DEPTH:
                self._fail("the JSON is nested too deeply")
                return
            self._stack.append(_CLOSER[token])
        elif token == _COMMA:
            if depth == 1:
                if not self._value:
                    self._fail("an empty element in the JSON array")
                    return
                self._records += 1
                self._value = False
        elif token != self._stack[-1]:
            self._fail("brackets do not match")
        else:
            self._stack.pop()
            if depth == 1:
                if self._value:
                    self._records += 1
                    self._value = False
                elif self._records:
                    self._fail("an empty element in the JSON array")
                    return
                self._stage = _AFTER

    def finish(self) -> Count:
        # A cut-off array's last element counts only if nothing in it is left open.
        whole = self._value and len(self._stack) == 1 and not self._in_string
        records = self._records + (1 if whole else 0)
        detail = self._detail
        if detail is None:
            if self._in_string:
                detail = "a JSON string is not closed"
            elif self._stage == _BEFORE:
                detail = "the result is not a JSON array"
            elif self._stage == _INSIDE:
                detail = "the JSON array is not closed"
        return Count(records, detail)
