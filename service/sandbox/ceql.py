"""The part of CEQL (Cloud Elements Query Language) the sandbox answers bulk queries in.

``select * | FIELD, ... from OBJECT [where FIELD = VALUE [and FIELD = VALUE ...]]
[limit N]``: keywords in any case, values single-quoted text (``''`` is a quote) or
numbers. Pure: text in, a ``Query`` or a ``QueryError`` out, nothing else raised.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from service.errors import BulkhookError

__all__ = ["Query", "QueryError", "parse"]

_KEYWORDS = frozenset({"select", "from", "where", "and", "limit"})
# The longest query read: a real one is a line; past this it is refused, not scanned.
_MAX_QUERY = 64 * 1024
# A limit has at most this many digits, so converting it can never be slow or refused.
_MAX_LIMIT_DIGITS = 12
_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
    | (?P<string>'(?:[^']|'')*')
    | (?P<number>-?[0-9]+(?:\.[0-9]+)?)
    | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
    | (?P<symbol>[*,=])
    """,
    re.VERBOSE,
)


class QueryError(BulkhookError):
    """The query is not in the subset: the message says where and why."""

    code = "query_invalid"
    http_status = 400


@dataclass(frozen=True)
class Query:
    """A parsed query. ``fields`` None is ``select *``; ``where`` pairs a field with the
    text it must equal (a number as written)."""

    object: str
    fields: tuple[str, ...] | None = None
    where: tuple[tuple[str, str], ...] = ()
    limit: int | None = None

    def matches(self, record: Mapping[str, str]) -> bool:
        return all(record.get(name) == value for name, value in self.where)

    def select(self, records: Iterable[Mapping[str, str]]) -> Iterator[dict[str, str]]:
        """The records that match, at most ``limit``, with the selected fields only (a
        field a record lacks reads as empty)."""
        if self.limit == 0:
            return
        taken = 0
        for record in records:
            if not self.matches(record):
                continue
            if self.fields is None:
                yield dict(record)
            else:
                yield {name: record.get(name, "") for name in self.fields}
            taken += 1
            if self.limit is not None and taken >= self.limit:
                return


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    at: int


def _tokens(text: str) -> list[_Token]:
    found: list[_Token] = []
    at = 0
    while at < len(text):
        match = _TOKEN.match(text, at)
        if match is None:
            raise QueryError(f"unexpected character {text[at]!r} at position {at + 1}")
        kind = match.lastgroup or ""
        if kind != "space":
            word = match.group()
            if kind == "name" and word.lower() in _KEYWORDS:
                kind, word = "keyword", word.lower()
            found.append(_Token(kind, word, at))
        at = match.end()
    return found


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self._tokens = tokens
        self._next = 0

    def _peek(self) -> _Token | None:
        return self._tokens[self._next] if self._next < len(self._tokens) else None

    def _take(self, kind: str, text: str | None = None, what: str | None = None) -> _Token:
        token = self._peek()
        if token is None or token.kind != kind or (text is not None and token.text != text):
            wanted = what or (text if text is not None else kind)
            if token is None:
                raise QueryError(f"expected {wanted} at the end of the query")
            raise QueryError(f"expected {wanted} at position {token.at + 1}, found {token.text!r}")
        self._next += 1
        return token

    def _at(self, kind: str, text: str | None = None) -> bool:
        token = self._peek()
        return token is not None and token.kind == kind and (text is None or token.text == text)

    def query(self) -> Query:
        self._take("keyword", "select", "'select'")
        fields: tuple[str, ...] | None = None
        if self._at("symbol", "*"):
            self._next += 1
        else:
            names = [self._take("name", what="a field name or *").text]
            while self._at("symbol", ","):
                self._next += 1
                names.append(self._take("name", what="a field name").text)
            fields = tuple(names)
        self._take("keyword", "from", "'from'")
        object_name = self._take("name", what="an object name").text
        where: list[tuple[str, str]] = []
        if self._at("keyword", "where"):
            self._next += 1
            where.append(self._condition())
            while self._at("keyword", "and"):
                self._next += 1
                where.append(self._condition())
        limit: int | None = None
        if self._at("keyword", "limit"):
            self._next += 1
            token = self._take("number", what="a number of records")
            if not token.text.isdigit() or len(token.text) > _MAX_LIMIT_DIGITS:
                raise QueryError(
                    f"limit must be a whole number of at most {_MAX_LIMIT_DIGITS} digits,"
                    f" found {token.text[:40]!r}"
                )
            limit = int(token.text)
        extra = self._peek()
        if extra is not None:
            raise QueryError(f"unexpected {extra.text[:40]!r} at position {extra.at + 1}")
        return Query(object_name, fields, tuple(where), limit)

    def _condition(self) -> tuple[str, str]:
        name = self._take("name", what="a field name").text
        self._take("symbol", "=", "'='")
        token = self._peek()
        if token is not None and token.kind == "string":
            self._next += 1
            return name, token.text[1:-1].replace("''", "'")
        return name, self._take("number", what="a quoted value or a number").text


def parse(text: str) -> Query:
    """The query ``text`` says, or a ``QueryError`` saying why it is not one."""
    if not isinstance(text, str):
        raise QueryError("the query must be text")
    if len(text) > _MAX_QUERY:
        raise QueryError(f"the query is longer than {_MAX_QUERY} characters")
    if not text.strip():
        raise QueryError("the query is empty")
    return _Parser(_tokens(text)).query()
