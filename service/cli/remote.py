"""The CLI commands that talk to a running service: submit, status, jobs, errors
(and what ``export`` shares with them: the client, error reporting, printing a job).

Human output is one line per fact; ``--json`` prints the API's JSON. Failures are one
line on stderr: exit 1 for a job or service problem, 2 for usage errors, and
``bulkhook submit --wait`` / ``status --wait`` exit 1 unless the job ends COMPLETED.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import httpx

from service.cli.api_client import (
    NOT_BULKHOOK,
    ServiceClient,
    ServiceError,
    ServiceUnreachable,
    shown_url,
)
from service.values import is_clean, job_id_ok

__all__ = [
    "CommandError",
    "add_job_commands",
    "call",
    "check_job_id",
    "connect",
    "follow_to_end",
    "print_job",
    "print_table",
    "printable",
    "report",
    "result_line",
    "service_options",
    "written",
    "written_in_place",
]

DEFAULT_URL = "http://127.0.0.1:8000"
USAGE = 2
# The arguments sent to the service as text (form fields, JSON, query parameters), by
# the name the user typed.
_SENT_AS_TEXT = {
    "object": "the object name",
    "hub": "--hub",
    "path": "--path",
    "metadata": "--metadata",
    "instance": "--instance",
    "state": "--state",
    "where": "--where",
    "query": "--query",
}


class CommandError(Exception):
    """A failure to report in one line; ``hint`` is a second line saying what to do."""

    def __init__(self, message: str, *, hint: str | None = None, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code


def connect(args: argparse.Namespace) -> ServiceClient:
    """A client of the service the command's ``--url`` and ``--token`` name, once every
    argument it sends can be sent: refused here, a bad one is a usage error, not a
    crash inside the HTTP library or a misleading "cannot reach"."""
    _check_url(args.url)
    if args.token:
        _check_header_value(args.token, "the token (--token or BULKHOOK_TOKEN)", shown=False)
    if getattr(args, "idempotency_key", None) is not None:
        _check_header_value(args.idempotency_key, "--idempotency-key", shown=True)
    # Bytes of an argument that are not UTF-8 reach argv as lone surrogates (argv holds
    # no NUL), which ``is_clean`` refuses.
    for name, label in _SENT_AS_TEXT.items():
        value = getattr(args, name, None)
        if isinstance(value, str) and not is_clean(value):
            raise CommandError(f"{label} is not valid UTF-8 text", code=USAGE)
    return ServiceClient(args.url, args.token)


def _check_url(url: str) -> None:
    if not is_clean(url):
        raise CommandError("--url is not valid UTF-8 text", code=USAGE)
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise CommandError(f"--url is not a URL: {exc}", code=USAGE) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise CommandError(
            f"--url must be an http:// or https:// URL, not {shown_url(url)!r}", code=USAGE
        )


def _check_header_value(value: str, label: str, *, shown: bool) -> None:
    """An HTTP header carries printable ASCII only: anything else would crash the
    request, or (a newline) be refused by the HTTP library before it is sent. A token
    is never echoed."""
    if not value:
        raise CommandError(f"{label} is empty", code=USAGE)
    if all(" " <= ch <= "~" for ch in value):
        return
    echo = f" ({printable(value)!r})" if shown and is_clean(value) else ""
    raise CommandError(
        f"{label}{echo} holds a character other than printable ASCII: an HTTP header cannot"
        " carry it",
        code=USAGE,
    )


def check_job_id(value: str) -> str:
    """``value`` when it can be one of the service's job ids. Anything else is refused
    before it is put in a URL path, where ``..``, ``.`` or a ``/`` would name another
    route (HTTP clients resolve dot segments) and non-UTF-8 bytes cannot go at all."""
    if not job_id_ok(value):
        shown = printable(repr(value) if is_clean(value) else ascii(value))
        shown = shown if len(shown) <= 72 else shown[:71] + "…"
        raise CommandError(f"{shown} is not a job id (1 to 64 letters, digits, _ or -)", code=USAGE)
    return value


def call(fn: Any, *fn_args: Any, **kwargs: Any) -> Any:
    """Run ``fn``; a service that cannot be reached or answers an error becomes a
    ``CommandError`` (with a hint where one helps)."""
    try:
        return fn(*fn_args, **kwargs)
    except ServiceUnreachable as exc:
        raise CommandError(
            str(exc).split(": ", 1)[0], hint="start it with `bulkhook serve`"
        ) from None
    except ServiceError as exc:
        if exc.code == NOT_BULKHOOK:  # the message names the status already
            raise CommandError(exc.message) from None
        hint = "pass --token or set BULKHOOK_TOKEN" if exc.status == 401 else None
        raise CommandError(f"{exc.message} ({exc.code}, HTTP {exc.status})", hint=hint) from None


def _counts(job: dict[str, Any]) -> str:
    total, failed = job.get("records_count"), job.get("records_failed_count")
    if total is None:
        return ""
    text = f"{total} record{'' if total == 1 else 's'}"
    if job.get("direction") == "download":  # a query fails as a whole or not at all
        return text
    if failed:
        text += f", {failed} FAILED"
    elif failed == 0:
        text += ", none failed"
    return text


def print_job(job: dict[str, Any], *, as_json: bool, out: TextIO | None = None) -> None:
    """The job in one line (and its upstream error on the next), or as JSON; on ``out``,
    stdout unless given (a command writing data to stdout prints jobs on stderr)."""
    out = out or sys.stdout
    if as_json:
        print(json.dumps(job), file=out, flush=True)
        return
    what = f"{job['object']}@{job['hub']}"
    parts = [
        f"job {job['id']}",
        job["state"],
        f"download {what}" if job.get("direction") == "download" else what,
        # The connector instance the job runs on (its upstream account and keys).
        f"instance {printable(job['instance'])}" if job.get("instance") else "",
        _counts(job),
        f"via {job['last_source']}",
    ]
    print("  ".join(part for part in parts if part), file=out, flush=True)
    if job.get("upstream_error"):
        print(f"  upstream error: {printable(job['upstream_error'])}", file=out, flush=True)


def result_line(result: dict[str, Any]) -> str:
    """A download's result in one line: its status, what it holds, and why (a failed
    attempt, or the reason it was given up)."""
    records, size, detail = result.get("records"), result.get("bytes"), result.get("detail")
    facts = [] if records is None else [f"{records} record{'' if records == 1 else 's'}"]
    facts += [] if size is None else [f"{size:,} bytes"]
    text = f"  result {result['status']}" + (f" ({', '.join(facts)})" if facts else "")
    return text + (f": {printable(detail)}" if detail else "")


def follow_to_end(
    client: ServiceClient, job: dict[str, Any], *, as_json: bool, out: TextIO | None = None
) -> dict[str, Any]:
    """Print each state the job reaches after ``job`` (already printed), once each, and
    return the job as it ended."""
    shown, final = job["state"], job
    updates = client.follow(job["id"])
    # next() inside call: a service lost while following is reported like any other.
    while (update := call(next, updates, None)) is not None:
        if update["state"] != shown:
            print_job(update, as_json=as_json, out=out)
            shown = update["state"]
        final = update
    return final


def _wait(client: ServiceClient, job: dict[str, Any], as_json: bool) -> int:
    final = follow_to_end(client, job, as_json=as_json)
    return 0 if final["state"] == "COMPLETED" else 1


def _submit(args: argparse.Namespace) -> int:
    file = Path(args.file)
    if not file.is_file():
        raise CommandError(f"cannot read {args.file}: no such file", code=2)
    metadata = None
    if args.metadata:
        try:
            metadata = json.loads(args.metadata)
        except json.JSONDecodeError as exc:
            raise CommandError(f"--metadata is not JSON: {exc.msg}", code=2) from None
    from service.cli.progress import upload_progress

    with connect(args) as client, upload_progress(file.stat().st_size) as advance:
        job = call(
            client.submit,
            file,
            object_name=args.object,
            hub=args.hub,
            path=args.path,
            metadata=metadata,
            idempotency_key=args.idempotency_key,
            instance=args.instance,
            progress=advance,
        )
    print_job(job, as_json=args.json)
    if not args.wait:
        return 0
    with connect(args) as client:
        return _wait(client, job, args.json)


def _status(args: argparse.Namespace) -> int:
    check_job_id(args.job)
    with connect(args) as client:
        job = call(client.job, args.job)
        print_job(job, as_json=args.json)
        if not args.json and not args.wait:
            if isinstance(job.get("result"), dict):
                print(result_line(job["result"]))
            for event in job.get("events", []):
                detail = printable(event["detail"])
                print(f"  {event['at']}  {event['source']:<8} {event['state']:<20} {detail}")
        if args.wait:
            return _wait(client, job, args.json)
    return 0


_UNBOUNDED = 10_000
_JOB_COLUMNS = (
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
)
_FAILED = _JOB_COLUMNS.index("failed")


def _job_cells(job: dict[str, Any]) -> list[str]:
    records, failed = job.get("records_count"), job.get("records_failed_count")
    return [
        job["id"],
        job["state"],
        job.get("direction") or "upload",
        job["object"],
        job["hub"],
        printable(job.get("instance") or "-"),
        "-" if records is None else str(records),
        "-" if failed is None else str(failed),
        job["last_source"],
        job["updated_at"],
    ]


def _print_lines(rows: list[list[str]]) -> None:
    """Aligned plain lines, each row's first cell whole: for pipes, and for terminals
    too narrow for the table."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def print_table(columns: Sequence[str], rows: list[list[str]], *, red: int | None = None) -> None:
    """``rows`` under ``columns``: a table on a terminal wide enough for every cell,
    else aligned plain lines. The first column (an id, a name: for copying) is never
    cut; column ``red``, when given, is red where it holds a count above zero."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if console.is_terminal:
        table = Table(*columns)
        # An id is for copying: never cut, folded or wrapped.
        table.columns[0].no_wrap = True
        table.columns[0].min_width = max(len(row[0]) for row in rows)
        for row in rows:
            # Text, not markup: an object or hub name may hold "[".
            cells = [Text(cell) for cell in row]
            if red is not None and row[red] not in ("-", "0"):
                cells[red].stylize("red")
            table.add_row(*cells)
        # The table only when every cell fits whole; a long state or a narrow terminal
        # would otherwise squeeze columns into "…". (Measured unbounded: a measurement
        # within the console's width is clamped to it.)
        natural = console.measure(table, options=console.options.update_width(_UNBOUNDED))
        if natural.maximum <= console.width:
            console.print(table)
            return
    _print_lines([list(columns), *rows])


def _jobs(args: argparse.Namespace) -> int:
    with connect(args) as client:
        page = call(
            client.jobs,
            state=args.state,
            direction=args.direction,
            instance=args.instance,
            limit=args.limit,
        )
    if args.json:
        print(json.dumps(page))
        return 0
    if not page["jobs"]:
        print("no jobs")
        return 0
    print_table(_JOB_COLUMNS, [_job_cells(job) for job in page["jobs"]], red=_FAILED)
    return 0


def printable(value: Any) -> str:
    """Upstream text on one line, without control characters a terminal would obey."""
    text = value if isinstance(value, str) else json.dumps(value)
    return "".join(ch if ch.isprintable() else " " for ch in text)


def _errors_text(answer: dict[str, Any]) -> str:
    """One line per failed record: where it was in the upload and why it failed."""
    count = answer["count"]
    lines = [f"job {answer['job']}: {count} failed record{'' if count == 1 else 's'}"]
    for entry in answer["errors"]:
        if isinstance(entry, dict) and ("lineNumber" in entry or "errorMessage" in entry):
            where = entry.get("lineNumber")
            why = printable(entry.get("errorMessage", ""))
            lines.append(f"  line {printable(where)}: {why}" if where is not None else f"  {why}")
        else:
            lines.append(f"  {printable(entry)}")
    return "\n".join(lines) + "\n"


def written_in_place(target: Path) -> bool:
    """Whether ``target`` is written where it is rather than renamed into place: it
    exists and is not a regular file (a device such as /dev/null, a FIFO), which a
    rename would replace with a regular file. A directory cannot be written at all."""
    try:
        mode = target.stat().st_mode
    except OSError:  # absent, or unreachable: writing says why
        return False
    if stat.S_ISDIR(mode):
        raise CommandError(f"cannot write {target}: it is a directory", code=USAGE)
    return not stat.S_ISREG(mode)


@contextlib.contextmanager
def written(target: Path) -> Iterator[BinaryIO]:
    """A sink for ``target``: a temporary file beside it, renamed over it when the block
    ends without an error, so the target is only ever whole (an earlier one stays until
    then); or the target itself when ``written_in_place``. An ``OSError`` is left to the
    caller, which says what could not be written."""
    if written_in_place(target):
        with target.open("wb") as sink:
            yield sink
        return
    partial = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
    try:
        with partial.open("xb") as sink:
            yield sink
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def _write(output: str | None, produce: Callable[[BinaryIO], object]) -> None:
    """Run ``produce`` into stdout, or into ``output``: a file appears only whole."""
    if output is None:
        produce(sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    try:
        with written(Path(output)) as sink:
            produce(sink)
    except OSError as exc:
        raise CommandError(f"cannot write {output}: {exc.strerror or exc}", code=USAGE) from None


def _errors(args: argparse.Namespace) -> int:
    if args.json and args.csv:
        raise CommandError("--json and --csv: choose one", code=2)
    check_job_id(args.job)
    if args.output:
        written_in_place(Path(args.output))  # a directory is refused before any request
    suffix = Path(args.output).suffix.lower() if args.output else ""
    form = "csv" if args.csv else "json" if args.json else suffix.lstrip(".")
    with connect(args) as client:
        if form == "csv":
            _write(args.output, lambda sink: call(client.failed_csv, args.job, sink))
        else:
            answer = call(client.errors, args.job)
            text = json.dumps(answer) + "\n" if form == "json" else _errors_text(answer)
            _write(args.output, lambda sink: sink.write(text.encode()))
    if args.output:
        print(f"wrote the failed records of job {args.job} to {args.output}", file=sys.stderr)
    return 0


def service_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default=os.environ.get("BULKHOOK_URL", DEFAULT_URL), help="the service's URL"
    )
    parser.add_argument(
        "--token", default=os.environ.get("BULKHOOK_TOKEN"), help="API bearer token"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def add_job_commands(commands: Any) -> None:
    submit = commands.add_parser("submit", help="submit a CSV as a bulk job")
    submit.add_argument("file", help="the CSV file")
    submit.add_argument("--object", required=True, help="the object to load, e.g. contact")
    submit.add_argument(
        "--instance",
        metavar="NAME",
        help="the connector instance to run on (default: the service's default instance)",
    )
    submit.add_argument("--hub", help="the hub (default: the instance's hub)")
    submit.add_argument("--path", help="the upstream's optional path (none sent unless given)")
    submit.add_argument("--metadata", help="JSON object passed upstream as metaData")
    submit.add_argument("--idempotency-key", help="resubmitting with the same key makes no new job")
    submit.add_argument("--wait", action="store_true", help="follow the job until it ends")
    service_options(submit)
    submit.set_defaults(run=lambda args, stdin: _submit(args))

    status = commands.add_parser("status", help="show one job and its timeline")
    status.add_argument("job", help="the job id")
    status.add_argument("--wait", action="store_true", help="follow the job until it ends")
    service_options(status)
    status.set_defaults(run=lambda args, stdin: _status(args))

    jobs = commands.add_parser("jobs", help="list jobs, newest first")
    jobs.add_argument("--state", help="only jobs in this state")
    jobs.add_argument(
        "--direction", choices=("upload", "download"), help="only uploads, or only downloads"
    )
    jobs.add_argument("--instance", metavar="NAME", help="only the jobs of this instance")
    jobs.add_argument("--limit", type=int, default=50)
    service_options(jobs)
    jobs.set_defaults(run=lambda args, stdin: _jobs(args))

    errors = commands.add_parser(
        "errors",
        help="show or save a job's failed records",
        description="The records the upstream failed: one line each (line number and "
        "reason), --json for the API's answer, --csv for every column as the dashboard "
        "downloads it. With -o FILE and neither flag, a .csv or .json name picks the form.",
    )
    errors.add_argument("job", help="the job id")
    errors.add_argument("--csv", action="store_true", help="print CSV, every column")
    errors.add_argument("-o", "--output", metavar="FILE", help="write to FILE, not stdout")
    service_options(errors)
    errors.set_defaults(run=lambda args, stdin: _errors(args))


def report(exc: CommandError, command: str) -> int:
    print(f"bulkhook {command}: {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)
    return exc.code
