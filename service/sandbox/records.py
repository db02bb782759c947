"""How the sandbox "loads" a CSV: count the data rows, fail those with a bad email, and
refuse as a whole a file with neither an email-like column nor an ``id`` column."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from typing import BinaryIO

from service.sandbox.options import WHOLE_FILE_ERROR

__all__ = ["ScanResult", "scan_csv"]

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


@dataclass
class ScanResult:
    records: int = 0
    failed: list[dict[str, object]] = field(default_factory=list)
    # Set when the file as a whole cannot be read: the job ends in ERROR.
    error: str | None = None
    # Set when the platform refuses the file as a whole: the job ends ABORTED.
    aborted: str | None = None
    # The file's header and the rows it loads (those that did not fail), kept only when
    # asked: what the object holds once the job completes.
    header: list[str] = field(default_factory=list)
    rows: list[dict[str, str]] = field(default_factory=list)


def scan_csv(data: BinaryIO, *, keep_rows: int = 0) -> ScanResult:
    """Read the upload once, row by row, so a large file never sits in memory; only its
    first ``keep_rows`` loaded rows are kept, for the object to hold."""
    result = ScanResult()
    text = io.TextIOWrapper(data, encoding="utf-8-sig", newline="")
    try:
        reader = csv.reader(text)
        header = next(reader, None)
        if not header or not any(cell.strip() for cell in header):
            result.error = "the file has no header row"
            return result
        email_columns = [i for i, name in enumerate(header) if "email" in name.lower()]
        if not email_columns and not any(name.strip().lower() == "id" for name in header):
            # Nothing tells one record from another: no row can be loaded.
            result.aborted = WHOLE_FILE_ERROR
            return result
        result.header = list(header)
        for row in reader:
            if not row:
                continue
            result.records += 1
            failed = False
            for i in email_columns:
                value = row[i].strip() if i < len(row) else ""
                if not _EMAIL.match(value):
                    problem = "is empty" if not value else "is not a valid email address"
                    result.failed.append(
                        {
                            "lineNumber": reader.line_num,
                            "errorMessage": f"{header[i]} {problem}",
                            "record": dict(zip(header, row, strict=False)),
                        }
                    )
                    failed = True
                    break
            if not failed and len(result.rows) < keep_rows:
                padded = row + [""] * (len(header) - len(row))
                result.rows.append(dict(zip(header, padded, strict=False)))
    except UnicodeDecodeError:
        result.error = "the file is not UTF-8 text"
    except csv.Error as exc:
        result.error = f"the file is not valid CSV: {exc}"
    finally:
        text.detach()
    return result
