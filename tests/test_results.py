"""Results storage: records counted as a result streams past, the file written whole or
not at all, and served with its ETag and byte ranges over real HTTP."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import anyio
import anyio.lowlevel
import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from service.downloads.records import Count, Format, counter_for
from service.downloads.results import ResultFiles, ResultNameError
from service.downloads.serving import result_response
from service.server.thread import ServerThread

from .helpers import split_at

PROPERTIES = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def counted(fmt: Format, pieces: list[bytes]) -> Count:
    counter = counter_for(fmt)
    for piece in pieces:
        counter.feed(piece)
    return counter.finish()


# Counting ---------------------------------------------------------------------------

fields = st.text(alphabet=st.sampled_from(list('ab ,"\n\r\xe9\u20ac\U0001f600')), max_size=8)
rows = st.lists(st.lists(fields, max_size=4), max_size=8)


def csv_bytes(table: list[list[str]], terminator: str, trailing: bool) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=terminator)
    if terminator == "\n":
        # The csv module leaves a field holding a lone CR unquoted when lines end in LF
        # alone (and then reads that CR as a line end); a CR beside an LF is quoted.
        table = [[field.replace("\r", "\r\n") for field in row] for row in table]
    writer.writerows(table)
    text = out.getvalue()
    if not trailing and text.endswith(terminator):
        text = text[: -len(terminator)]
    return text.encode()


def csv_records(data: bytes) -> int:
    """What Python's own CSV reader makes of the same bytes: non-blank rows, less the header."""
    parsed = [row for row in csv.reader(io.StringIO(data.decode(), newline="")) if row]
    return max(len(parsed) - 1, 0)


@PROPERTIES
@given(rows, st.sampled_from(["\r\n", "\n"]), st.booleans(), st.data())
@example([["a", "b"], ["1", "x\r\ny"], [], ["2", 'q"q']], "\r\n", False, [])
@example([["h"], [""]], "\n", True, [])
@example([['a"']], "\n", False, [4])  # '"a"""' cut inside the doubled quote
def test_csv_counts_what_the_csv_module_reads(
    table: list[list[str]], terminator: str, trailing: bool, data: Any
) -> None:
    raw = csv_bytes(table, terminator, trailing)
    cuts = data if isinstance(data, list) else data.draw(st.lists(st.integers(0, len(raw))))
    whole = counted("csv", [raw])
    assert whole == Count(csv_records(raw))
    assert counted("csv", split_at(raw, cuts)) == whole
    # Byte by byte: every CRLF, doubled quote and UTF-8 sequence split.
    assert counted("csv", [raw[i : i + 1] for i in range(len(raw))]) == whole


@pytest.mark.parametrize(
    ("raw", "records"),
    [
        (b"", 0),
        (b"id,name\r\n", 0),
        (b"id,name\r\n1,a\r\n2,b", 2),
        (b"id,name\r\n1,a\r\n\r\n", 1),
        (b"\r\n\nid\n\n1\n\r\n2\n", 2),
        (b'id,note\n1,"a, ""b""\nc"\n', 1),
    ],
)
def test_csv_rules(raw: bytes, records: int) -> None:
    assert counted("csv", [raw]) == Count(records)


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (b'id\n1\n"open', "a quoted field is not closed"),
        (b'id\n1,a"b\n', "a quote inside an unquoted field"),
        (b'id\n"a"b\n', "text follows a closing quote"),
    ],
)
def test_csv_not_well_formed(raw: bytes, detail: str) -> None:
    for step in (1, 2, len(raw)):
        count = counted("csv", [raw[i : i + step] for i in range(0, len(raw), step)])
        assert (count.well_formed, count.detail) == (False, detail)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.sampled_from(list('a"\\[]{},: \n\t\xe9\U0001f600')), max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(alphabet='k["\\,', max_size=3), children, max_size=3)
    ),
    max_leaves=12,
)
layouts = st.sampled_from(
    [{}, {"indent": 2}, {"separators": (",", ":")}, {"indent": "\t", "separators": (" , ", " : ")}]
)


