"""A job's failed records on the dashboard: a huge table is shown a page at a time and
downloaded as a stream while every other request keeps being answered, and no CSV
cell can run as a spreadsheet formula."""

from __future__ import annotations

import csv
import io
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.dashboard.failed import neutralise
from service.dashboard.routes import FAILED_COLUMNS, FAILED_PAGE, failed_table
from service.failed_records.copier import EMPTY_LISTINGS
from service.failed_records.rules import MAX_RECORD_BYTES
from service.upstream.client import RetryPolicy

from .helpers import (
    SIGNATURE_KEY,
    RunningSandbox,
    RunningService,
    eventually,
    serve,
    write_csv,
)

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
        # Copied into the store in the background; then every read comes from there.
        records = copied(service, job["id"], within=120)["failed_records"]
        first = service.http.get(f"{base}/failed")
        last = service.http.get(f"{base}/failed", params={"page": ROWS // FAILED_PAGE})
        beyond = service.http.get(f"{base}/failed", params={"page": ROWS // FAILED_PAGE + 1})
        with service.http.stream("GET", f"{base}/failed.csv") as download:
            assert download.status_code == 200
            assert download.headers["content-type"].startswith("text/csv")
            chunks = [chunk for chunk in download.iter_bytes()]
    assert probe.answers > 10
    assert probe.slowest < 1.0, f"/healthz waited {probe.slowest:.2f} s"
    assert records == {"status": "copied", "kept": ROWS, "complete": True, "detail": ""}

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


# Failed records kept by the service -------------------------------------------------

AUTH = {"Authorization": "User user-secret, Organization org-secret, Element element-token"}


def failing_csv(path: Path, failing: int, passing: int = 2) -> Path:
    """A contacts file whose first ``failing`` rows have no email (they fail upstream),
    each named by its number, and ``passing`` rows that load."""
    rows = [["Name", "Email"]]
    rows += [[f"bad{i}", ""] for i in range(failing)]
    rows += [[f"good{i}", f"good{i}@example.com"] for i in range(passing)]
    return write_csv(path, rows)


def copied(service: RunningService, job_id: str, within: float = 30.0) -> dict[str, Any]:
    """The job once the copy of its failed records has ended."""
    seen: dict[str, Any] = {}

    def ended() -> bool:
        seen.update(service.http.get(f"/jobs/{job_id}").json())
        status = (seen.get("failed_records") or {}).get("status")
        return status in ("copied", "failed")

    eventually(ended, within=within)
    return seen


def names(answer: httpx.Response) -> list[str]:
    return [record["record"]["Name"] for record in answer.json()["errors"]]


def upstream_errors(sandbox: RunningSandbox, upstream_id: str) -> httpx.Response:
    return httpx.get(f"{sandbox.api_url}/hubs/marketing/bulk/{upstream_id}/errors", headers=AUTH)


def test_failed_records_are_served_from_the_store_after_the_upstream_forgot_them(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    tmp_path: Path,
) -> None:
    sandbox = start_sandbox(retention=4.0)
    service = start_service(sandbox)
    job = completed(service, failing_csv(tmp_path / "f.csv", 3))
    assert job["records_failed_count"] == 3
    job = copied(service, job["id"])
    assert job["failed_records"] == {
        "status": "copied",
        "kept": 3,
        "complete": True,
        "detail": "",
    }
    eventually(lambda: upstream_errors(sandbox, job["upstream_id"]).status_code == 404)
    status = httpx.get(
        f"{sandbox.api_url}/hubs/marketing/bulk/{job['upstream_id']}/status", headers=AUTH
    )
    assert status.status_code == 404  # the upstream forgot the job altogether

    answer = service.http.get(f"/jobs/{job['id']}/errors")
    assert answer.status_code == 200
    body = answer.json()
    assert body["source"] == "store" and body["count"] == 3 and body["complete"] is True
    assert names(answer) == ["bad0", "bad1", "bad2"]
    assert [record["lineNumber"] for record in body["errors"]] == [2, 3, 4]
    assert body["errors"][0]["errorMessage"] == "Email is empty"
    page = service.http.get(f"/ui/jobs/{job['id']}/failed")
    assert page.status_code == 200 and "3 failed records." in page.text
    download = service.http.get(f"/ui/jobs/{job['id']}/failed.csv")
    rows = list(csv.reader(io.StringIO(download.text, newline="")))
    assert rows == [
        ["lineNumber", "errorMessage", "Name", "Email"],
        *([str(n), "Email is empty", f"bad{n - 2}", ""] for n in (2, 3, 4)),
    ]
    # The job itself is as it ended: the copy changes nothing of it.
    assert service.http.get(f"/jobs/{job['id']}").json()["state"] == "COMPLETED"


def test_failed_records_outlive_a_restart_of_the_embedded_sandbox(
    start_service: Callable[..., RunningService], tmp_path: Path
) -> None:
    first = start_service()
    job = copied(first, completed(first, failing_csv(tmp_path / "f.csv", 2))["id"])
    assert job["failed_records"]["kept"] == 2
    first.http.close()
    first.server.stop()

    again = start_service()  # the same store; a new embedded sandbox that knows no job
    refresh = again.http.post(f"/jobs/{job['id']}/refresh")
    assert refresh.status_code == 200 and refresh.json()["state"] == "COMPLETED"
    answer = again.http.get(f"/jobs/{job['id']}/errors")
    assert answer.status_code == 200 and answer.json()["source"] == "store"
    assert names(answer) == ["bad0", "bad1"]
    download = again.http.get(f"/ui/jobs/{job['id']}/failed.csv")
    assert download.status_code == 200 and download.text.count("Email is empty") == 2


def test_failed_records_are_served_while_the_upstream_is_down(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    tmp_path: Path,
) -> None:
    sandbox = start_sandbox()
    service = start_service(sandbox, upstream_retry=RetryPolicy(attempts=1))
    job = copied(service, completed(service, failing_csv(tmp_path / "f.csv", 2))["id"])
    sandbox.server.stop()
    with pytest.raises(httpx.TransportError):
        upstream_errors(sandbox, job["upstream_id"])

    answer = service.http.get(f"/jobs/{job['id']}/errors")
    assert answer.status_code == 200 and names(answer) == ["bad0", "bad1"]
    page = service.http.get(f"/ui/jobs/{job['id']}/failed")
    assert page.status_code == 200 and "<td>bad1</td>" in page.text
    assert service.http.get(f"/ui/jobs/{job['id']}/failed.csv").text.count("bad") == 2


def test_a_job_keeps_at_most_the_bound_and_says_how_many(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    tmp_path: Path,
) -> None:
    service = start_service(start_sandbox(), max_failed_records=3)
    job = copied(service, completed(service, failing_csv(tmp_path / "f.csv", 7))["id"])
    records = job["failed_records"]
    assert (records["status"], records["kept"], records["complete"]) == ("copied", 3, False)
    assert "first 3 of 7 failed records" in records["detail"]
    assert "BULKHOOK_MAX_FAILED_RECORDS" in records["detail"]
    answer = service.http.get(f"/jobs/{job['id']}/errors")
    assert answer.json()["count"] == 3 and answer.json()["complete"] is False
    assert names(answer) == ["bad0", "bad1", "bad2"]
    rows = list(csv.reader(io.StringIO(service.http.get(f"/ui/jobs/{job['id']}/failed.csv").text)))
    assert len(rows) == 4
    page = service.http.get(f"/ui/jobs/{job['id']}/failed").text
    assert "3 failed records." in page and "the first 3 of 7 failed records are kept" in page
    stored = service.query(f"SELECT COUNT(*) FROM failed_records WHERE job_id = '{job['id']}'")
    assert stored == [(3,)]


def test_a_failing_copy_is_retried_until_it_succeeds_and_never_changes_the_job(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    tmp_path: Path,
) -> None:
    sandbox = start_sandbox()
    service = start_service(sandbox, upstream_retry=RetryPolicy(attempts=1))
    # Every call for failed records fails, four times over: three 503s and a 429.
    sandbox.sandbox.inject_fault("errors", 503, times=3)
    sandbox.sandbox.inject_fault("errors", 429, retry_after=0.5)
    job = completed(service, failing_csv(tmp_path / "f.csv", 2))
    notes: list[str] = []

    def note() -> bool:
        now = service.http.get(f"/jobs/{job['id']}").json()
        assert now["state"] == "COMPLETED" and now["updated_at"] == job["updated_at"]
        assert now["events"] == job["events"]
        notes.append((now["failed_records"] or {}).get("detail", ""))
        return now["failed_records"]["status"] == "copied"

    eventually(note, within=30)
    assert sandbox.sandbox.calls["errors"] == 5  # four refused, then the one page
    assert any("HTTP 503" in seen for seen in notes), notes
    final = service.http.get(f"/jobs/{job['id']}").json()
    assert final["failed_records"] == {
        "status": "copied",
        "kept": 2,
        "complete": True,
        "detail": "",
    }
    assert final["state"] == "COMPLETED" and final["events"] == job["events"]
    answer = service.http.get(f"/jobs/{job['id']}/errors")
    assert answer.json()["source"] == "store" and names(answer) == ["bad0", "bad1"]


def test_a_list_lagging_behind_the_job_is_asked_again_until_it_shows_the_records(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    tmp_path: Path,
) -> None:
    sandbox = start_sandbox()
    service = start_service(sandbox)
    # The job counts two failed records; the upstream's list shows none, twice.
    sandbox.sandbox.inject_fault("errors", 200, raw_body="[]", times=2)
    job = completed(service, failing_csv(tmp_path / "f.csv", 2))
    final = copied(service, job["id"])
    assert final["failed_records"] == {
        "status": "copied",
        "kept": 2,
        "complete": True,
        "detail": "",
    }
    assert sandbox.sandbox.calls["errors"] == 3
    answer = service.http.get(f"/jobs/{job['id']}/errors")
    assert answer.json()["source"] == "store" and names(answer) == ["bad0", "bad1"]


def test_a_list_that_never_shows_the_records_keeps_none_and_asks_the_upstream_later(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    tmp_path: Path,
) -> None:
    sandbox = start_sandbox()
    service = start_service(sandbox)
    sandbox.sandbox.inject_fault("errors", 200, raw_body="[]", times=EMPTY_LISTINGS)
    job = completed(service, failing_csv(tmp_path / "f.csv", 2))
    final = copied(service, job["id"])
    assert final["failed_records"] == {
        "status": "copied",
        "kept": 0,
        "complete": False,
        "detail": "the upstream listed 0 of the 2 failed records the job counts",
    }
    assert final["state"] == "COMPLETED" and final["events"] == job["events"]
    # Nothing kept is not an answer: the upstream, listing them now, is asked.
    answer = service.http.get(f"/jobs/{job['id']}/errors")
    assert answer.json()["source"] == "upstream" and names(answer) == ["bad0", "bad1"]


def test_a_job_without_failed_records_copies_nothing_and_asks_the_upstream(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    sandbox = start_sandbox()
    service = start_service(sandbox)
    job = completed(service, contacts_csv)
    assert job["records_failed_count"] == 0 and job["failed_records"] is None
    answer = service.http.get(f"/jobs/{job['id']}/errors")
    assert answer.status_code == 200
    assert answer.json()["source"] == "upstream" and answer.json()["errors"] == []
    assert service.query("SELECT COUNT(*) FROM failed_copies") == [(0,)]


def test_a_copy_cut_off_by_kill_9_resumes_from_its_last_stored_page(
    start_sandbox: Callable[..., RunningSandbox], store_url: str, tmp_path: Path
) -> None:
    """The first page is stored; the second is held up by a long Retry-After while the
    copy holds its lease; the process is killed. Restarted, it takes the copy over
    once the lease runs out and ends with every record once, in order."""
    sandbox = start_sandbox()
    sandbox.sandbox.inject_fault("errors", 429, retry_after=30, skip=1)
    failing = 300
    env = {
        "OC_BASE_URL": sandbox.api_url,
        "OC_USER_SECRET": "user-secret",
        "OC_ORG_SECRET": "org-secret",
        "OC_ELEMENT_TOKEN": "element-token",
        "OC_SIGNATURE_KEYS": SIGNATURE_KEY,
        "BULKHOOK_DATABASE_URL": store_url,
        "BULKHOOK_POLL_INTERVAL": "0.3",
        "BULKHOOK_POLL_MAX_INTERVAL": "1",
        "BULKHOOK_POLL_LEASE": "2",
    }
    process, url = serve(tmp_path, **env)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            file = failing_csv(tmp_path / "f.csv", failing)
            with file.open("rb") as handle:
                submitted = http.post(
                    "/jobs", data={"object": "contact"}, files={"file": ("f.csv", handle)}
                )
            job_id = submitted.json()["id"]
            eventually(
                lambda: (
                    http.get(f"/jobs/{job_id}").json().get("failed_records")
                    == {"status": "copying", "kept": 20, "complete": False, "detail": ""}
                )
            )
            # The second page is asked for and held up: the copy is under way.
            eventually(lambda: sandbox.sandbox.calls["errors"] == 2)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()

    process, url = serve(tmp_path, **env)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            eventually(
                lambda: http.get(f"/jobs/{job_id}").json()["failed_records"]["status"] == "copied",
                within=30,
            )
            job = http.get(f"/jobs/{job_id}").json()
            assert job["failed_records"]["kept"] == failing
            assert job["failed_records"]["complete"] is True
            answer = http.get(f"/jobs/{job_id}/errors").json()
    finally:
        process.terminate()
        process.communicate(timeout=10)
    assert answer["source"] == "store"
    assert [record["record"]["Name"] for record in answer["errors"]] == [
        f"bad{i}" for i in range(failing)
    ]


def test_odd_records_from_the_upstream_are_kept_safely_and_huge_ones_as_a_stub(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    tmp_path: Path,
) -> None:
    """NUL, lone surrogates, a bare string and a record past the size bound: both
    stores keep what can be kept, and the answer gives it back as JSON."""
    sandbox = start_sandbox()
    huge = "x" * (MAX_RECORD_BYTES + 1)
    odd = (
        '[{"lineNumber": 2, "errorMessage": "bad\\u0000", "record": {"Name": "\\ud800x"}},'
        ' "only a message",'
        f' {{"lineNumber": 3, "errorMessage": "too big", "record": {{"Note": "{huge}"}}}}]'
    )
    sandbox.sandbox.inject_fault("errors", 200, raw_body=odd)
    service = start_service(sandbox)
    job = copied(service, completed(service, failing_csv(tmp_path / "f.csv", 1))["id"])
    assert job["failed_records"]["status"] == "copied" and job["failed_records"]["kept"] == 3
    answer = service.http.get(f"/jobs/{job['id']}/errors")
    assert answer.status_code == 200
    first, message, stub = answer.json()["errors"]
    assert first == {"lineNumber": 2, "errorMessage": "bad\x00", "record": {"Name": "\ud800x"}}
    assert message == "only a message"
    assert stub["lineNumber"] == 3 and stub["errorMessage"] == "too big"
    assert f"at most {MAX_RECORD_BYTES} are kept" in stub["recordOmitted"]
    assert len(answer.content) < MAX_RECORD_BYTES
    download = service.http.get(f"/ui/jobs/{job['id']}/failed.csv")
    assert download.status_code == 200 and "only a message" in download.text
    page = service.http.get(f"/ui/jobs/{job['id']}/failed")
    assert page.status_code == 200 and "<td>\ufffdx</td>" in page.text


def test_before_the_copy_has_ended_the_upstream_answers_and_its_failure_says_so(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    tmp_path: Path,
) -> None:
    sandbox = start_sandbox()
    service = start_service(sandbox, upstream_retry=RetryPolicy(attempts=1))
    sandbox.sandbox.inject_fault("errors", 503, times=1000)
    job = completed(service, failing_csv(tmp_path / "f.csv", 2))
    eventually(lambda: sandbox.sandbox.calls["errors"] >= 1)  # the copy tried and failed
    answer = service.http.get(f"/jobs/{job['id']}/errors")
    assert answer.status_code == 502
    error = answer.json()["error"]
    assert error["code"] == "upstream_refused" and error["upstream_status"] == 503
    assert "copy is not complete yet" in error["message"]
    assert error["failed_records"]["status"] == "pending"
    assert error["failed_records"]["kept"] == 0
    assert service.http.get(f"/jobs/{job['id']}").json()["state"] == "COMPLETED"
