"""Uploads: CsvInspector's incremental checks, and receive_upload over real HTTP."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import itertools
import json
import random
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import patch

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import uploads
from service.errors import ApiError, error_body
from service.servers import ServerThread
from service.uploads import CsvInspector, CsvSummary, ReceivedUpload, receive_upload

# -- CsvInspector ----------------------------------------------------------------------

Outcome = CsvSummary | tuple[str, str]  # a summary, or an error's (code, message)


def inspect(chunks: list[bytes], **options: int) -> CsvSummary:
    inspector = CsvInspector(**options)
    for chunk in chunks:
        inspector.feed(chunk)
    return inspector.finish()


def outcome(chunks: list[bytes], **options: int) -> Outcome:
    try:
        return inspect(chunks, **options)
    except ApiError as exc:
        assert exc.status == 400
        return exc.code, exc.message


def split_every(data: bytes, size: int) -> list[bytes]:
    return [data[start : start + size] for start in range(0, len(data), size)]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *sorted(cuts), len(data)]
    return [data[start:end] for start, end in itertools.pairwise(edges)]


def chunkings(data: bytes) -> Iterator[list[bytes]]:
    """Whole, byte by byte, a few fixed sizes, and random cuts."""
    yield [data]
    for size in (1, 2, 3, 7, 64):
        yield split_every(data, size)
    rng = random.Random(data)
    for _ in range(5):
        yield split_at(data, [rng.randrange(len(data) + 1) for _ in range(rng.randrange(8))])


@pytest.mark.parametrize(
    ("data", "columns", "rows"),
    [
        pytest.param(b"Email,Name\na@b.co,A\nc@d.co,C\n", ("Email", "Name"), 2, id="simple"),
        pytest.param(b"Email,Name\r\na@b.co,A\r\nc@d.co,C\r\n", ("Email", "Name"), 2, id="crlf"),
        pytest.param(b"\xef\xbb\xbfEmail,Name\na@b.co,A\n", ("Email", "Name"), 1, id="bom"),
        pytest.param(
            b'Email,Note\na@b.co,"two\nlines"\nc@d.co,"say ""hi"""\n"e@f.co","x\r\n\r\ny"\n',
            ("Email", "Note"),
            3,
            id="quoted-newlines-and-escapes",
        ),
        pytest.param(b'"Quoted, ""header""",B\n1,2\n', ('Quoted, "header"', "B"), 1, id="q-head"),
        pytest.param(b'"multi\nline",B\r\n1,2\r\n', ("multi\nline", "B"), 1, id="ml-header"),
        pytest.param(b"Email\na@b.co", ("Email",), 1, id="no-trailing-newline"),
        pytest.param(b"Email\r\na@b.co\r", ("Email",), 1, id="no-trailing-lf-after-cr"),
        pytest.param(b"Email\n\na@b.co\n\r\n\r\r\n\nc@d.co\n\n", ("Email",), 2, id="blank-lines"),
        pytest.param(b'Email\n""\n', ("Email",), 1, id="empty-quoted-field-is-a-record"),
        pytest.param(b"Email\n \n", ("Email",), 1, id="a-space-is-content"),
        pytest.param(b"a,,a,\n1,2,3,4\n", ("a", "", "a", ""), 1, id="dup-and-empty-names"),
        pytest.param("Émail,Nåme\nü@x.de,Jürgen\n".encode(), ("Émail", "Nåme"), 1, id="utf8"),
        pytest.param(b'Email\n"never closed\nx\n', ("Email",), 1, id="unclosed-quote"),
    ],
)
def test_summaries_do_not_depend_on_chunking(
    data: bytes, columns: tuple[str, ...], rows: int
) -> None:
    for chunks in chunkings(data):
        assert outcome(chunks) == CsvSummary(columns, rows, len(data)), chunks


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_file"),
        (b"\n\n\n", "no_header"),
        (b"\r\n", "no_header"),
        (b"\nEmail\na@b.co\n", "no_header"),
        (b",,\n1,2\n", "no_header"),
        (b' ,""\n1,2\n', "no_header"),
        (b"\xef\xbb\xbf\n1\n", "no_header"),
        (b"Email,Name", "no_rows"),
        (b"Email,Name\n", "no_rows"),
        (b"Email,Name\r\n\r\n\n\r\n", "no_rows"),
        (b"Email\x00,Name\n1,2\n", "binary_file"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary_file"),
        (b"\xff\xfeE\x00m\x00", "binary_file"),  # UTF-16: bad UTF-8, NUL bytes too
        (b"Email,Name\n\xc3\x28,x\n", "not_utf8"),
        (b"Email,Name\nann,Ren\xe9e\n", "not_utf8"),
        (b"Email,Name\na@b.co,\xe2\x82", "not_utf8"),
        (b"Email,Name\n\xed\xa0\x80\n", "not_utf8"),  # an encoded surrogate
    ],
)
def test_every_problem_has_a_stable_code_whatever_the_chunking(data: bytes, code: str) -> None:
    first = outcome([data])
    assert isinstance(first, tuple)
    assert first[0] == code
    for chunks in chunkings(data):
        assert outcome(chunks) == first, chunks


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        (b"Email\n\xff\n", 6),
        (b"Email\n\xc3\xa9\xc3(\n", 8),
        (b"Email\na\xe2\x82", 7),  # ends mid-character
    ],
)
def test_not_utf8_says_at_which_byte(data: bytes, offset: int) -> None:
    for chunks in chunkings(data):
        assert outcome(chunks) == ("not_utf8", uploads._not_utf8(offset).message)


