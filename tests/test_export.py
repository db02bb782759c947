"""`bulkhook export`, run as a real process against a real service and sandbox: the
file it writes holds exactly the records the upstream exported, whole or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .helpers import (
    RunningSandbox,
    RunningService,
    StartSandbox,
    StartService,
    drained,
    eventually,
    free_port,
    records_of,
    run_bulkhook,
    sandbox_result,
)

TOKEN = "export-test-token"
# For tests about the command itself, where the store behind the service makes no
# difference: SQLite only.
ONE_STORE = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)


@pytest.fixture
def loaded(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> tuple[RunningSandbox, RunningService]:
    """A service whose sandbox holds the ten sample contacts (uploaded and completed)."""
    upstream = start_sandbox()
    service = start_service(upstream)
    job = service.submit(contacts_csv).json()
    service.wait_for(job["id"], {"COMPLETED"})
    return upstream, service


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """An empty directory to export into."""
    path = tmp_path / "out"
    path.mkdir()
    return path


def export(service: RunningService, *args: str, **options: Any) -> subprocess.CompletedProcess[Any]:
    return run_bulkhook("export", *args, "--url", service.url, **options)


def exporting(service: RunningService, *args: str) -> list[str]:
    """The command line of ``bulkhook export`` against ``service``, for a process a test
    watches while it runs."""
    return [sys.executable, "-m", "service", "export", *args, "--url", service.url]


def user_environment() -> dict[str, str]:
    """The environment without the suite's own settings, as ``run_bulkhook`` runs in."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("OC_", "BULKHOOK_"))}


def by_email(records: list[dict[str, str]]) -> list[dict[str, str]]:
    return sorted(records, key=lambda record: record["C_EmailAddress"])


def downloads(service: RunningService) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = service.http.get("/jobs", params={"direction": "download"}).json()[
        "jobs"
    ]
    return jobs


def the_download(service: RunningService) -> dict[str, Any]:
    [listed] = downloads(service)
    job: dict[str, Any] = service.http.get(f"/jobs/{listed['id']}").json()
    return job


def test_export_wait_writes_exactly_the_records_the_upstream_exported(
    loaded: tuple[RunningSandbox, RunningService], contacts_csv: Path, out: Path
) -> None:
    upstream, service = loaded
    target = out / "contacts.csv"
    result = export(service, "contact", "--wait", "-o", str(target))
    assert result.returncode == 0, result.stderr
    data = target.read_bytes()
    assert by_email(records_of(data, "csv")) == by_email(
        records_of(contacts_csv.read_bytes(), "csv")
    )
    job = the_download(service)
    assert (job["state"], job["query"], job["format"]) == (
        "COMPLETED",
        "select * from contact",
        "csv",
    )
    # The very bytes the upstream wrote and the service stored, checked by their hash.
    assert data == sandbox_result(upstream, job["upstream_id"], "csv")
    assert data == service.http.get(f"/jobs/{job['id']}/result").content
    assert job["result"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert os.listdir(out) == ["contacts.csv"]  # no temporary file left beside it
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"job {job['id']}  CREATED  download contact@marketing")
    assert any(line.startswith(f"job {job['id']}  COMPLETED  ") for line in lines)
    assert f"  result stored (10 records, {len(data):,} bytes)" in lines
    assert lines[-1] == f"wrote 10 records, {len(data):,} bytes to {target}"
    status = run_bulkhook("status", job["id"], "--url", service.url)
    assert status.stdout.splitlines()[1] == f"  result stored (10 records, {len(data):,} bytes)"
    assert result.stderr == ""  # no progress bar off a terminal


@ONE_STORE
def test_export_jsonl_is_named_after_the_object_and_the_job_by_default(
    loaded: tuple[RunningSandbox, RunningService], contacts_csv: Path, out: Path
) -> None:
    _, service = loaded
    result = export(service, "contact", "--format", "jsonl", "--wait", cwd=out)
    assert result.returncode == 0, result.stderr
    job = the_download(service)
    assert job["format"] == "jsonl"
    name = f"contact-{job['id']}.jsonl"
    assert os.listdir(out) == [name]
    data = (out / name).read_bytes()
    assert by_email(records_of(data, "jsonl")) == by_email(
        records_of(contacts_csv.read_bytes(), "csv")
    )
    assert result.stdout.splitlines()[-1] == f"wrote 10 records, {len(data):,} bytes to {name}"


