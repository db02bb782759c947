"""``bulkhook export``: start a download job and, with ``--wait``, save its result.

With ``--wait`` the command follows the job to its end, then the service's fetch of
the result to ``stored``, then downloads ``GET /jobs/{id}/result``. The file is written
under a temporary name beside the target and renamed only when whole and its SHA-256
matches the one the service recorded, so the target is never a partial or corrupted
file. With ``-o -`` the bytes go to stdout as they arrive and every other line to
stderr.

A target that exists and is not a regular file (``/dev/null``, a FIFO) is written in
place instead: renaming over it would replace it with a regular file.

Exit codes: 0 the job was accepted (without ``--wait``) or its result is stored and
written; 1 the job or its result failed, the bytes do not match, or the service
refused or could not be reached; 2 usage errors, and a target that cannot be written,
found before any job is started.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from service.cli.api_client import ServiceClient
from service.cli.remote import (
    CommandError,
    call,
    connect,
    follow_to_end,
    print_job,
    printable,
    result_line,
    service_options,
    written,
    written_in_place,
)

__all__ = ["add_export_command"]

FORMATS = ("csv", "json", "jsonl")
USAGE = 2
# How often the result's status is asked for while the service fetches it.
RESULT_POLL = 0.5
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def add_export_command(commands: Any) -> None:
    export = commands.add_parser(
        "export",
        help="export an object's records (a download job)",
        description="Start a bulk query of OBJECT's records. With --wait, follow the job, "
        "then download its result to FILE (-o; default OBJECT-JOB.FORMAT here; - for "
        "stdout), checked against the SHA-256 the service recorded. Exit 0 only when "
        "the result is stored and written.",
    )
    export.add_argument("object", help="the object to export, e.g. contact")
    which = export.add_mutually_exclusive_group()
    which.add_argument(
        "--where", metavar="W", help="only the records matching W: select * from OBJECT where W"
    )
    which.add_argument("--query", metavar="Q", help="the whole CEQL query to run")
    export.add_argument("--format", choices=FORMATS, default="csv", help="the result's format")
    export.add_argument(
        "--instance",
        metavar="NAME",
        help="the connector instance to query (default: the service's default instance)",
    )
    export.add_argument("--hub", help="the hub (default: the instance's hub)")
    export.add_argument(
        "-o", "--output", metavar="FILE", help="where to write the result (with --wait)"
    )
    export.add_argument(
        "--wait", action="store_true", help="follow the job and download its result"
    )
    service_options(export)
    export.set_defaults(run=lambda args, stdin: _export(args))


def _query(args: argparse.Namespace) -> str | None:
    """The query to send; None: the service's default, every record of the object."""
    for flag, value in (("--where", args.where), ("--query", args.query)):
        if value is not None and not value.strip():
            raise CommandError(f"{flag} is empty", code=USAGE)
    if args.where is not None:
        return f"select * from {args.object} where {args.where}"
    return str(args.query) if args.query is not None else None


def _writable(target: Path | None) -> None:
    """Refuse a target that cannot be written before any job is started (None: the
    default name, in the current directory)."""
    shown = target or "the result"
    if target is not None and written_in_place(target):
        if not os.access(target, os.W_OK):
            raise CommandError(f"cannot write {target}: it is not writable", code=USAGE)
        return
    folder = Path.cwd() if target is None else target.parent
    if not folder.is_dir():
        raise CommandError(f"cannot write {shown}: no directory {folder}", code=USAGE)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CommandError(f"cannot write {shown}: {folder} is not writable", code=USAGE)


def _default_name(job: dict[str, Any]) -> str:
    """``<object>-<job id>.<format>``, with anything a file name should not hold in the
    object's name (a separator, a leading dot) replaced."""
    stem = _UNSAFE.sub("_", str(job["object"])).lstrip(".") or "result"
    return f"{stem}-{job['id']}.{job.get('format') or 'csv'}"