def test_bad_utf8_near_a_nul_byte_is_binary() -> None:
    probe = uploads._BINARY_PROBE
    for data in (
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        b"\xff\xfeE\x00m\x00a\x00i\x00l\x00",  # UTF-16
        b"Email\n\xe2\x00\n",  # a NUL where a continuation byte belongs
        b"Email\n\xff" + b"x" * (probe - 1) + b"\x00",
    ):
        for chunks in chunkings(data):
            assert outcome(chunks)[0] == "binary_file", chunks
    far = b"Email\n\xff" + b"x" * probe + b"\x00"
    for chunks in chunkings(far):
        assert outcome(chunks) == ("not_utf8", uploads._not_utf8(6).message)


def test_bad_utf8_is_refused_without_reading_to_the_end() -> None:
    inspector = CsvInspector()
    inspector.feed(b"Email\n\xff")
    inspector.feed(b"x" * (uploads._BINARY_PROBE - 1))
    with pytest.raises(ApiError) as caught:
        inspector.feed(b"x")
    assert caught.value.code == "not_utf8"


def test_a_multibyte_character_split_anywhere_is_fine() -> None:
    data = "Name,Note\nJürgen,€ and 😀\n".encode()
    for cut in range(len(data) + 1):
        assert inspect([data[:cut], data[cut:]]) == CsvSummary(("Name", "Note"), 1, len(data))