@ONE_STORE
def test_export_json_with_json_output_prints_the_job_as_the_api_shows_it(
    loaded: tuple[RunningSandbox, RunningService], contacts_csv: Path, out: Path
) -> None:
    _, service = loaded
    target = out / "contacts.json"
    result = export(service, "contact", "--format", "json", "--wait", "--json", "-o", str(target))
    assert result.returncode == 0, result.stderr
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert printed[0]["state"] == "CREATED" and printed[0]["direction"] == "download"
    assert printed[-1]["result"]["status"] == "stored"
    assert printed[-1]["result"] == the_download(service)["result"]
    records = json.loads(target.read_bytes())
    assert by_email(records_of(target.read_bytes(), "json")) == by_email(
        records_of(contacts_csv.read_bytes(), "csv")
    )
    assert len(records) == 10
    assert "wrote 10 records" in result.stderr  # stdout stays JSON only


def test_export_where_to_stdout_writes_only_the_matching_records(
    loaded: tuple[RunningSandbox, RunningService], out: Path
) -> None:
    _, service = loaded
    result = export(
        service, "contact", "--where", "C_LastName = 'Smith'", "--wait", "-o", "-", text=False
    )
    assert result.returncode == 0, result.stderr
    records = records_of(result.stdout, "csv")
    assert sorted(record["C_FirstName"] for record in records) == ["Ann", "Doug", "Norm", "Penny"]
    job = the_download(service)
    assert job["query"] == "select * from contact where C_LastName = 'Smith'"
    assert result.stdout == service.http.get(f"/jobs/{job['id']}/result").content
    # Everything but the data goes to stderr.
    assert f"job {job['id']}  CREATED".encode() in result.stderr
    assert result.stderr.endswith(
        f"wrote 4 records, {len(result.stdout):,} bytes to stdout\n".encode()
    )


def test_a_query_the_upstream_cannot_parse_exits_1_with_its_message(
    loaded: tuple[RunningSandbox, RunningService], out: Path
) -> None:
    _, service = loaded
    target = out / "never.csv"
    result = export(
        service, "contact", "--query", "select * from contact wher x", "--wait", "-o", str(target)
    )
    assert result.returncode == 1
    assert "Error parsing query" in result.stderr
    assert "upstream_query_refused" in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(out) == []
    [job] = downloads(service)
    assert job["state"] == "SUBMIT_FAILED"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--where", "C_LastName = 'Smith'", "--query", "select * from contact"], "not allowed"),
        (["-o", "contacts.csv"], "-o needs --wait"),
        (["--format", "xml", "--wait"], "invalid choice"),
        (["--where", " ", "--wait"], "--where is empty"),
        (["--wait", "-o", "no/such/dir/contacts.csv"], "no directory"),
        (["--wait", "-o", "."], "is a directory"),
        (["--wait", "-o", "sub/"], "names a directory"),
        (["--wait", "-o", ""], "-o is empty"),
    ],
)
@ONE_STORE
def test_usage_errors_exit_2_and_start_no_job(
    loaded: tuple[RunningSandbox, RunningService], out: Path, args: list[str], says: str
) -> None:
    _, service = loaded
    result = export(service, "contact", *args, cwd=out)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.stderr
    assert downloads(service) == []
    assert os.listdir(out) == []


@ONE_STORE
def test_without_wait_the_job_is_printed_and_nothing_written(
    loaded: tuple[RunningSandbox, RunningService], out: Path
) -> None:
    _, service = loaded
    result = export(service, "contact", cwd=out)
    assert result.returncode == 0, result.stderr
    [job] = downloads(service)
    assert result.stdout == (
        f"job {job['id']}  CREATED  download contact@marketing  instance default  via submit\n"
    )
    assert os.listdir(out) == []