@PROPERTIES
@given(st.lists(json_values, max_size=6), layouts, st.booleans(), st.data())
@example([r"\\", '"]', "[", {"a]": [1, {"b": '\\"}'}]}], {}, False, None)
def test_json_array_counts_its_elements(
    elements: list[Any], layout: dict[str, Any], ascii_only: bool, data: Any
) -> None:
    raw = ("\n " + json.dumps(elements, ensure_ascii=ascii_only, **layout) + " \r\n").encode()
    cuts = [] if data is None else data.draw(st.lists(st.integers(0, len(raw)), max_size=6))
    assert json.loads(raw) == elements
    assert counted("json", [raw]) == Count(len(elements))
    assert counted("json", split_at(raw, cuts)) == Count(len(elements))
    assert counted("json", [raw[i : i + 1] for i in range(len(raw))]) == Count(len(elements))


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (b"", "the result is not a JSON array"),
        (b'{"a": 1}', "the result is not a JSON array"),
        (b"[1, 2", "the JSON array is not closed"),
        (b'[1, "two]', "a JSON string is not closed"),
        (b"[1,, 2]", "an empty element in the JSON array"),
        (b"[1, 2,]", "an empty element in the JSON array"),
        (b"[1] [2]", "text after the JSON array"),
        (b"[1] x", "text after the JSON array"),
        (b"[{]", "brackets do not match"),
        (b"null]", "the result is not a JSON array"),
        (b"Internal error]", "the result is not a JSON array"),
        (b"[1] x]", "text after the JSON array"),
        (b"[" * 20_000 + b"]" * 20_000, "the JSON is nested too deeply"),
    ],
)
def test_json_not_well_formed(raw: bytes, detail: str) -> None:
    for step in (1, 3, max(len(raw), 1)):
        count = counted("json", [raw[i : i + step] for i in range(0, len(raw), step)])
        assert (count.well_formed, count.detail) == (False, detail)


@PROPERTIES
@given(
    st.lists(st.one_of(json_values, st.sampled_from(["", "  ", "\t \r"])), max_size=10),
    st.sampled_from(["\n", "\r\n"]),
    st.booleans(),
    st.data(),
)
@example(["", {"a": "\n"}, "  "], "\r\n", False, None)
def test_jsonl_counts_lines_that_are_not_blank(
    lines: list[Any], newline: str, trailing: bool, data: Any
) -> None:
    text = newline.join(
        line if isinstance(line, str) and not line.strip() else json.dumps(line) for line in lines
    )
    raw = (text + (newline if trailing else "")).encode()
    cuts = [] if data is None else data.draw(st.lists(st.integers(0, len(raw)), max_size=6))
    expected = sum(1 for line in raw.splitlines() if line.strip())
    assert counted("jsonl", [raw]) == Count(expected)
    assert counted("jsonl", split_at(raw, cuts)) == Count(expected)


@PROPERTIES
@given(
    st.sampled_from(["csv", "json", "jsonl"]),
    st.binary(max_size=64)
    | st.lists(st.sampled_from(list(b'ab,"\r\n []{}\\:')), max_size=40).map(bytes),
    st.data(),
)
@example("json", b"null]", [])
@example("csv", b'""a""', [])  # the first problem is reported, in one chunk or many
@example("jsonl", b"a\n\x0b\n", [])  # a vertical tab is not JSON's whitespace
@example("json", b"[\x0c,1]", [])
@example("csv", b'a\n"x""', [4])
@example("csv", b'"a"""', [4])
@example("json", b'["\\\\"]', [3])
def test_any_bytes_count_the_same_however_they_are_split(
    fmt: Format, raw: bytes, data: Any
) -> None:
    """Well-formed or not, any bytes are counted without an error, and where the
    chunks break changes nothing."""
    cuts = data if isinstance(data, list) else data.draw(st.lists(st.integers(0, len(raw))))
    assert counted(fmt, split_at(raw, cuts)) == counted(fmt, [raw])
    assert counted(fmt, [raw[i : i + 1] for i in range(len(raw))]) == counted(fmt, [raw])


# Writing ------------------------------------------------------------------------------