def test_the_header_may_be_1_mib_but_not_more() -> None:
    limit = uploads.MAX_HEADER_BYTES
    names = [b'"a\nb"', *(b"c%07d" % i for i in range(limit // 9 - 2))]
    joined = b",".join(names)
    header = joined + b"," + b"d" * (limit - len(joined) - 2) + b"\r"
    assert len(header) == limit  # with its quoted line break and its "\r"
    columns = inspect(split_every(header + b"\n1\n", 65536)).columns
    assert (len(columns), columns[0], columns[1]) == (len(names) + 1, "a\nb", "c0000000")
    for chunks in ([b"x" + header + b"\n1\n"], split_every(b"x" * (limit + 1), 65536)):
        code, message = outcome(chunks)
        assert code == "no_header"
        assert "longer than" in message


def test_an_overlong_header_is_refused_as_soon_as_it_passes_the_limit() -> None:
    inspector = CsvInspector(max_header_bytes=10)
    inspector.feed(b"0123456789")
    with pytest.raises(ApiError) as caught:
        inspector.feed(b"A")
    assert caught.value.code == "no_header"


def test_huge_column_counts_and_long_lines() -> None:
    header = ",".join(f"c{i}" for i in range(50_000))
    long_row = '"' + "z\n" * 400_000 + '"'
    data = f"{header}\n{'v,' * 49_999}v\n{long_row}\n{'y' * 3_000_000}\n".encode()
    for chunks in ([data], split_every(data, 65536), split_every(data, 1_000_003)):
        summary = inspect(chunks)
        assert (len(summary.columns), summary.rows, summary.size) == (50_000, 3, len(data))


def test_large_chunks_are_scanned_in_windows_with_the_same_result() -> None:
    rng = random.Random(7)
    lines = [b"Email,Note\r\n"]
    for i in range(20_000):
        note = rng.choice([b"plain", b'"quoted, with ""escapes"""', b'"multi\r\nline"', b""])
        lines.append(b"p%d@example.com,%s\r\n" % (i, note) + rng.choice([b"", b"\r\n", b"\n"]))
    data = b"".join(lines)
    expected = inspect(split_every(data, 4096))
    assert expected.rows == 20_000
    for window in (7, 1000, 65536):
        with patch.object(uploads, "_WINDOW", window):
            assert inspect([data]) == expected


def test_a_bytearray_or_memoryview_is_fine() -> None:
    data = b"Email\na@b.co\n"
    assert inspect([bytearray(data)]) == inspect([memoryview(data)]) == inspect([data])


# Property: for whatever rows the csv module writes, however the bytes are chunked,
# the inspector agrees with the csv module on the header and the non-blank records.

cells = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00\ufeff"),
    max_size=6,
)
tables = st.lists(st.lists(cells, max_size=4), min_size=1, max_size=12)


@given(
    table=tables,
    terminator=st.sampled_from(["\n", "\r\n"]),
    quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]),
    bom=st.booleans(),
    data=st.data(),
)
def test_the_csv_module_and_the_inspector_agree(
    table: list[list[str]], terminator: str, quoting: int, bom: bool, data: st.DataObject
) -> None:
    if terminator == "\n" and quoting == csv.QUOTE_MINIMAL:
        # The csv module leaves a lone "\r" unquoted then, which it cannot read back.
        table = [[cell.replace("\r", "") for cell in row] for row in table]
    out = io.StringIO()
    csv.writer(out, lineterminator=terminator, quoting=quoting).writerows(table)
    text = out.getvalue()
    raw = ("\ufeff" if bom else "").encode() + text.encode()
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=8), label="cuts")
    records = list(csv.reader(io.StringIO(text, newline="")))
    got = outcome(split_at(raw, cuts))
    if not any(name.strip() for name in records[0]):
        assert got[0] == "no_header"
    elif not [record for record in records[1:] if record]:
        assert got[0] == "no_rows"
    else:
        rows = sum(1 for record in records[1:] if record)
        assert got == CsvSummary(tuple(records[0]), rows, len(raw))


# Property: on arbitrary bytes, whatever the chunking (and the window size), the outcome
# is that of a slow byte-by-byte model of the rules.

GOOD = [b"a", b"B", b",", b",", b'"', b'"', b"\n", b"\n", b"\r", b" ", b"\xc3\xa9", b"\xe2\x82\xac"]
BAD = [b"\x00", b"\xff", b"\xc3", b"\xe2\x82", b"\xef\xbb\xbf"]


def model(data: bytes, max_header: int, probe: int) -> tuple[str, int | None] | CsvSummary:
    """The rules, one byte at a time: (code, offset of the problem) or the summary.

    Problems are ranked by the offset at which they are certain: a NUL byte or an
    overlong header where they are; invalid UTF-8 ``probe`` bytes later, or at the end.
    """
    problems: list[tuple[int, str]] = []
    if (nul := data.find(b"\x00")) >= 0:
        problems.append((nul, "binary_file"))
    bad_utf8 = None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_utf8 = exc.start
        if exc.start + probe < len(data):
            problems.append((exc.start + probe, "not_utf8"))
    records: list[bytes] = []
    line = bytearray()
    quoted = False
    for byte in data:
        quoted ^= byte == ord('"')
        if byte == ord("\n") and not quoted:
            records.append(bytes(line))
            line.clear()
        else:
            line.append(byte)
    if line:
        records.append(bytes(line))
    header = records[0] if records else b""
    if len(header) > max_header:
        problems.append((max_header, "no_header"))
    if problems:
        _, code = min(problems, key=lambda problem: problem[0])
        return code, bad_utf8 if code == "not_utf8" else None
    if not data:
        return "empty_file", None
    if bad_utf8 is not None:
        return "not_utf8", bad_utf8
    try:
        text = header.removeprefix(b"\xef\xbb\xbf").decode().rstrip("\r")
        columns = next(csv.reader(io.StringIO(text)), [])
    except csv.Error:
        return "no_header", None
    if not any(name.strip() for name in columns):
        return "no_header", None
    rows = sum(1 for record in records if record.strip(b"\r")) - 1
    if rows < 1:
        return "no_rows", None
    return CsvSummary(tuple(columns), rows, len(data))


