"""A job's failed records on the dashboard: a huge table is shown a page at a time and
downloaded as a stream while every other request keeps being answered, and no CSV
cell can run as a spreadsheet formula."""

from __future__ import annotations

import csv
import io
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.dashboard.failed import neutralise
from service.dashboard.routes import FAILED_COLUMNS, FAILED_PAGE, failed_table

from .helpers import RunningSandbox, RunningService, write_csv

ROWS, COLUMNS = 2000, 2000
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def completed(service: RunningService, file: Path, within: float = 60.0) -> dict[str, Any]:
    submitted = service.submit(file)
    assert submitted.status_code == 202, submitted.text
    return service.wait_for(submitted.json()["id"], {"COMPLETED"}, within=within)


class HealthProbe:
    """Another client asking ``/healthz`` in a loop: the slowest answer it waited for."""

    def __init__(self, url: str) -> None:
        self._client = httpx.Client(base_url=url, timeout=30)
        self._stop = threading.Event()
        self.slowest = 0.0
        self.answers = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            answer = self._client.get("/healthz")
            self.slowest = max(self.slowest, time.monotonic() - started)
            assert answer.status_code == 200
            self.answers += 1
            time.sleep(0.01)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)
        self._client.close()


@pytest.fixture
def wide_csv(tmp_path: Path) -> Path:
    """2,000 contacts of 2,000 columns, every one without an email, so all fail. The
    first and last columns after Email carry the row's number; the others are "x"."""
    header = ["Email", *(f"c{j}" for j in range(1, COLUMNS))]
    filler = ["x"] * (COLUMNS - 3)
    rows = [header] + [["", f"first{i}", *filler, f"last{i}"] for i in range(ROWS)]
    return write_csv(tmp_path / "wide.csv", rows)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_a_huge_failed_table_is_paged_and_streamed_while_the_service_keeps_answering(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    wide_csv: Path,
) -> None:
    service = start_service(start_sandbox())
    job = completed(service, wide_csv)
    assert job["records_failed_count"] == ROWS
    base = f"/ui/jobs/{job['id']}"
    with HealthProbe(service.url) as probe:
        first = service.http.get(f"{base}/failed")
        last = service.http.get(f"{base}/failed", params={"page": ROWS // FAILED_PAGE})
        beyond = service.http.get(f"{base}/failed", params={"page": ROWS // FAILED_PAGE + 1})
        with service.http.stream("GET", f"{base}/failed.csv") as download:
            assert download.status_code == 200
            assert download.headers["content-type"].startswith("text/csv")
            chunks = [chunk for chunk in download.iter_bytes()]
    assert probe.answers > 10
    assert probe.slowest < 1.0, f"/healthz waited {probe.slowest:.2f} s"

    # The job page shows a page of rows and the first columns, and says so.
    assert first.status_code == 200
    page = first.text
    assert f"{ROWS} failed records: records 1 to {FAILED_PAGE} shown" in page
    assert f"The first {FAILED_COLUMNS} of" in page and "the CSV has them all" in page
    assert page.count("<tr>") == FAILED_PAGE + 1  # the header row and a page of records
    header = re.findall(r"<th>([^<]*)</th>", page)
    assert header[:4] == ["lineNumber", "errorMessage", "Email", "c1"]
    assert len(header) == FAILED_COLUMNS
    assert "<td>first0</td>" in page and "<td>first99</td>" in page
    assert "first100<" not in page and "last0" not in page  # next page; last column
    assert f'href="{base}/failed?page=2"' in page and 'rel="prev"' not in page

    assert last.status_code == 200
    assert f"records {ROWS - FAILED_PAGE + 1} to {ROWS} shown" in last.text
    assert f"<td>first{ROWS - 1}</td>" in last.text
    assert 'rel="next"' not in last.text and 'rel="prev"' in last.text
    assert beyond.status_code == 200 and "none on page" in beyond.text

    # The CSV has every row and column.
    rows = list(csv.reader(io.StringIO(b"".join(chunks).decode("utf-8"), newline="")))
    assert len(chunks) > 10  # streamed in pieces, not built whole
    assert rows[0][:4] == ["lineNumber", "errorMessage", "Email", "c1"]
    assert rows[0][-1] == f"c{COLUMNS - 1}"
    assert len(rows) == ROWS + 1
    assert {len(row) for row in rows} == {COLUMNS + 2}
    assert rows[1][:5] == ["2", "Email is empty", "", "first0", "x"]
    assert rows[1][-1] == "last0"
    assert rows[-1][:4] == [str(ROWS + 1), "Email is empty", "", f"first{ROWS - 1}"]
    assert rows[-1][-1] == f"last{ROWS - 1}"


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_failed_record_pages_refuse_a_bad_page_number(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    tmp_path: Path,
) -> None:
    file = write_csv(tmp_path / "two.csv", [["Name", "Email"], ["A", ""], ["B", "nope"]])
    job = completed(service := start_service(start_sandbox()), file)
    for bad in ("0", "-1", "x", "1e3", "²", "9" * 5000, "1\x00"):
        answer = service.http.get(f"/ui/jobs/{job['id']}/failed", params={"page": bad})
        assert answer.status_code == 400, bad
        assert "page must be a whole number from 1" in answer.text
    shown = service.http.get(f"/ui/jobs/{job['id']}/failed", params={"page": "1"})
    assert "2 failed records." in shown.text and 'rel="next"' not in shown.text


def test_cells_that_start_like_a_formula_are_neutralised() -> None:
    for start in FORMULA_STARTS:
        assert neutralise(f"{start}1+1") == f"'{start}1+1"
    for plain in ("", "Ada", "1+1", " =1", "'=1", "a=b", "x@y", "\n=1", "é"):
        assert neutralise(plain) == plain


def test_the_table_is_linear_in_its_cells() -> None:
    """Columns are found by name, not searched for: 300,000 cells well within a second
    of CPU where a search per cell took minutes."""
    records = [
        {"lineNumber": i, "errorMessage": "bad", "record": {f"c{j}": "x" for j in range(600)}}
        for i in range(500)
    ]
    started = time.process_time()
    columns, rows = failed_table(records)
    assert time.process_time() - started < 1.0
    assert columns[:3] == ["lineNumber", "errorMessage", "c0"] and len(columns) == 602
    assert rows[0][:3] == ["0", "bad", "x"] and rows[-1][0] == "499"


def test_columns_keep_their_first_seen_order_and_rows_are_padded() -> None:
    columns, rows = failed_table(
        [
            {"lineNumber": 2, "errorMessage": "a", "record": {"Name": "A", "Email": ""}},
            "only a message",
            {"lineNumber": 4, "record": {"Extra": 1, "Name": None}, "errorMessage": "b"},
        ]
    )
    assert columns == ["lineNumber", "errorMessage", "Name", "Email", "Extra"]
    assert rows == [
        ["2", "a", "A", "", ""],
        ["", "only a message", "", "", ""],
        ["4", "b", "", "", "1"],
    ]


def test_the_failed_records_csv_neutralises_formulas_and_keeps_everything_else(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    tmp_path: Path,
) -> None:
    """A real job whose failed records carry what a spreadsheet would run."""
    hostile = ['=HYPERLINK("http://evil.example","x")', "+1+2", "-3", "@SUM(A1)", "\tx"]
    hostile.append("\r=1")
    plain = ["Ada", "1+1", "a,b", 'say "hi"', "line\nbreak", "café", " =1", "'already"]
    header = ["Name", "Email", "Note"]
    file = tmp_path / "hostile.csv"
    with file.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\r\n")
        writer.writerow(header)
        for value in hostile + plain:
            writer.writerow([value, "", value])
        writer.writerow(["=ok", "ada@example.com", "=fine"])  # loaded: not a failed record
    service = start_service(start_sandbox())
    job = completed(service, file)
    download = service.http.get(f"/ui/jobs/{job['id']}/failed.csv")
    assert download.status_code == 200
    rows = list(csv.reader(io.StringIO(download.text, newline="")))
    assert rows[0] == ["lineNumber", "errorMessage", "Name", "Email", "Note"]
    names = [row[2] for row in rows[1:]]
    notes = [row[4] for row in rows[1:]]
    assert names == notes == [f"'{value}" for value in hostile] + plain
    assert not [cell for row in rows for cell in row if cell.startswith(FORMULA_STARTS)]
    assert "=ok" not in download.text
