"""What a bulk query reads and how its result file is written.

The records an object holds are those its completed uploads loaded, upserted by the
upload's identifier: a row the platform refused (a bad email) never reaches the object,
as on the real platform. The ``generated`` object's records are computed from their
index, so a result of millions of them is written without holding them.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

__all__ = [
    "FORMATS",
    "GENERATED",
    "GENERATED_COLUMNS",
    "ObjectRecords",
    "encode",
    "generated_records",
]

GENERATED = "generated"
GENERATED_COLUMNS = ("id", "C_EmailAddress", "C_FirstName", "C_LastName", "C_Company")
# Media type → the format written.
FORMATS = {"text/csv": "csv", "application/json": "json", "application/jsonl": "jsonl"}
# Bytes gathered before a piece of the file is handed to the response.
_CHUNK = 64 * 1024
_FIRST = ("Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken")
_LAST = ("Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson")


def generated_records(count: int) -> Iterator[dict[str, str]]:
    """The ``generated`` object: record ``i`` is always the same, whatever the seed."""
    for i in range(1, count + 1):
        yield {
            "id": str(i),
            "C_EmailAddress": f"user{i}@example.com",
            "C_FirstName": _FIRST[i % len(_FIRST)],
            "C_LastName": _LAST[(i // len(_FIRST)) % len(_LAST)],
            "C_Company": f"Company {i % 100}",
        }


def _identifier(header: list[str], named: object) -> str | None:
    """The column an upsert matches records by: the one metaData names, else the first
    email-like column, else ``id``; None: every row is a new record."""
    if isinstance(named, str) and named in header:
        return named
    for name in header:
        if "email" in name.lower():
            return name
    return "id" if "id" in header else None


@dataclass
class ObjectRecords:
    """One object's records, in the order they were first loaded."""

    columns: list[str] = field(default_factory=list)
    rows: dict[str, dict[str, str]] = field(default_factory=dict)
    _unkeyed: int = 0

    def upsert(
        self, header: list[str], rows: Iterable[dict[str, str]], identifier: object, most: int
    ) -> None:
        """Load ``rows``: one matching a record by the identifier updates it, any other is
        a new record; past ``most`` records the rest are not kept."""
        for name in header:
            if name not in self.columns:
                self.columns.append(name)
        key_column = _identifier(header, identifier)
        for row in rows:
            key = row.get(key_column, "") if key_column is not None else ""
            if not key:
                self._unkeyed += 1
                key = f"\0{self._unkeyed}"
            existing = self.rows.get(key)
            if existing is not None:
                existing.update(row)
            elif len(self.rows) < most:
                self.rows[key] = row


def _csv_line(cells: Iterable[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(cells)
    return buffer.getvalue()


def encode(
    records: Iterable[Mapping[str, str]], columns: Iterable[str], fmt: str
) -> Iterator[bytes]:
    """The result file in pieces of about 64 KiB: CSV with a header of ``columns``, a
    JSON array, or JSON lines. Each piece is produced when the previous one is taken."""
    names = list(columns)
    parts: list[str] = []
    size = 0
    if fmt == "csv" and names:
        # An object nothing was loaded into has no columns: its file is empty.
        parts.append(_csv_line(names))
    elif fmt == "json":
        parts.append("[")
    first = True
    for record in records:
        if fmt == "csv":
            text = _csv_line(record.get(name, "") for name in names)
        elif fmt == "json":
            text = ("" if first else ",") + json.dumps(record, ensure_ascii=False)
        else:
            text = json.dumps(record, ensure_ascii=False) + "\n"
        first = False
        parts.append(text)
        size += len(text)
        if size >= _CHUNK:
            yield "".join(parts).encode("utf-8")
            parts, size = [], 0
    if fmt == "json":
        parts.append("]")
    if parts:
        yield "".join(parts).encode("utf-8")