@settings(max_examples=300)
@given(
    tokens=st.lists(st.sampled_from(GOOD * 6 + BAD), max_size=60),
    max_header=st.integers(1, 40),
    probe=st.integers(3, 12),  # at least 3, as in uploads._BINARY_PROBE's comment
    window=st.integers(1, 9),
    data=st.data(),
)
def test_any_bytes_get_the_outcome_of_the_model_whatever_the_chunking(
    tokens: list[bytes], max_header: int, probe: int, window: int, data: st.DataObject
) -> None:
    raw = b"".join(tokens)
    expected = model(raw, max_header, probe)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=10), label="cuts")
    with patch.object(uploads, "_BINARY_PROBE", probe):
        whole = outcome([raw], max_header_bytes=max_header)
        assert outcome(split_at(raw, cuts), max_header_bytes=max_header) == whole
        with patch.object(uploads, "_WINDOW", window):
            assert outcome([raw], max_header_bytes=max_header) == whole
    if isinstance(expected, CsvSummary):
        assert whole == expected
    else:
        code, offset = expected
        assert isinstance(whole, tuple)
        assert whole[0] == code
        if offset is not None:
            assert whole[1] == uploads._not_utf8(offset).message


# -- receive_upload over HTTP ----------------------------------------------------------

BOUNDARY = "t3st-b0undary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
GOOD_CSV = b"Email,Name\r\nann@example.com,Ann\r\nbob@example.com,Bob\r\n"


def part(name: str, body: bytes, *, filename: str | None = None, extra: str = "") -> bytes:
    disposition = f'form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    return f"Content-Disposition: {disposition}\r\n{extra}\r\n".encode() + body


def form(*parts: bytes, boundary: str = BOUNDARY) -> bytes:
    body = b"".join(f"--{boundary}\r\n".encode() + each + b"\r\n" for each in parts)
    return body + f"--{boundary}--\r\n".encode()


@dataclass
class UploadServer:
    http: httpx.Client
    server: ServerThread
    spool: Path  # the temporary directory receive_upload writes to

    def post(
        self, body: bytes | Iterator[bytes], *, max_bytes: int = 1 << 20, **headers: str
    ) -> httpx.Response:
        headers.setdefault("content-type", MULTIPART)
        return self.http.post(
            "/upload", params={"max_bytes": max_bytes}, content=body, headers=headers
        )

    def refused(self, response: httpx.Response, status: int, code: str) -> None:
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code
        assert list(self.spool.iterdir()) == []


async def _upload_endpoint(request: Request) -> Response:
    spool: Path = request.app.state.spool
    try:
        upload = await receive_upload(
            request, max_bytes=int(request.query_params["max_bytes"]), directory=spool
        )
    except ApiError as exc:
        return JSONResponse(error_body(exc.code, exc.message), status_code=exc.status)
    try:
        content = upload.path.read_bytes()
        digest = hashlib.sha256(content).hexdigest()
        return JSONResponse(
            {
                "columns": list(upload.summary.columns),
                "rows": upload.summary.rows,
                "size": upload.summary.size,
                "fields": upload.fields,
                "filename": upload.filename,
                "length": len(content),
                "same": digest == request.headers.get("x-expected-sha256"),
                "in_spool": upload.path.parent == spool,
            }
        )
    finally:
        upload.path.unlink()