CSV = b'id,name\r\n1,"Doe, Jane"\r\n2,"multi\r\nline"\r\n3,\xc3\xa9\r\n'
JOB = "0190f3a1b2c3deadbeef0102"


async def stream(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
        await anyio.lowlevel.checkpoint()


def names(directory: Path) -> list[str]:
    return sorted(entry.name for entry in directory.iterdir())


@pytest.mark.anyio
@pytest.mark.parametrize("size", [1, 7, 1 << 21])
async def test_write_stores_the_file_its_hash_and_its_records(tmp_path: Path, size: int) -> None:
    results = ResultFiles(tmp_path / "results")
    data = CSV * 50_000  # bigger than a batch, so it is written in several
    stored = await results.write(JOB, "csv", stream(data[:4000] if size == 1 else data, size))
    expected = data[:4000] if size == 1 else data
    assert stored.path == tmp_path / "results" / f"{JOB}.csv"
    assert stored.path.read_bytes() == expected
    assert stored.bytes == len(expected)
    assert stored.sha256 == hashlib.sha256(expected).hexdigest()
    assert stored.records == csv_records(expected)
    assert stored.well_formed
    assert names(tmp_path / "results") == [f"{JOB}.csv"]
    assert results.stored(JOB, "csv") == stored.path
    assert results.stored(JOB, "json") is None


@pytest.mark.anyio
async def test_a_malformed_result_is_stored_and_says_why(tmp_path: Path) -> None:
    stored = await ResultFiles(tmp_path).write(JOB, "json", stream(b'[{"a": 1}, {"b": ', 5))
    assert (stored.records, stored.detail) == (1, "the JSON array is not closed")
    assert stored.path.read_bytes() == b'[{"a": 1}, {"b": '


@pytest.mark.anyio
async def test_the_file_and_directory_are_owner_only(tmp_path: Path) -> None:
    results = ResultFiles(tmp_path / "fresh")
    results.prepare()
    stored = await results.write(JOB, "jsonl", stream(b"{}\n{}\n", 3))
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o700
    assert stored.path.stat().st_mode & 0o777 == 0o600
    assert stored.records == 2


@pytest.mark.anyio
async def test_a_stream_that_fails_leaves_nothing(tmp_path: Path) -> None:
    results = ResultFiles(tmp_path)

    async def failing() -> AsyncIterator[bytes]:
        yield CSV * 100_000  # a batch is on disk before the failure
        yield CSV
        raise httpx.ReadError("connection dropped")

    with pytest.raises(httpx.ReadError):
        await results.write(JOB, "csv", failing())
    assert names(tmp_path) == []
    assert results.stored(JOB, "csv") is None


@pytest.mark.anyio
async def test_a_failed_rewrite_keeps_the_stored_result(tmp_path: Path) -> None:
    results = ResultFiles(tmp_path)
    first = await results.write(JOB, "csv", stream(CSV, 10))

    async def failing() -> AsyncIterator[bytes]:
        yield b"id\n"
        raise OSError("gone")

    with pytest.raises(OSError, match="gone"):
        await results.write(JOB, "csv", failing())
    assert names(tmp_path) == [f"{JOB}.csv"]
    assert first.path.read_bytes() == CSV


@pytest.mark.anyio
async def test_a_cancelled_write_leaves_nothing(tmp_path: Path) -> None:
    results = ResultFiles(tmp_path)
    written = anyio.Event()

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * (1 << 20)
            written.set()
            await anyio.sleep(0.001)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(results.write, JOB, "csv", endless())
        await written.wait()
        await anyio.sleep(0.05)
        assert len(names(tmp_path)) == 1  # the temporary file, under its own name
        tasks.cancel_scope.cancel()
    assert names(tmp_path) == []


def temporary_files(directory: Path) -> set[tuple[int, int]]:
    """The size and modification time (ns) of each temporary file in ``directory``."""
    facts = set()
    for part in directory.glob(".*.part"):
        with contextlib.suppress(FileNotFoundError):
            stat = part.stat()
            facts.add((stat.st_size, stat.st_mtime_ns))
    return facts


@pytest.mark.anyio
async def test_a_slowly_trickling_result_keeps_touching_its_temporary_file(
    tmp_path: Path,
) -> None:
    """However slowly the upstream sends, the write flushes what it has at least every
    ``flush_every`` seconds, so its temporary file never looks abandoned."""
    rows = 12

    async def trickle(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"id,name\n"
            for n in range(rows):
                await anyio.sleep(0.1)
                yield b"%d,x\n" % n

        return StreamingResponse(body(), media_type="text/csv")

    results = ResultFiles(tmp_path, flush_every=0.2)
    seen: set[tuple[int, int]] = set()  # (size, mtime) of the temporary file
    app = Starlette(routes=[Route("/result", trickle)])
    with ServerThread(app).start() as upstream:
        async with (
            httpx.AsyncClient() as client,
            client.stream("GET", upstream.url + "/result") as answer,
        ):

            async def watch() -> None:
                while True:
                    seen.update(temporary_files(tmp_path))
                    await anyio.sleep(0.02)

            async with anyio.create_task_group() as watching:
                watching.start_soon(watch)
                stored = await results.write(JOB, "csv", answer.aiter_bytes())
                watching.cancel_scope.cancel()
    assert stored.records == rows
    sizes = sorted({size for size, _ in seen})
    # It grew while it came (a look between the last flush and the rename may also see
    # it whole).
    assert len([size for size in sizes if size < stored.bytes]) >= 3, sizes
    assert len({mtime for _, mtime in seen}) >= 3


@pytest.mark.parametrize("job_id", ["../etc", "a/b", "", ".hidden", "x" * 65, "a b"])
def test_a_name_that_is_not_a_job_id_is_refused(tmp_path: Path, job_id: str) -> None:
    results = ResultFiles(tmp_path)
    with pytest.raises(ResultNameError):
        results.path(job_id, "csv")
    with pytest.raises(ResultNameError):
        results.path(JOB, "exe")  # type: ignore[arg-type]


KILLED_WRITE = textwrap.dedent(
    """
    import os, sys, anyio
    from pathlib import Path
    from service.downloads.results import ResultFiles

    async def chunks():
        yield b"id\\n1\\n"
        print("written", flush=True)
        await anyio.sleep(60)
        yield b"2\\n"

    anyio.run(ResultFiles(Path(sys.argv[1])).write, sys.argv[2], "csv", chunks())
    """
)


def test_a_killed_write_is_never_served_and_removed_at_start_up(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITE, str(tmp_path), JOB],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "written"
        # The batch is written only when full or at the end: a kill mid-write still
        # leaves the temporary file.
    finally:
        child.kill()
        child.wait()
    results = ResultFiles(tmp_path)
    leftovers = names(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{JOB}.")
    assert results.stored(JOB, "csv") is None
    # A young temporary file may be another replica's write on a shared volume.
    assert results.remove_leftovers() == []
    removed = results.remove_leftovers(older_than=0)
    assert [path.name for path in removed] == leftovers
    assert names(tmp_path) == []


FULL_DISK = textwrap.dedent(
    """
    import errno, resource, sys, anyio
    from pathlib import Path
    from service.downloads.results import ResultFiles

    async def chunks():
        for _ in range(10):
            yield b"x" * (1 << 20)

    # Files may not grow past 3 MiB: the write fails as on a full disk.
    resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, 3 << 20))
    try:
        anyio.run(ResultFiles(Path(sys.argv[1])).write, sys.argv[2], "csv", chunks())
    except OSError as exc:
        print(errno.errorcode[exc.errno])
    """
)


def test_a_full_disk_fails_the_write_and_leaves_nothing(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path), JOB],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == "EFBIG", out.stderr
    assert names(tmp_path) == []


def test_removing_a_result(tmp_path: Path) -> None:
    results = ResultFiles(tmp_path)
    stored = anyio.run(results.write, JOB, "csv", stream(CSV, 100))
    assert results.remove(JOB, "csv") is True
    assert not stored.path.exists()
    assert results.remove(JOB, "csv") is False


LARGE_WRITE = textwrap.dedent(
    """
    import sys, anyio
    from pathlib import Path
    from service.downloads.results import ResultFiles

    ROW = b'123456,"Doe, Jane",jane@example.com,"a ""quoted"" note"\\r\\n'
    TOTAL = int(sys.argv[2])

    async def chunks():
        sent = 0
        piece = ROW * 1000
        while sent < TOTAL:
            yield piece[:65536]
            yield piece[65536:]
            sent += len(piece)

    def peak_kib():
        # VmHWM starts afresh with the program (ru_maxrss would carry the parent's).
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0])

    async def main():
        before = peak_kib()
        stored = await ResultFiles(Path(sys.argv[1])).write("big", "csv", chunks())
        after = peak_kib()
        print(len(ROW), stored.bytes, stored.records, before, after)

    anyio.run(main)
    """
)


def test_a_large_result_is_written_in_constant_memory(tmp_path: Path) -> None:
    total = 200 << 20
    out = subprocess.run(
        [sys.executable, "-c", LARGE_WRITE, str(tmp_path), str(total)],
        capture_output=True,
        text=True,
        check=True,
        timeout=110,
    ).stdout.split()
    row, size, records, before_kib, after_kib = (int(value) for value in out)
    assert size >= total
    assert records == size // row - 1  # the first row is the header
    assert (tmp_path / "big.csv").stat().st_size == size
    # The whole result is 200 MB; the writer holds a batch or two of it.
    assert after_kib < 100 * 1024, f"peak RSS {after_kib} KiB (before the write: {before_kib})"


# Serving ------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, bytes, str]]:
    """A result of each format under a real server: its URL prefix, CSV bytes and hash."""
    results = ResultFiles(tmp_path)
    data = CSV * 10
    digests: dict[str, str] = {}
    bodies: list[tuple[Format, bytes]] = [
        ("csv", data),
        ("json", b'[{"a": 1}]'),
        ("jsonl", b'{"a": 1}\n'),
    ]
    for fmt, body in bodies:
        stored = anyio.run(results.write, JOB, fmt, stream(body, 1000))
        digests[fmt] = stored.sha256

    async def result(request: Request) -> Response:
        fmt = request.path_params["fmt"]
        path = results.path(request.path_params["job"], fmt)
        return result_response(path, fmt, digests.get(fmt, ""), request.headers)

    app = Starlette(routes=[Route("/{job}/{fmt}", result, methods=["GET", "HEAD"])])
    with ServerThread(app).start() as server:
        yield server.url, data, digests["csv"]


def test_serving_the_whole_result(served: tuple[str, bytes, str]) -> None:
    url, data, sha = served
    response = httpx.get(f"{url}/{JOB}/csv")
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-length"] == str(len(data))
    assert response.headers["etag"] == f'"{sha}"'
    assert response.headers["accept-ranges"] == "bytes"
    assert f'filename="{JOB}.csv"' in response.headers["content-disposition"]
    head = httpx.head(f"{url}/{JOB}/csv")
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == str(len(data))
    json_type = httpx.get(f"{url}/{JOB}/json").headers["content-type"]
    jsonl_type = httpx.get(f"{url}/{JOB}/jsonl").headers["content-type"]
    assert (json_type, jsonl_type) == ("application/json", "application/x-ndjson")


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-9", 0, 10),
        ("bytes=10-", 10, None),
        ("bytes=-7", -7, None),
        ("bytes=5-99999", 5, None),
        ("bytes=-99999", 0, None),  # a suffix longer than the file is all of it
    ],
)
def test_serving_one_byte_range(
    served: tuple[str, bytes, str], header: str, start: int, end: int | None
) -> None:
    url, data, sha = served
    response = httpx.get(f"{url}/{JOB}/csv", headers={"Range": header})
    part = data[start:end]
    first = start % len(data)
    assert response.status_code == 206
    assert response.content == part
    assert response.headers["content-length"] == str(len(part))
    assert response.headers["content-range"] == f"bytes {first}-{first + len(part) - 1}/{len(data)}"
    assert response.headers["etag"] == f'"{sha}"'


