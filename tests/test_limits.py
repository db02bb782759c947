"""Size limits hold without reading past them, whatever Content-Length says."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from .helpers import RunningSandbox, RunningService

CALLBACK_LIMIT = 64 * 1024
UPLOAD_LIMIT = 256 * 1024
CHUNK = 16 * 1024


@pytest.fixture
def limited(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
) -> tuple[RunningSandbox, RunningService]:
    upstream = start_sandbox()
    service = start_service(
        upstream, max_callback_bytes=CALLBACK_LIMIT, max_upload_bytes=UPLOAD_LIMIT
    )
    return upstream, service


def connect(service: RunningService) -> socket.socket:
    return socket.create_connection((service.server.host, service.server.port), 10)


def read_response(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and data.endswith(b"}"):
                break
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def send_chunked(sock: socket.socket, head: bytes, total: int, first: bytes = b"") -> int:
    """Send ``first`` then ``total`` bytes as chunked encoding; return how many went out
    before the server stopped reading (a reset, or a response waiting on the socket)."""
    sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
    if first:
        sock.sendall(f"{len(first):x}\r\n".encode() + first + b"\r\n")
    sent = 0
    sock.setblocking(False)
    try:
        while sent < total:
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break  # the answer came before the body ended
            except BlockingIOError:
                pass
            frame = f"{CHUNK:x}\r\n".encode() + b"x" * CHUNK + b"\r\n"
            try:
                sock.sendall(frame)
            except BlockingIOError:
                break  # the server is not reading any more
            sent += CHUNK
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.setblocking(True)
    return sent


def test_a_declared_oversize_callback_is_refused_before_its_body(
    limited: tuple[RunningSandbox, RunningService],
) -> None:
    _, service = limited
    with connect(service) as sock:
        sock.sendall(
            b"POST /callbacks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {CALLBACK_LIMIT + 1}\r\n\r\n".encode()
        )
        answer = read_response(sock)  # no body was sent at all
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b'"too_large"' in answer


def test_a_chunked_oversize_callback_is_cut_off_at_the_limit(
    limited: tuple[RunningSandbox, RunningService],
) -> None:
    _, service = limited
    with connect(service) as sock:
        head = b"POST /callbacks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sent = send_chunked(sock, head, 64 * 1024 * 1024)
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
    assert sent < 8 * 1024 * 1024  # far less than the 64 MiB on offer


def test_a_content_length_that_lies_low_is_cut_at_its_own_length(
    limited: tuple[RunningSandbox, RunningService],
) -> None:
    _, service = limited
    with connect(service) as sock:
        sock.sendall(
            b"POST /callbacks HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
            + b"x"
            * (2 * CALLBACK_LIMIT)
        )
        answer = read_response(sock)
    # The server read two bytes of body (no signature: refused), never the rest.
    assert answer.startswith(b"HTTP/1.1 401 ")


def test_an_oversize_upload_is_413_and_nothing_reaches_the_upstream(
    limited: tuple[RunningSandbox, RunningService], tmp_path: Path
) -> None:
    upstream, service = limited
    leftovers = set(Path(tempfile.gettempdir()).glob("bulkhook-upload-*"))
    big = tmp_path / "big.csv"
    big.write_bytes(b"Email,Name\n" + b"someone@example.com,Name\n" * (UPLOAD_LIMIT // 20))
    response = service.submit(big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "upload_too_large"
    boundary = "b0undary"
    with connect(service) as sock:
        head = (
            b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Content-Type: multipart/form-data; boundary={boundary}\r\n".encode()
        )
        first = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="object"\r\n\r\n'
            f"contact\r\n--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="big.csv"\r\n\r\n'
            "Email,Name\r\n"
        ).encode()
        sent = send_chunked(sock, head, 64 * 1024 * 1024, first)
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
    assert sent < 8 * 1024 * 1024
    assert upstream.sandbox.calls["submit"] == 0
    assert service.http.get("/jobs").json()["jobs"] == []
    assert set(Path(tempfile.gettempdir()).glob("bulkhook-upload-*")) == leftovers