@pytest.fixture
def uploads_server(tmp_path: Path) -> Iterator[UploadServer]:
    app = Starlette(routes=[Route("/upload", _upload_endpoint, methods=["POST"])])
    app.state.spool = tmp_path
    with (
        ServerThread(app) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        yield UploadServer(http, server, tmp_path)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_good_upload_arrives_whole_with_its_fields(uploads_server: UploadServer) -> None:
    fields = {
        "object": "contact",
        "hub": "marketing",
        "path": "/imports/people.csv",
        "metadata": json.dumps({"action": "upsert", "identifierFieldName": "Email"}),
        "note": "Grüße ✓",
    }
    response = uploads_server.http.post(
        "/upload",
        params={"max_bytes": 4096},
        data=fields,
        files={"file": ("people.csv", GOOD_CSV, "text/csv")},
        headers={"x-expected-sha256": sha256(GOOD_CSV)},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "columns": ["Email", "Name"],
        "rows": 2,
        "size": len(GOOD_CSV),
        "fields": fields,
        "filename": "people.csv",
        "length": len(GOOD_CSV),
        "same": True,
        "in_spool": True,
    }
    assert list(uploads_server.spool.iterdir()) == []


def big_csv(rows: int) -> bytes:
    rng = random.Random(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["Email", "Name", "Note"])
    for i in range(rows):
        note = rng.choice(["", "plain", "with, comma", 'say "hi"', "two\nlines", "Jürgen €"])
        writer.writerow([f"p{i}@example.com", f"Person {i}", note])
    return out.getvalue().encode()


def test_a_large_chunked_upload_streams_to_disk_intact(uploads_server: UploadServer) -> None:
    content = big_csv(120_000)  # ~5 MiB: several write batches
    body = form(part("object", b"contact"), part("file", content, filename="big.csv"))

    def chunks() -> Iterator[bytes]:  # odd sizes, and no Content-Length
        rng = random.Random(1)
        start = 0
        while start < len(body):
            size = rng.randrange(1, 200_000)
            yield body[start : start + size]
            start += size

    expect = {"x-expected-sha256": sha256(content)}
    response = uploads_server.post(chunks(), max_bytes=len(body), **expect)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["rows"] == 120_000
    assert result["size"] == result["length"] == len(content)
    assert result["same"] is True
    assert result["fields"] == {"object": "contact"}


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("people.csv", "people.csv"),
        ("../../etc/passwd.csv", "passwd.csv"),
        ("C:\\Users\\ann\\Desktop\\d.csv", "d.csv"),
        ("a\x07b\x1b.csv", "ab.csv"),
        ("Grüße.csv", "Grüße.csv"),
        ("..", "upload.csv"),
        ("  ", "upload.csv"),
        ("", "upload.csv"),
        (None, "upload.csv"),
    ],
)
def test_the_filename_is_a_sanitised_basename(
    uploads_server: UploadServer, filename: str | None, expected: str
) -> None:
    response = uploads_server.post(form(part("file", GOOD_CSV, filename=filename)))
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == expected


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"file": "Email\\na@b.co\\n"}'),
        ("text/csv", GOOD_CSV),
        ("multipart/form-data", form(part("file", GOOD_CSV))),  # no boundary
        ("multipart/mixed; boundary=" + BOUNDARY, form(part("file", GOOD_CSV))),
        ("application/x-www-form-urlencoded", b"file=x"),
    ],
)
def test_anything_but_multipart_form_data_is_415(
    uploads_server: UploadServer, content_type: str, body: bytes
) -> None:
    response = uploads_server.post(body, **{"content-type": content_type})
    uploads_server.refused(response, 415, "unsupported_media_type")


def test_no_content_type_is_415(uploads_server: UploadServer) -> None:
    response = uploads_server.http.post("/upload", params={"max_bytes": 4096}, content=GOOD_CSV)
    uploads_server.refused(response, 415, "unsupported_media_type")


def test_a_content_length_over_the_limit_is_413(uploads_server: UploadServer) -> None:
    body = form(part("file", GOOD_CSV * 100, filename="x.csv"))
    uploads_server.refused(uploads_server.post(body, max_bytes=1000), 413, "upload_too_large")


def raw_request(server: ServerThread, head: bytes, body: bytes = b"") -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.sendall(head + body)
    return sock


def read_status(sock: socket.socket) -> bytes:
    answer = b""
    while b"\r\n" not in answer and (data := sock.recv(65536)):
        answer += data
    return answer.split(b"\r\n", 1)[0]