def test_a_range_past_the_end_is_unsatisfiable(served: tuple[str, bytes, str]) -> None:
    url, data, _ = served
    response = httpx.get(f"{url}/{JOB}/csv", headers={"Range": f"bytes={len(data)}-"})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{len(data)}"


@pytest.mark.parametrize(
    "header",
    [
        "bytes=9-3",
        "bytes=a-b",
        "pages=1-2",
        "bytes=0-1,5-6",
        "bytes=0-" + "9" * 4400,  # past int()'s limit on digits
        "bytes=" + "9" * 4400 + "-",
        "bytes=-" + "9" * 4400,
        "bytes=0-" + "9" * 20,
    ],
)
def test_a_range_that_is_not_one_valid_range_gets_the_whole_file(
    served: tuple[str, bytes, str], header: str
) -> None:
    url, data, _ = served
    response = httpx.get(f"{url}/{JOB}/csv", headers={"Range": header})
    assert (response.status_code, response.content) == (200, data)


def test_if_none_match_and_if_range(served: tuple[str, bytes, str]) -> None:
    url, data, sha = served
    for tag in (f'"{sha}"', f'W/"{sha}"', f'"other", "{sha}"', "*"):
        response = httpx.get(f"{url}/{JOB}/csv", headers={"If-None-Match": tag})
        assert (response.status_code, response.content) == (304, b"")
        assert response.headers["etag"] == f'"{sha}"'
        # What a 200 would have said of caching, a 304 says too.
        assert response.headers["cache-control"] == "private, no-cache"
    changed = httpx.get(f"{url}/{JOB}/csv", headers={"If-None-Match": '"other"'})
    assert (changed.status_code, changed.content) == (200, data)
    same = httpx.get(f"{url}/{JOB}/csv", headers={"Range": "bytes=0-3", "If-Range": f'"{sha}"'})
    assert (same.status_code, same.content) == (206, data[:4])
    other = httpx.get(f"{url}/{JOB}/csv", headers={"Range": "bytes=0-3", "If-Range": '"other"'})
    assert (other.status_code, other.content) == (200, data)
    # A date is a weak validator: only the ETag keeps the range.
    modified = changed.headers["last-modified"]
    dated = httpx.get(f"{url}/{JOB}/csv", headers={"Range": "bytes=0-3", "If-Range": modified})
    assert (dated.status_code, dated.content) == (200, data)


