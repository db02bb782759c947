"""A job's failed records as a table: built page by page, shown a page at a time, and
written as CSV in bounded chunks.

The upstream's records can be wide (thousands of columns) and many, so every step is
linear in the cells and none runs long without giving the event loop back: pages are
flattened as they arrive, and the CSV is produced a bounded number of cells at a time.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

__all__ = [
    "CSV_CHUNK_CELLS",
    "UPSTREAM_PAGE_BYTES",
    "FailedTable",
    "csv_chunks",
    "neutralise",
    "parsed",
    "stored_csv_chunks",
]

# JSON read per upstream page of failed records: parsing it takes a few milliseconds
# (a page of 200 records of 2,000 columns is about 5 MB, and took about 100 ms).
UPSTREAM_PAGE_BYTES = 512 * 1024
# Cells written per CSV chunk (a few hundred rows of a usual width): each chunk takes
# a few milliseconds, then the event loop serves other requests.
CSV_CHUNK_CELLS = 10_000
_CSV_CHUNK_ROWS = 500
# What spreadsheet programs read as the start of a formula (OWASP, "CSV Injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise(cell: str) -> str:
    """A cell a spreadsheet shows as text: one starting like a formula gets a leading
    ``'``, as OWASP advises; every other cell is written unchanged."""
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value)


class FailedTable:
    """Failed records as columns and rows: the upstream's fields (``lineNumber``,
    ``errorMessage``, ...) first, then the record's own columns, in first-seen order.

    Each row holds its values by column position, so adding a record costs its own
    cells: a column is found by a dict, never by searching the column list.
    """

    def __init__(self) -> None:
        self.columns: list[str] = []
        self._position: dict[str, int] = {}
        # Tuples of strings: the collector stops tracking them, so a full collection
        # does not walk a huge table's every cell.
        self._rows: list[tuple[str, ...]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, records: Iterable[Any]) -> None:
        for item in records:
            entry = item if isinstance(item, dict) else {"errorMessage": item}
            record = entry.get("record")
            nested = isinstance(record, dict)
            row: dict[str, str] = {}
            for key, value in entry.items():
                if key != "record" or not nested:
                    row[str(key)] = value if type(value) is str else _cell(value)
            if isinstance(record, dict):
                for key, value in record.items():
                    name = str(key)
                    if name not in row:
                        row[name] = value if type(value) is str else _cell(value)
            self._rows.append(self._place(row))

    def _place(self, row: dict[str, str]) -> tuple[str, ...]:
        """``row``'s values by column position, adding the columns it brings."""
        keys = list(row)
        if keys == self.columns:  # the usual case: shaped like the records before
            return tuple(row.values())
        position = self._position
        if not position.keys() >= row.keys():
            for key in keys:
                if key not in position:
                    position[key] = len(self.columns)
                    self.columns.append(key)
        values = [""] * len(self.columns)
        for key, value in row.items():
            values[position[key]] = value
        return tuple(values)

    def forget_rows(self) -> None:
        """Drop the rows, keeping the columns (a CSV written a page at a time)."""
        self._rows.clear()

    def row(self, index: int, width: int | None = None) -> list[str]:
        """Row ``index`` with a value for each of the first ``width`` columns (all)."""
        width = len(self.columns) if width is None else min(width, len(self.columns))
        values = list(self._rows[index][:width])
        return values + [""] * (width - len(values))

    def rows(self, start: int, stop: int, width: int | None = None) -> list[list[str]]:
        return [self.row(i, width) for i in range(start, min(stop, len(self._rows)))]


async def csv_chunks(table: FailedTable) -> AsyncIterator[bytes]:
    """The table as CSV (every column, cells neutralised), a bounded number of cells
    per chunk, handing the event loop back between chunks."""
    async for chunk in _chunks(table, header=True):
        yield chunk


async def _chunks(table: FailedTable, header: bool) -> AsyncIterator[bytes]:
    """The table's rows as CSV (after the header row, if ``header``)."""
    width = max(1, len(table.columns))
    step = max(1, min(_CSV_CHUNK_ROWS, CSV_CHUNK_CELLS // width))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if header:
        writer.writerow([neutralise(column) for column in table.columns])
    for start in range(0, len(table), step):
        for row in table.rows(start, start + step):
            writer.writerow([neutralise(value) for value in row])
        yield out.getvalue().encode("utf-8", "replace")
        out.seek(0)
        out.truncate()
        await asyncio.sleep(0)
    if out.tell():
        yield out.getvalue().encode("utf-8", "replace")


async def parsed(pages: AsyncIterator[list[str]]) -> AsyncIterator[list[Any]]:
    """Pages of stored records (JSON text) as the values they hold."""
    async for page in pages:
        yield [json.loads(record) for record in page]
        await asyncio.sleep(0)


async def stored_csv_chunks(
    read: Callable[[], AsyncIterator[list[Any]]],
) -> AsyncIterator[bytes]:
    """The records that ``read()`` gives page by page as CSV, holding one page at a
    time: a first reading finds every column (the header comes first), the second
    writes the rows, in chunks as ``csv_chunks`` does."""
    table = FailedTable()
    async for page in read():
        table.add(page)
        table.forget_rows()
    header = True
    async for page in read():
        table.add(page)
        async for chunk in _chunks(table, header):
            yield chunk
        header = False
        table.forget_rows()
    if header:
        async for chunk in _chunks(table, header):
            yield chunk