def test_a_content_length_over_the_limit_is_refused_before_any_body_arrives(
    uploads_server: UploadServer,
) -> None:
    head = (
        f"POST /upload?max_bytes=1000 HTTP/1.1\r\nHost: x\r\nContent-Type: {MULTIPART}\r\n"
        "Content-Length: 1000000000\r\n\r\n"
    ).encode()
    with raw_request(uploads_server.server, head) as sock:  # and no body at all
        assert read_status(sock) == b"HTTP/1.1 413 Request Entity Too Large"
    assert list(uploads_server.spool.iterdir()) == []


def test_a_chunked_body_over_the_limit_is_413(uploads_server: UploadServer) -> None:
    body = form(part("file", GOOD_CSV * 400, filename="x.csv"))  # ~20 KiB

    def chunks() -> Iterator[bytes]:
        yield from (body[start : start + 1024] for start in range(0, len(body), 1024))

    response = uploads_server.post(chunks(), max_bytes=4096)
    assert "content-length" not in response.request.headers
    uploads_server.refused(response, 413, "upload_too_large")


def test_a_body_exactly_at_the_limit_is_fine(uploads_server: UploadServer) -> None:
    body = form(part("file", GOOD_CSV, filename="x.csv"))
    assert uploads_server.post(body, max_bytes=len(body)).status_code == 200
    assert uploads_server.post(iter([body]), max_bytes=len(body)).status_code == 200
    response = uploads_server.post(iter([body]), max_bytes=len(body) - 1)
    uploads_server.refused(response, 413, "upload_too_large")


def test_no_file_part_is_400_missing_file(uploads_server: UploadServer) -> None:
    response = uploads_server.post(form(part("object", b"contact"), part("files", GOOD_CSV)))
    uploads_server.refused(response, 400, "missing_file")
    uploads_server.refused(uploads_server.post(form()), 400, "missing_file")


def test_two_file_parts_are_400_bad_upload(uploads_server: UploadServer) -> None:
    body = form(part("file", GOOD_CSV, filename="a.csv"), part("file", GOOD_CSV, filename="b.csv"))
    uploads_server.refused(uploads_server.post(body), 400, "bad_upload")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"hello, world", id="not-multipart-at-all"),
        pytest.param(form(part("file", GOOD_CSV), boundary="other"), id="wrong-boundary"),
        pytest.param(form(part("file", GOOD_CSV))[:-30], id="truncated-in-the-file"),
        pytest.param(form(part("file", GOOD_CSV))[:-8], id="no-closing-boundary"),
        pytest.param(
            f"--{BOUNDARY}\r\nno colon here\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode(),
            id="bad-part-header",
        ),
        pytest.param(
            f"--{BOUNDARY}\r\nContent-Type: text/csv\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode(),
            id="part-without-name",
        ),
        pytest.param(
            form(part("file", GOOD_CSV, extra="X: " + "y" * 10_000 + "\r\n")), id="huge-header"
        ),
    ],
)
def test_a_broken_multipart_body_is_400_malformed_multipart(
    uploads_server: UploadServer, body: bytes
) -> None:
    uploads_server.refused(uploads_server.post(body), 400, "malformed_multipart")


def test_an_overlong_boundary_is_400_not_500(uploads_server: UploadServer) -> None:
    boundary = "b" * 300
    body = form(part("file", GOOD_CSV), boundary=boundary)
    response = uploads_server.post(
        body, **{"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    uploads_server.refused(response, 400, "malformed_multipart")


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"", "empty_file"),
        (b"\n\n", "no_header"),
        (b"Email,Name\r\n", "no_rows"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary_file"),
        (b"Email,Name\nann@example.com,Ren\xe9e\n", "not_utf8"),
        (big_csv(60_000) + b"\xff\n", "not_utf8"),  # after some MiB already reached the disk
    ],
)
def test_a_bad_csv_is_400_with_its_code_and_leaves_no_file(
    uploads_server: UploadServer, content: bytes, code: str
) -> None:
    body = form(part("object", b"contact"), part("file", content, filename="x.csv"))
    uploads_server.refused(uploads_server.post(body, max_bytes=len(body)), 400, code)