def test_the_range_unit_is_read_whatever_its_case(served: tuple[str, bytes, str]) -> None:
    url, data, _ = served
    response = httpx.get(f"{url}/{JOB}/csv", headers={"Range": "Bytes=1-2"})
    assert (response.status_code, response.content) == (206, data[1:3])
    assert response.headers["content-range"] == f"bytes 1-2/{len(data)}"


def test_a_result_gone_from_disk_is_not_found_even_to_a_matching_etag(
    tmp_path: Path,
) -> None:
    from service.errors import ApiError

    with pytest.raises(ApiError) as raised:
        result_response(tmp_path / "gone.csv", "csv", "0" * 64, {"if-none-match": "*"})
    assert (raised.value.status, raised.value.code) == (404, "result_not_found")


@pytest.mark.parametrize(
    ("name", "plain"),
    [
        ('Kontakt "Bühne"; 1.csv', "Kontakt__B_hne___1.csv"),
        ("contact list-01.csv", "contact_list-01.csv"),
    ],
)
def test_a_name_with_spaces_quotes_or_any_letter_has_a_plain_fallback(
    tmp_path: Path, name: str, plain: str
) -> None:
    path = tmp_path / "result.csv"
    path.write_bytes(b"id\n1\n")
    response = result_response(path, "csv", "0" * 64, {}, filename=name)
    given = response.headers["content-disposition"]
    assert given.startswith(f"attachment; filename=\"{plain}\"; filename*=utf-8''")
    assert unquote(given.split("filename*=utf-8''", 1)[1]) == name


def test_a_result_not_stored_is_not_found(tmp_path: Path) -> None:
    from service.errors import ApiError

    with pytest.raises(ApiError) as raised:
        result_response(tmp_path / "missing.csv", "csv", "0" * 64, {})
    assert (raised.value.status, raised.value.code) == (404, "result_not_found")
    assert os.listdir(tmp_path) == []
