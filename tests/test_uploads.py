"""receive_upload over real HTTP: multipart streamed to a spool while it is checked."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import random
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.errors import ApiError, error_body
from service.server.thread import ServerThread
from service.uploads.receiving import FileStart, ReceivedUpload, receive_upload

from .helpers import split_at

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
    starts: list[FileStart] = []

    async def on_file(start: FileStart) -> None:
        starts.append(start)

    try:
        upload = await receive_upload(
            request,
            max_bytes=int(request.query_params["max_bytes"]),
            directory=spool,
            on_file=on_file,
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
                "file_start": [
                    {"filename": start.filename, "fields": start.fields, "size": start.size}
                    for start in starts
                ],
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


def test_the_file_start_tells_the_fields_before_it_and_the_files_size(
    uploads_server: UploadServer,
) -> None:
    # httpx, like curl and browsers, sends the fields first and ends the body as usual.
    response = uploads_server.http.post(
        "/upload",
        params={"max_bytes": 4096},
        data={"object": "contact", "hub": "crm"},
        files={"file": ("people.csv", GOOD_CSV, "text/csv")},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["file_start"] == [
        {"filename": "people.csv", "fields": {"object": "contact", "hub": "crm"}, "size": 54}
    ]
    assert body["size"] == len(GOOD_CSV) == 54


def test_the_file_size_guess_is_wrong_when_fields_follow_and_absent_without_a_length(
    uploads_server: UploadServer,
) -> None:
    body = form(
        part("object", b"contact"),
        part("file", GOOD_CSV, filename="a.csv"),
        part("path", b"/later.csv"),
    )
    first = uploads_server.post(body).json()
    assert first["file_start"][0]["fields"] == {"object": "contact"}
    assert first["file_start"][0]["size"] != first["size"]  # so it is never relayed
    assert first["fields"] == {"object": "contact", "path": "/later.csv"}
    chunked = uploads_server.post(iter([body[:50], body[50:]])).json()  # no Content-Length
    assert chunked["file_start"][0]["size"] is None
    assert chunked["size"] == len(GOOD_CSV)


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
    assert {key: value for key, value in response.json().items() if key != "file_start"} == {
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


# Pace (in process, real clock): an upload that stalls or trickles is cut with 408.

SLOW_BODY = form(part("file", b"Email\r\n" + b"a@b.co\r\n" * 300, filename="slow.csv"))


def paced_request(chunks: list[bytes], pauses: list[float]) -> Request:
    """A request whose ``chunks`` arrive after ``pauses`` seconds each."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/upload",
        "query_string": b"",
        "headers": [(b"content-type", MULTIPART.encode())],
    }
    queue = list(zip(chunks, pauses, strict=True))

    async def receive() -> dict[str, object]:
        body, pause = queue.pop(0)
        await asyncio.sleep(pause)
        return {"type": "http.request", "body": body, "more_body": bool(queue)}

    return Request(scope, receive)


def pieces(body: bytes, size: int) -> list[bytes]:
    return [body[at : at + size] for at in range(0, len(body), size)]


async def receive_paced(
    request: Request, spool: Path, **pace: float
) -> tuple[ReceivedUpload | None, ApiError | None]:
    try:
        return await receive_upload(request, max_bytes=1 << 20, directory=spool, **pace), None  # type: ignore[arg-type]
    except ApiError as exc:
        return None, exc


def test_an_upload_above_the_minimum_rate_arrives_whole(tmp_path: Path) -> None:
    chunks = pieces(SLOW_BODY, 300)  # 6,000 bytes a second, over 0.4 s
    request = paced_request(chunks, [0.05] * len(chunks))
    pace = {"body_timeout": 1.0, "min_rate": 2000, "rate_window": 0.15}
    upload, error = asyncio.run(receive_paced(request, tmp_path, **pace))
    assert error is None and upload is not None
    assert upload.summary.rows == 300
    upload.path.unlink()


def test_an_upload_below_the_minimum_rate_is_408_and_leaves_no_file(tmp_path: Path) -> None:
    chunks = pieces(SLOW_BODY, 20)  # 400 bytes a second
    request = paced_request(chunks, [0.05] * len(chunks))
    pace = {"body_timeout": 1.0, "min_rate": 2000, "rate_window": 0.3}
    started = time.monotonic()
    upload, error = asyncio.run(receive_paced(request, tmp_path, **pace))
    assert upload is None and error is not None
    assert (error.status, error.code) == (408, "upload_too_slow")
    assert "fewer than the least of 2000 bytes a second" in error.message
    assert error.headers == {"Connection": "close"}
    assert time.monotonic() - started < 1.0  # cut at the end of the first window
    assert list(tmp_path.iterdir()) == []


def test_an_upload_that_pauses_past_the_body_timeout_is_408(tmp_path: Path) -> None:
    chunks = pieces(SLOW_BODY, 1000)
    request = paced_request(chunks, [0.0, 0.6, *[0.0] * (len(chunks) - 2)])
    pace = {"body_timeout": 0.2, "min_rate": 1, "rate_window": 60.0}
    upload, error = asyncio.run(receive_paced(request, tmp_path, **pace))
    assert upload is None and error is not None
    assert (error.status, error.code) == (408, "upload_too_slow")
    assert error.message == "the upload sent nothing for 0.2 s"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("after", "announced"), [(1, True), (2407, True), (2408, False)])
def test_on_file_is_called_once_enough_of_the_file_has_arrived(
    tmp_path: Path, after: int, announced: bool
) -> None:
    # The file is 7 + 300 * 8 = 2,407 bytes; it arrives in pieces of 100.
    seen: list[str] = []

    async def run() -> None:
        async def on_file(start: FileStart) -> None:
            seen.append(start.filename)

        chunks = pieces(SLOW_BODY, 100)
        upload = await receive_upload(
            paced_request(chunks, [0.0] * len(chunks)),
            max_bytes=1 << 20,
            directory=tmp_path,
            on_file=on_file,
            announce_after=after,
        )
        upload.path.unlink()

    asyncio.run(run())
    assert seen == (["slow.csv"] if announced else [])
