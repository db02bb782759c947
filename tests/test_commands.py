"""`bulkhook submit / status / jobs / serve / demo`, run as real processes."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .helpers import (
    RunningService,
    StartSandbox,
    StartService,
    drained,
    eventually,
    free_port,
    run_bulkhook,
    serve,
    wait_healthy,
    write_csv,
)

# What a terminal draws besides text: colours, cursor moves, bracketed paste.
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


bulkhook = run_bulkhook


@pytest.fixture
def service(start_sandbox: StartSandbox, start_service: StartService) -> RunningService:
    return start_service(start_sandbox(job_seconds=0.3))


def test_submit_and_wait_follows_the_job_to_completed(
    service: RunningService, contacts_csv: Path
) -> None:
    result = bulkhook(
        "submit", str(contacts_csv), "--object", "contact", "--wait", "--url", service.url
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert "CREATED" in lines[0]
    assert "COMPLETED" in lines[-1]
    assert "10 records, none failed" in lines[-1]
    assert result.stderr == ""  # no progress bar off a terminal


# The states a job passes on its way to COMPLETED, in order.
PROGRESS = ["SUBMITTING", "CREATED", "STARTED", "RUNNING", "COMPLETED"]


def ids_printed(stdout: str) -> list[str]:
    """The job id of each ``job <id> <STATE> ...`` line."""
    return [line.split()[1] for line in stdout.splitlines() if line.startswith("job ")]


def states_printed(stdout: str) -> list[str]:
    """The state of each ``job <id> <STATE> ...`` line."""
    return [line.split()[2] for line in stdout.splitlines() if line.startswith("job ")]


@pytest.fixture
def slow_job_service(start_sandbox: StartSandbox, start_service: StartService) -> RunningService:
    """Jobs that run for two seconds, polled every few tenths: followers see them move."""
    return start_service(start_sandbox(job_seconds=2.0), callback_grace=0.2)


def test_submit_wait_prints_each_state_once_in_order(
    slow_job_service: RunningService, contacts_csv: Path
) -> None:
    result = bulkhook(
        "submit", str(contacts_csv), "--object", "contact", "--wait", "--url", slow_job_service.url
    )
    assert result.returncode == 0, result.stderr
    states = states_printed(result.stdout)
    assert states[0] == "CREATED" and states[-1] == "COMPLETED"
    assert states == sorted(set(states), key=PROGRESS.index), result.stdout


def test_status_wait_prints_each_state_once_in_order(
    slow_job_service: RunningService, contacts_csv: Path
) -> None:
    job = slow_job_service.submit(contacts_csv).json()
    result = bulkhook("status", job["id"], "--wait", "--url", slow_job_service.url)
    assert result.returncode == 0, result.stderr
    states = states_printed(result.stdout)
    assert states[-1] == "COMPLETED"
    assert states == sorted(set(states), key=PROGRESS.index), result.stdout


def test_submit_json_output_parses(service: RunningService, contacts_csv: Path) -> None:
    result = bulkhook(
        "submit", str(contacts_csv), "--object", "contact", "--json", "--url", service.url
    )
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)
    assert job["state"] == "CREATED"
    status = bulkhook("status", job["id"], "--wait", "--json", "--url", service.url)
    assert status.returncode == 0
    assert json.loads(status.stdout.strip().splitlines()[-1])["state"] == "COMPLETED"
    listed = bulkhook("jobs", "--json", "--url", service.url)
    assert [j["id"] for j in json.loads(listed.stdout)["jobs"]] == [job["id"]]


def test_wait_exits_non_zero_unless_completed(
    start_sandbox: StartSandbox, start_service: StartService, tmp_path: Path
) -> None:
    service = start_service(start_sandbox(job_seconds=0.2))
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"Email,Name\n\xff\xfe,x\n")  # not UTF-8: refused before upload
    result = bulkhook("submit", str(bad), "--object", "contact", "--wait", "--url", service.url)
    assert result.returncode == 1
    assert "not_utf8" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_job_failed_upstream_shows_its_error_without_terminal_escapes(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    message = "Refused\x1b[2J\x1b]0;owned\x07 as a whole"
    service = start_service(start_sandbox(fail_whole=1.0, fail_whole_message=message))
    waited = bulkhook(
        "submit", str(contacts_csv), "--object", "contact", "--wait", "--url", service.url
    )
    assert waited.returncode == 1, "ABORTED is not COMPLETED"
    shown = "  upstream error: Refused [2J ]0;owned  as a whole"
    lines = waited.stdout.splitlines()
    assert states_printed(waited.stdout)[-1] == "ABORTED"
    assert lines[-1] == shown and "ABORTED" in lines[-2]
    job_id = lines[-2].split()[1]
    status = bulkhook("status", job_id, "--url", service.url)
    assert status.returncode == 0
    assert status.stdout.splitlines()[1] == shown
    assert "\x1b" not in waited.stdout + status.stdout
    assert "\x07" not in waited.stdout + status.stdout
    as_json = json.loads(bulkhook("status", job_id, "--json", "--url", service.url).stdout)
    assert as_json["upstream_error"] == message


def test_status_shows_the_timeline(service: RunningService, contacts_csv: Path) -> None:
    job = service.submit(contacts_csv).json()
    service.wait_for(job["id"], {"COMPLETED"})
    result = bulkhook("status", job["id"], "--url", service.url)
    assert result.returncode == 0
    assert "COMPLETED" in result.stdout
    assert "signature verified" in result.stdout


def test_status_writes_times_in_utc_and_counts_in_words(
    start_sandbox: StartSandbox, start_service: StartService, tmp_path: Path
) -> None:
    # Every callback lost: the job finishes by polling, and each poll names its due time.
    service = start_service(start_sandbox(drop_callbacks=1.0), callback_grace=0.2)
    job = service.submit(write_csv(tmp_path / "one.csv", [["Email"], ["ada@example.com"]]))
    service.wait_for(job.json()["id"], {"COMPLETED"})
    result = bulkhook("status", job.json()["id"], "--url", service.url)
    assert result.returncode == 0, result.stderr
    first, *timeline = result.stdout.splitlines()
    assert "COMPLETED" in first and "1 record, none failed" in first
    assert "received one.csv (1 row)" in result.stdout
    assert re.search(r"poll due \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", result.stdout)
    assert any("1 record, 0 failed" in line for line in timeline)
    assert not re.search(r"\b\d{10}\.\d+", result.stdout), "a raw epoch"
    assert "1 records" not in result.stdout and "1 rows" not in result.stdout


def test_an_unknown_job_is_one_line_and_exit_1(service: RunningService) -> None:
    result = bulkhook("status", "nope", "--url", service.url)
    assert result.returncode == 1
    assert "job_not_found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_unreachable_service_says_so_and_hints_at_serve() -> None:
    result = bulkhook("jobs", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "cannot reach the service" in result.stderr
    assert "bulkhook serve" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def failed_job(
    start_sandbox: StartSandbox, start_service: StartService, tmp_path: Path
) -> tuple[RunningService, dict[str, Any]]:
    """A COMPLETED job whose upstream failed two of its three records, copied into the
    store (so every later look at them reads the same place)."""
    service = start_service(start_sandbox(), api_tokens=("cli-token",))
    rows = [["Name", "Email"], ["Ada", "ada@example.com"], ["Bad", "=not-an-email"], ["No", ""]]
    with write_csv(tmp_path / "contacts.csv", rows).open("rb") as handle:
        submitted = service.http.post(
            "/jobs",
            data={"object": "contact"},
            files={"file": ("contacts.csv", handle, "text/csv")},
            headers={"Authorization": "Bearer cli-token"},
        )
    assert submitted.status_code == 202, submitted.text
    service.http.headers["Authorization"] = "Bearer cli-token"
    job_id = submitted.json()["id"]
    service.wait_for(job_id, {"COMPLETED"})
    eventually(
        lambda: service.http.get(f"/jobs/{job_id}").json()["failed_records"]["status"] == "copied"
    )
    return service, service.http.get(f"/jobs/{job_id}").json()


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_errors_lists_each_failed_record_with_its_line_and_reason(
    failed_job: tuple[RunningService, dict[str, Any]],
) -> None:
    service, job = failed_job
    result = bulkhook("errors", job["id"], "--url", service.url, "--token", "cli-token")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"job {job['id']}: 2 failed records",
        "  line 3: Email is not a valid email address",
        "  line 4: Email is empty",
    ]
    as_json = bulkhook(
        "errors", job["id"], "--json", "--url", service.url, BULKHOOK_TOKEN="cli-token"
    )
    assert json.loads(as_json.stdout) == service.http.get(f"/jobs/{job['id']}/errors").json()


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_errors_as_csv_is_the_dashboard_download(
    failed_job: tuple[RunningService, dict[str, Any]], tmp_path: Path
) -> None:
    service, job = failed_job
    download = service.http.get(f"/ui/jobs/{job['id']}/failed.csv").content
    options = ("--url", service.url, "--token", "cli-token")
    printed = bulkhook("errors", job["id"], "--csv", *options)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.encode() == download.replace(b"\r\n", b"\n")
    header, *records = csv.reader(io.StringIO(printed.stdout))
    assert header[:2] == ["lineNumber", "errorMessage"] and "Email" in header
    assert [row[header.index("Email")] for row in records] == ["'=not-an-email", ""]
    # -o: the file's name picks the form when no flag does; stdout stays empty.
    for name, flags in (("failed.csv", []), ("failed.json", []), ("failed.txt", ["--csv"])):
        written = bulkhook("errors", job["id"], "-o", str(tmp_path / name), *flags, *options)
        assert written.returncode == 0, written.stderr
        assert written.stdout == ""
        assert f"to {tmp_path / name}" in written.stderr
    assert (tmp_path / "failed.csv").read_bytes() == download
    assert (tmp_path / "failed.txt").read_bytes() == download
    assert json.loads((tmp_path / "failed.json").read_text())["count"] == 2


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_errors_fails_in_one_line_for_a_bad_token_an_unknown_job_or_no_service(
    failed_job: tuple[RunningService, dict[str, Any]], tmp_path: Path
) -> None:
    service, job = failed_job
    out = tmp_path / "out"
    out.mkdir()
    token = ("--token", "cli-token")
    nowhere = f"http://127.0.0.1:{free_port()}"
    for form in ("--json", "--csv"):
        untokened = bulkhook("errors", job["id"], form, "--url", service.url)
        assert untokened.returncode == 1
        assert "unauthorized" in untokened.stderr and "hint: pass --token" in untokened.stderr
        unknown = bulkhook("errors", "nope", form, "-o", f"{out}/x", "--url", service.url, *token)
        assert unknown.returncode == 1
        assert "job_not_found" in unknown.stderr
        assert len(unknown.stderr.strip().splitlines()) == 1
        gone = bulkhook("errors", job["id"], form, "-o", f"{out}/x", "--url", nowhere, *token)
        assert gone.returncode == 1
        assert "cannot reach the service" in gone.stderr and "bulkhook serve" in gone.stderr
        assert "Traceback" not in unknown.stderr + gone.stderr + untokened.stderr
    assert list(out.iterdir()) == []  # no file, not even a partial one
    both = bulkhook("errors", job["id"], "--json", "--csv", "--url", service.url)
    assert both.returncode == 2
    assert "choose one" in both.stderr


def test_submit_a_missing_file_is_a_usage_error() -> None:
    result = bulkhook("submit", "nowhere.csv", "--object", "contact")
    assert result.returncode == 2
    assert "cannot read nowhere.csv" in result.stderr


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OC_", "BULKHOOK_"))}
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url, process
    finally:
        process.terminate()
        process.wait(10)


def test_serve_on_embedded_defaults_runs_the_walkthrough(
    served: tuple[str, subprocess.Popen[str]], contacts_csv: Path, tmp_path: Path
) -> None:
    url, process = served
    objects = httpx.get(f"{url}/objects").json()
    assert "contact" in objects["objects"]
    result = bulkhook("submit", str(contacts_csv), "--object", "contact", "--wait", "--url", url)
    assert result.returncode == 0, result.stderr
    assert "COMPLETED" in result.stdout
    assert (tmp_path / "bulkhook.db").exists()
    process.terminate()
    output = process.communicate(timeout=10)[0]
    assert "embedded sandbox" in output
    assert "generated at start-up" in output
    assert f"dashboard at {url}/" in output
    # Off a terminal the logs are JSON lines, for a log collector.
    assert '"message": "Application startup complete."' in output
    # A plain install serves on uvicorn's standard stack.
    assert "HTTP parser httptools, event loop uvloop" in output


def test_serve_runs_on_the_stack_its_settings_name(tmp_path: Path) -> None:
    process, url = serve(tmp_path, BULKHOOK_HTTP="h11", BULKHOOK_LOOP="asyncio")
    try:
        assert httpx.get(f"{url}/healthz").status_code == 200
    finally:
        process.terminate()
        output = process.communicate(timeout=10)[0]
    assert "HTTP parser h11, event loop asyncio" in output


def test_serve_names_an_unknown_stack_in_one_line() -> None:
    result = bulkhook("serve", "--port", str(free_port()), BULKHOOK_HTTP="fast")
    assert result.returncode == 2
    assert "BULKHOOK_HTTP" in result.stderr and "httptools" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def serve_on_a_terminal(cwd: Path, **env: str) -> tuple[str, str]:
    """Run `bulkhook serve` with its stderr on a terminal until it answers, then stop it:
    what it printed on stdout, and what the terminal showed."""
    import pty
    import threading

    primary, secondary = pty.openpty()
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("OC_", "BULKHOOK_"))}
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port)],
        cwd=cwd,
        env={**environment, **env},
        stdout=subprocess.PIPE,
        stderr=secondary,
        text=True,
    )
    os.close(secondary)
    shown = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the terminal closed with the process
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
    finally:
        process.terminate()
        stdout = process.communicate(timeout=30)[0]
        reader.join(10)
        os.close(primary)
    return stdout, shown.decode().replace("\r\n", "\n")


def test_serve_on_a_terminal_logs_readable_text(tmp_path: Path) -> None:
    stdout, shown = serve_on_a_terminal(tmp_path)
    assert "dashboard at http://127.0.0.1:" in stdout
    assert "/docs" in stdout
    assert "press Ctrl+C to stop" in stdout
    lines = [line for line in shown.splitlines() if line.strip()]
    assert any(
        line.endswith("INFO    uvicorn.error: Application startup complete.") for line in lines
    )
    assert not [line for line in lines if line.startswith("{")]


def test_serve_on_a_terminal_still_logs_json_when_told_to(tmp_path: Path) -> None:
    _, shown = serve_on_a_terminal(tmp_path, BULKHOOK_LOG_FORMAT="json")
    lines = [json.loads(line) for line in shown.splitlines() if line.strip()]
    assert {"level": "info", "logger": "uvicorn.error"}.items() <= lines[0].items()
    assert "Application startup complete." in [line["message"] for line in lines]


def test_serve_refuses_an_open_api_on_a_public_address() -> None:
    result = bulkhook("serve", "--host", "0.0.0.0", "--port", str(free_port()))  # noqa: S104
    assert result.returncode == 2
    assert "BULKHOOK_API_TOKENS" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_serve_names_a_bad_setting_in_one_line() -> None:
    result = bulkhook("serve", "--port", str(free_port()), BULKHOOK_POLL_INTERVAL="soon")
    assert result.returncode == 2
    assert "BULKHOOK_POLL_INTERVAL" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_demo_shows_the_callback_and_the_polling_fallback(tmp_path: Path) -> None:
    result = run_bulkhook("demo", timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # Everything it makes (database, results, spool) goes with it.
    assert sorted(os.listdir(tmp_path)) == []
    assert "by a verified callback" in result.stdout
    assert "up to a minute after a job ends" in result.stdout
    assert "--callback-delay" in result.stdout
    assert "by polling" in result.stdout
    assert "demo succeeded" in result.stdout


def on_a_terminal(*args: str, columns: int) -> tuple[int, str]:
    """Run bulkhook with stdout and stderr on a terminal ``columns`` wide: what a person
    at that terminal reads, escape codes removed."""
    import fcntl
    import pty
    import struct
    import termios

    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("OC_", "BULKHOOK_"))}
    process = subprocess.Popen(
        [sys.executable, "-m", "service", *args],
        stdin=subprocess.DEVNULL,
        stdout=secondary,
        stderr=secondary,
        env={**environment, "COLUMNS": str(columns), "TERM": "xterm"},
    )
    os.close(secondary)
    drawn = drained(primary)
    process.wait(60)
    os.close(primary)
    return process.returncode, ESCAPES.sub("", drawn.decode()).replace("\r\n", "\n")


@pytest.fixture
def cancelling(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> tuple[RunningService, dict[str, Any]]:
    """A job left CANCELLATION_PENDING, the longest state: the callback saying it was
    cancelled is lost, and the next poll is half a minute away."""
    service = start_service(
        start_sandbox(job_seconds=60, drop_callbacks=1.0),
        callback_grace=60,
        poll_interval=30,
        poll_max_interval=60,
    )
    job = service.submit(contacts_csv).json()
    cancelled = service.http.post(f"/jobs/{job['id']}/cancel")
    assert cancelled.json()["state"] == "CANCELLATION_PENDING", cancelled.text
    return service, cancelled.json()


def test_jobs_on_a_narrow_terminal_prints_every_id_whole(
    cancelling: tuple[RunningService, dict[str, Any]],
) -> None:
    service, job = cancelling
    code, seen = on_a_terminal("jobs", "--url", service.url, columns=60)
    assert code == 0, seen
    row = next(line for line in seen.splitlines() if job["id"] in line)
    assert row.split()[:5] == [job["id"], "CANCELLATION_PENDING", "upload", "contact", "marketing"]
    assert "…" not in seen


def test_jobs_on_a_wide_terminal_draws_a_table(
    cancelling: tuple[RunningService, dict[str, Any]],
) -> None:
    service, job = cancelling
    code, seen = on_a_terminal("jobs", "--url", service.url, columns=200)
    assert code == 0, seen
    lines = seen.splitlines()
    header = next(line for line in lines if "┃" in line)
    assert "state" in header and "records" in header and "via" in header
    row = next(line for line in lines if job["id"] in line)
    assert "│" in row and "CANCELLATION_PENDING" in row and "cancel" in row
    assert "…" not in seen


def test_jobs_off_a_terminal_prints_plain_lines(
    cancelling: tuple[RunningService, dict[str, Any]],
) -> None:
    service, job = cancelling
    result = bulkhook("jobs", "--url", service.url, COLUMNS="60")
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    assert header.split() == [
        "job",
        "state",
        "direction",
        "object",
        "hub",
        "instance",
        "records",
        "failed",
        "via",
        "updated",
    ]
    assert row.split()[:5] == [job["id"], "CANCELLATION_PENDING", "upload", "contact", "marketing"]
    assert "│" not in result.stdout and "…" not in result.stdout


def test_the_upload_progress_bar_is_drawn_on_a_terminal(
    service: RunningService, contacts_csv: Path
) -> None:
    import pty

    primary, secondary = pty.openpty()
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("OC_", "BULKHOOK_"))}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "submit",
            str(contacts_csv),
            "--object",
            "contact",
            "--url",
            service.url,
        ],
        stdout=subprocess.PIPE,
        stderr=secondary,
        env={**environment, "COLUMNS": "100", "TERM": "xterm"},
    )
    os.close(secondary)
    drawn = drained(primary)
    stdout, _ = process.communicate(timeout=60)
    os.close(primary)
    assert process.returncode == 0
    assert b"uploading" in drawn
    assert b"100%" in drawn or b"1.0" in drawn or b"kB" in drawn or b"KiB" in drawn
    assert b"CREATED" in stdout  # the job line still goes to stdout


ONE_STORE = pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)


@contextlib.contextmanager
def fifo_reader(path: Path) -> Iterator[Callable[[], bytes]]:
    """A FIFO at ``path`` with its read end open (so a writer's open does not block):
    yields a function returning what was written to it, once the writer is done."""
    os.mkfifo(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)

    def read() -> bytes:
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        return data

    try:
        yield read
    finally:
        os.close(fd)


@ONE_STORE
def test_errors_written_to_a_fifo_goes_through_it_and_leaves_it_a_fifo(
    failed_job: tuple[RunningService, dict[str, Any]], tmp_path: Path
) -> None:
    service, job = failed_job
    out = tmp_path / "out"
    out.mkdir()
    fifo = out / "failed"
    with fifo_reader(fifo) as read:
        result = bulkhook(
            "errors", job["id"], "-o", str(fifo), "--url", service.url, "--token", "cli-token"
        )
        assert result.returncode == 0, result.stderr
        assert read().decode().startswith(f"job {job['id']}: 2 failed records\n")
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert list(out.iterdir()) == [fifo]  # no temporary file left beside it


@ONE_STORE
def test_export_written_to_a_fifo_goes_through_it_and_leaves_it_a_fifo(
    service: RunningService, contacts_csv: Path, tmp_path: Path
) -> None:
    loaded = service.submit(contacts_csv).json()
    service.wait_for(loaded["id"], {"COMPLETED"})
    out = tmp_path / "out"
    out.mkdir()
    fifo = out / "contacts.csv"
    with fifo_reader(fifo) as read:
        result = bulkhook("export", "contact", "--wait", "-o", str(fifo), "--url", service.url)
        assert result.returncode == 0, result.stderr
        written = read()
    job_id = ids_printed(result.stdout)[-1]
    assert written == service.http.get(f"/jobs/{job_id}/result").content
    assert f"wrote 10 records, {len(written):,} bytes to {fifo}\n" in result.stdout
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert list(out.iterdir()) == [fifo]


@pytest.mark.parametrize("target", ["/", ".", "{tmp}"])
def test_errors_into_a_directory_is_a_usage_error_in_one_line(tmp_path: Path, target: str) -> None:
    output = target.format(tmp=tmp_path)
    result = bulkhook(
        "errors", "01abc", "-o", output, "--url", f"http://127.0.0.1:{free_port()}", cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"bulkhook errors: cannot write {output}: it is a directory\n"
    assert list(tmp_path.iterdir()) == []


@ONE_STORE
@pytest.mark.parametrize("job_id", ["..", ".", "a/b", "", "x" * 65, "\udcff", "é"])
@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["errors"]])
def test_an_argument_that_is_not_a_job_id_is_a_usage_error_in_one_line(
    service: RunningService, contacts_csv: Path, command: list[str], job_id: str
) -> None:
    service.submit(contacts_csv)  # a job the list route would show, were it reached
    result = bulkhook(command[0], job_id, *command[1:], "--url", service.url)
    assert (result.returncode, result.stdout) == (2, "")
    assert "is not a job id" in result.stderr
    assert len(result.stderr.splitlines()) == 1


NOT_BULKHOOK = {
    "a proxy's login page": (b"<html><body>Sign in</body></html>", "text/html"),
    "an empty object": (b"{}", "application/json"),
    "null": (b"null", "application/json"),
}


@pytest.fixture(params=list(NOT_BULKHOOK))
def not_bulkhook(request: pytest.FixtureRequest) -> Iterator[str]:
    """A server on loopback answering every request 200 with something that is not
    bulkhook's API: its URL."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from service.server.thread import ServerThread

    body, media_type = NOT_BULKHOOK[request.param]

    async def answer(request: Request) -> Response:
        await request.body()
        return Response(body, media_type=media_type)

    server = ServerThread(
        Starlette(routes=[Route("/{path:path}", answer, methods=["GET", "POST"])])
    ).start()
    yield server.url
    server.stop()


@pytest.mark.parametrize(
    "command",
    [
        ["submit", "{csv}", "--object", "contact"],
        ["submit", "{csv}", "--object", "contact", "--json"],
        ["jobs"],
        ["jobs", "--json"],
        ["status", "01abc"],
        ["status", "01abc", "--json"],
        ["export", "contact"],
        ["errors", "01abc"],
        ["errors", "01abc", "--json"],
        ["errors", "01abc", "--csv"],
        ["instances"],
        ["instances", "--json"],
    ],
)
def test_a_server_that_is_not_bulkhook_is_one_line_and_exit_1(
    not_bulkhook: str, contacts_csv: Path, command: list[str]
) -> None:
    args = [arg.format(csv=contacts_csv) for arg in command]
    result = bulkhook(*args, "--url", not_bulkhook)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith(
        f"bulkhook {command[0]}: the service at {not_bulkhook} answered something that is"
        " not bulkhook's API (HTTP 200, "
    )
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("token", ["s3cr3t-é", "s3cr3t\nnext line", "s3cr3t\rreturn"])
@pytest.mark.parametrize("command", [["jobs"], ["submit", "{csv}", "--object", "contact"]])
def test_a_token_no_http_header_can_carry_is_a_usage_error_and_never_shown(
    contacts_csv: Path, command: list[str], token: str
) -> None:
    args = [arg.format(csv=contacts_csv) for arg in command]
    result = bulkhook(*args, "--token", token, "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"bulkhook {command[0]}: the token (--token or BULKHOOK_TOKEN) holds a character"
        " other than printable ASCII: an HTTP header cannot carry it\n"
    )


@pytest.mark.parametrize("key", ["é", "key\nwith a newline", ""])
def test_an_idempotency_key_no_http_header_can_carry_is_a_usage_error(
    contacts_csv: Path, key: str
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    result = bulkhook(
        "submit",
        str(contacts_csv),
        "--object",
        "contact",
        "--idempotency-key",
        key,
        "--url",
        nowhere,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("bulkhook submit: --idempotency-key ")
    assert "cannot reach" not in result.stderr
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("url", ["http://[::1", "http://h:port/", "ftp://127.0.0.1/", "\udcff"])
def test_a_url_that_is_not_an_http_url_is_a_usage_error(url: str) -> None:
    result = bulkhook("jobs", "--url", url)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("bulkhook jobs: --url ")
    assert len(result.stderr.splitlines()) == 1


def test_an_argument_sent_as_text_must_be_utf8(contacts_csv: Path) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    submitted = bulkhook("submit", str(contacts_csv), "--object", "\udcff", "--url", nowhere)
    listed = bulkhook("jobs", "--state", "\udcff", "--url", nowhere)
    assert (submitted.returncode, listed.returncode) == (2, 2)
    assert submitted.stderr == "bulkhook submit: the object name is not valid UTF-8 text\n"
    assert listed.stderr == "bulkhook jobs: --state is not valid UTF-8 text\n"


def test_the_unreachable_message_hides_the_urls_credentials_and_query() -> None:
    url = f"http://user:hunter2@127.0.0.1:{free_port()}/?token=s3cret#frag"
    result = bulkhook("jobs", "--url", url)
    assert result.returncode == 1
    assert "cannot reach the service at http://***@127.0.0.1:" in result.stderr
    assert "hunter2" not in result.stderr and "s3cret" not in result.stderr
    assert "token" not in result.stderr


@pytest.mark.parametrize("port", ["99999", "65536", "-5"])
def test_sandbox_refuses_a_port_out_of_range_in_one_line(port: str) -> None:
    result = bulkhook("sandbox", "--port", port, timeout=20)
    assert result.returncode == 2
    assert result.stderr == f"bulkhook sandbox: error: --port must be from 0 to 65535, got {port}\n"
    assert result.stdout == ""


@pytest.mark.parametrize("port", ["99999", "-5"])
def test_serve_refuses_a_port_out_of_range_as_a_usage_error(port: str) -> None:
    result = bulkhook("serve", "--port", port, timeout=20)
    assert result.returncode == 2
    assert result.stderr == f"bulkhook serve: error: --port must be from 0 to 65535, got {port}\n"


def test_sandbox_on_a_taken_port_says_so_in_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = bulkhook("sandbox", "--port", str(port), timeout=20)
    assert result.returncode == 3
    assert result.stderr.startswith(f"bulkhook sandbox: error: cannot listen on 127.0.0.1:{port}: ")
    assert len(result.stderr.splitlines()) == 1
    assert result.stdout == ""


@pytest.mark.parametrize("option", ["--job-seconds", "--retention", "--callback-delay"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "Infinity"])
def test_sandbox_refuses_seconds_that_are_not_a_finite_number(option: str, value: str) -> None:
    result = bulkhook("sandbox", "--port", str(free_port()), f"{option}={value}", timeout=20)
    assert result.returncode == 2
    assert f"argument {option}: must be a finite number: {value}" in result.stderr
    assert "must not be negative" not in result.stderr