def test_text_fields_are_limited(uploads_server: UploadServer) -> None:
    file = part("file", GOOD_CSV, filename="x.csv")
    sixteen = [part(f"f{i}", b"v") for i in range(16)]
    assert uploads_server.post(form(*sixteen, file)).status_code == 200
    bad = [
        form(*sixteen, part("f16", b"v"), file),  # a 17th field
        form(part("metadata", b"x" * (64 * 1024 + 1)), file),  # over 64 KiB
        form(part("object", b"caf\xe9"), file),  # not UTF-8
        form(part("object", b"a"), part("object", b"b"), file),  # twice
        form(part("obj\xc3\xa9ct".encode("latin-1").decode("latin-1"), b"x"), file),
    ]
    for body in bad[:4]:
        uploads_server.refused(uploads_server.post(body), 400, "bad_field")
    exactly = uploads_server.post(form(part("metadata", b"x" * (64 * 1024)), file))
    assert exactly.status_code == 200
    assert len(exactly.json()["fields"]["metadata"]) == 64 * 1024


def test_a_client_that_disconnects_mid_upload_leaves_no_file(
    uploads_server: UploadServer,
) -> None:
    head = (
        f"POST /upload?max_bytes=100000000 HTTP/1.1\r\nHost: x\r\nContent-Type: {MULTIPART}\r\n"
        "Content-Length: 50000000\r\n\r\n"
    ).encode()
    start = f"--{BOUNDARY}\r\n".encode() + part("file", b"Email\r\n", filename="x.csv")
    with raw_request(uploads_server.server, head, start + b"a@b.co\r\n" * 400_000):
        deadline = time.monotonic() + 10
        while not list(uploads_server.spool.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.01)  # the upload has begun: its temporary file exists
        assert list(uploads_server.spool.iterdir())
    deadline = time.monotonic() + 10
    while list(uploads_server.spool.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(uploads_server.spool.iterdir()) == []


# Property (in process, no HTTP): whatever the body and its chunking, receive_upload
# returns an upload or raises ApiError 400/413, and leaves no file behind on error.


def fake_request(chunks: list[bytes], content_type: str = MULTIPART) -> Request:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/upload",
        "query_string": b"",
        "headers": [(b"content-type", content_type.encode())],
    }
    queue = list(chunks)

    async def receive() -> dict[str, object]:
        body = queue.pop(0) if queue else b""
        return {"type": "http.request", "body": body, "more_body": bool(queue)}

    return Request(scope, receive)


VALID_BODY = form(
    part("object", b"contact"),
    part("metadata", b'{"action": "upsert"}'),
    part("file", b'Email,Note\r\na@b.co,"x\r\ny"\r\nc@d.co,\r\n', filename="x.csv"),
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(["cut", "insert", "flip"]),
            st.integers(0, len(VALID_BODY)),
            st.binary(min_size=1, max_size=8),
        ),
        max_size=3,
    ),
    cuts=st.lists(st.integers(0, len(VALID_BODY) + 30), max_size=6),
    max_bytes=st.sampled_from([60, 400, 10_000]),
)
def test_no_body_makes_receive_upload_fail_other_than_with_api_error(
    edits: list[tuple[str, int, bytes]], cuts: list[int], max_bytes: int
) -> None:
    body = bytearray(VALID_BODY)
    for kind, at, data in edits:
        at = min(at, len(body))
        if kind == "cut":
            del body[at:]
        elif kind == "insert":
            body[at:at] = data
        elif at < len(body):
            body[at] ^= data[0] or 1
    chunks = split_at(bytes(body), [min(cut, len(body)) for cut in cuts])
    with tempfile.TemporaryDirectory() as spool:
        try:
            upload = asyncio.run(
                receive_upload(fake_request(chunks), max_bytes=max_bytes, directory=spool)
            )
        except ApiError as exc:
            assert exc.status in (400, 413)
            assert list(Path(spool).iterdir()) == []
        else:
            assert isinstance(upload, ReceivedUpload)
            assert list(Path(spool).iterdir()) == [upload.path]
            assert upload.summary.size == upload.path.stat().st_size