@ONE_STORE
def test_jobs_shows_each_jobs_direction_and_lists_one_direction_on_request(
    loaded: tuple[RunningSandbox, RunningService], out: Path
) -> None:
    _, service = loaded
    assert export(service, "contact", cwd=out).returncode == 0
    [download] = downloads(service)
    listed = run_bulkhook("jobs", "--url", service.url)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert sorted(row[2] for row in rows) == ["download", "upload"]
    only = run_bulkhook("jobs", "--direction", "download", "--url", service.url)
    assert only.returncode == 0, only.stderr
    [row] = [line.split() for line in only.stdout.splitlines()[1:]]
    assert (row[0], row[2]) == (download["id"], "download")
    wrong = run_bulkhook("jobs", "--direction", "sideways", "--url", service.url)
    assert wrong.returncode == 2 and "invalid choice" in wrong.stderr


def test_a_result_the_service_cannot_fetch_exits_1_and_writes_no_file(
    loaded: tuple[RunningSandbox, RunningService], out: Path
) -> None:
    upstream, service = loaded
    # The upstream says three times over that it has no result: the fetch is given up.
    upstream.sandbox.inject_fault("download", 404, times=3)
    target = out / "contacts.csv"
    result = export(service, "contact", "--wait", "-o", str(target))
    assert result.returncode == 1
    assert "could not be fetched" in result.stderr
    assert the_download(service)["result"]["status"] == "failed"
    assert os.listdir(out) == []


def test_a_download_job_that_does_not_complete_exits_1_with_its_state(
    start_sandbox: StartSandbox, start_service: StartService, out: Path
) -> None:
    service = start_service(start_sandbox(job_seconds=5.0, generated_records=10))
    target = out / "generated.csv"
    process = subprocess.Popen(
        exporting(service, "generated", "--wait", "-o", str(target)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=user_environment(),
    )
    try:
        eventually(lambda: any(job["upstream_id"] for job in downloads(service)))
        [job] = downloads(service)
        assert service.http.post(f"/jobs/{job['id']}/cancel").status_code == 200
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1
    assert f"job {job['id']} ended CANCELLED" in stderr
    assert "nothing to download" in stderr
    assert os.listdir(out) == []


@ONE_STORE
def test_the_download_progress_bar_is_drawn_on_a_terminal(
    start_sandbox: StartSandbox, start_service: StartService, out: Path
) -> None:
    import pty

    service = start_service(start_sandbox(generated_records=20_000))
    target = out / "generated.csv"
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        exporting(service, "generated", "--wait", "-o", str(target)),
        stdout=subprocess.PIPE,
        stderr=secondary,
        env={**user_environment(), "COLUMNS": "100", "TERM": "xterm"},
    )
    os.close(secondary)
    drawn = drained(primary)
    stdout, _ = process.communicate(timeout=60)
    os.close(primary)
    assert process.returncode == 0
    assert b"downloading" in drawn
    assert b"100%" in drawn or b"MiB" in drawn or b"KiB" in drawn
    assert b"wrote 20000 records" in stdout  # the lines about the job stay on stdout
    assert len(records_of(target.read_bytes(), "csv")) == 20_000


@ONE_STORE
def test_a_missing_token_or_service_is_one_line_with_a_hint(
    start_sandbox: StartSandbox, start_service: StartService, out: Path
) -> None:
    service = start_service(start_sandbox(), api_tokens=(TOKEN,))
    refused = export(service, "contact", "--wait", cwd=out)
    assert refused.returncode == 1
    assert "unauthorized" in refused.stderr and "pass --token" in refused.stderr
    allowed = export(service, "contact", "--token", TOKEN, cwd=out)
    assert allowed.returncode == 0, allowed.stderr
    gone = run_bulkhook("export", "contact", "--url", f"http://127.0.0.1:{free_port()}")
    assert gone.returncode == 1
    assert "cannot reach the service" in gone.stderr and "bulkhook serve" in gone.stderr
    assert TOKEN not in refused.stderr + allowed.stdout + allowed.stderr
    assert os.listdir(out) == []