def _export(args: argparse.Namespace) -> int:
    if args.output is not None and not args.wait:
        raise CommandError("-o needs --wait: the file is written once the job ends", code=USAGE)
    if args.output == "":
        raise CommandError("-o is empty: name a file, or - for stdout", code=USAGE)
    if args.output is not None and args.output.endswith(("/", os.sep)):
        # Path() drops the slash: "sub/" would become a file named sub.
        raise CommandError(f"cannot write {args.output}: it names a directory", code=USAGE)
    query = _query(args)
    to_stdout = args.output == "-"
    if args.wait and not to_stdout:
        _writable(Path(args.output) if args.output else None)
    # With -o - stdout carries the result: everything else goes to stderr.
    info = sys.stderr if to_stdout else sys.stdout
    with connect(args) as client:
        job = call(
            client.export,
            object_name=args.object,
            query=query,
            hub=args.hub,
            result_format=args.format,
            instance=args.instance,
        )
        print_job(job, as_json=args.json, out=info)
        if not args.wait:
            return 0
        job = follow_to_end(client, job, as_json=args.json, out=info)
        if job["state"] != "COMPLETED":
            error = job.get("upstream_error")
            why = f": {printable(error)}" if error else ""
            raise CommandError(f"job {job['id']} ended {job['state']}{why}; nothing to download")
        job = _until_stored(client, job, as_json=args.json, out=info)
        result = job["result"]
        if to_stdout:
            _to_stdout(client, job["id"], result)
            where = "stdout"
        else:
            target = Path(args.output) if args.output else Path(_default_name(job))
            _to_file(client, job["id"], result, target)
            where = str(target)
    records = result.get("records")
    counted = "" if records is None else f"{records} record{'' if records == 1 else 's'}, "
    done = f"wrote {counted}{result['bytes']:,} bytes to {where}"
    print(done, file=sys.stderr if args.json else info, flush=True)
    return 0


def _until_stored(
    client: ServiceClient, job: dict[str, Any], *, as_json: bool, out: TextIO
) -> dict[str, Any]:
    """Wait for the service to have fetched the job's result; say how it goes (each
    status and reason once); a result given up on is a failure."""
    shown: tuple[str, str | None] | None = None
    while True:
        result = job.get("result")
        if not isinstance(result, dict):
            raise CommandError(f"job {job['id']} has no result: it is not a download")
        status, detail = result["status"], result.get("detail")
        if (status, detail) != shown:
            shown = (status, detail)
            if as_json:
                print(json.dumps(job), file=out, flush=True)
            else:
                print(result_line(result), file=out, flush=True)
        if status == "stored":
            return job
        if status == "failed":
            why = printable(detail or "no reason given")
            raise CommandError(f"the result of job {job['id']} could not be fetched: {why}")
        time.sleep(RESULT_POLL)
        job = call(client.job, job["id"])


def _download(client: ServiceClient, job_id: str, result: dict[str, Any], sink: BinaryIO) -> str:
    """Stream the stored result into ``sink`` with a progress bar; its SHA-256."""
    from service.cli.progress import download_progress

    digest = hashlib.sha256()
    with download_progress(result.get("bytes")) as advance:

        def write(chunk: bytes) -> None:
            sink.write(chunk)
            digest.update(chunk)
            advance(len(chunk))

        call(client.result, job_id, write)
    return digest.hexdigest()


def _mismatch(got: str, result: dict[str, Any]) -> str:
    return f"the bytes downloaded have SHA-256 {got}, not the result's {result['sha256']}"


def _to_stdout(client: ServiceClient, job_id: str, result: dict[str, Any]) -> None:
    got = _download(client, job_id, result, sys.stdout.buffer)
    sys.stdout.buffer.flush()
    if got != result["sha256"]:
        # Already written: the exit status is what tells the reader not to trust them.
        raise CommandError(_mismatch(got, result) + "; do not use what was written")


def _to_file(client: ServiceClient, job_id: str, result: dict[str, Any], target: Path) -> None:
    """Download beside ``target`` under a temporary name, then rename: the target is
    only ever the whole, checked file (an earlier one stays until then). A target that
    is not a regular file (a device, a FIFO) is written in place, as the shell's ``>``
    would: a rename would replace it with a regular file."""
    outcome = "do not use what was written" if written_in_place(target) else f"{target} not written"
    try:
        with written(target) as sink:
            got = _download(client, job_id, result, sink)
            if got != result["sha256"]:
                raise CommandError(f"{_mismatch(got, result)}; {outcome}")
    except OSError as exc:
        raise CommandError(f"cannot write {target}: {exc.strerror or exc}") from None
