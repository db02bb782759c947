"""Slow and silent clients cannot stall the service.

A client that trickles its upload, or never finishes its request headers, holds a
connection, a task, a spool file and maybe an upstream connection for as long as it
likes, unless the service cuts it. These tests are such clients, over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.app import create_app
from service.config import ConfigError, Settings
from service.errors import ApiError
from service.jobs import State, SubmitRequest
from service.server.protocol import http_protocol, implementations
from service.server.thread import ServerThread
from service.store import open_store
from service.tracker import Tracker
from service.upstream.client import UpstreamClient, UpstreamUnavailable
from service.upstream.multipart import FileStream

from .helpers import RunningSandbox, StartSandbox, StartService, eventually, signed, write_csv

BOUNDARY = "slow-client-boundary"
HEADER_ROW = b"Email,First,Last\r\n"
ROW = b"someone@example.com,Some,One\r\n"
DECLARED = 10 << 20  # what each slow client promises: a 10 MB upload
# Settings that cut a client sending less than 1,000 bytes a second within ~4 s.
SHORT = {"body_timeout": 5.0, "upload_min_rate": 1000, "upload_rate_window": 4.0}


def upload_head(port: int, length: int = DECLARED) -> bytes:
    """A POST /jobs request line, headers and multipart preamble for a ``length`` body."""
    preamble = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="object"\r\n\r\ncontact\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="slow.csv"'
        "\r\nContent-Type: text/csv\r\n\r\n"
    ).encode()
    headers = (
        f"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()
    return headers + preamble + HEADER_ROW


class SlowClients:
    """``count`` connections that send ``head`` and then one byte of CSV rows every
    ``every`` seconds, until the service answers or closes; bounded by ``within``."""

    def __init__(self, port: int, count: int, head: bytes, every: float, within: float) -> None:
        self.answers: dict[int, bytes] = {}  # socket index -> what came back, once closed
        self._sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
        for sock in self._sockets:
            sock.sendall(head)
            sock.setblocking(False)
        self._every, self._deadline = every, time.monotonic() + within
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def open(self) -> int:
        return len(self._sockets) - len(self.answers)

    def wait(self) -> dict[int, bytes]:
        self._thread.join()
        return self.answers

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        received: dict[int, bytearray] = {}
        for index, sock in enumerate(self._sockets):
            selector.register(sock, selectors.EVENT_READ, index)
            received[index] = bytearray()
        rows = ROW * 1000
        sent = 0
        next_byte = time.monotonic()
        while self.open and time.monotonic() < self._deadline:
            for key, _ in selector.select(timeout=0.05):
                index = key.data
                try:
                    data = self._sockets[index].recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if data:
                    received[index] += data
                else:
                    self._close(selector, index, bytes(received[index]))
            if time.monotonic() >= next_byte:
                next_byte += self._every
                byte = rows[sent % len(rows) : sent % len(rows) + 1]
                sent += 1
                for index, sock in enumerate(self._sockets):
                    if index not in self.answers:
                        with contextlib.suppress(OSError):
                            sock.send(byte)
        for index in range(len(self._sockets)):
            if index not in self.answers:
                self._close(selector, index, bytes(received[index]))
        selector.close()

    def _close(self, selector: selectors.BaseSelector, index: int, answer: bytes) -> None:
        selector.unregister(self._sockets[index])
        self._sockets[index].close()
        self.answers[index] = answer


def status_of(answer: bytes) -> int | None:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", answer)
    return int(match.group(1)) if match else None


def body_of(answer: bytes) -> Any:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def read_to_end(sock: socket.socket) -> bytes:
    """What the service sends until it closes the connection."""
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def server_sockets(port: int) -> dict[str, int]:
    """The loopback TCP connections whose local end is ``port``, by state (hex code)."""
    counts: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] != "0A":
                    counts[fields[3]] = counts.get(fields[3], 0) + 1
    counts.pop("06", None)  # TIME_WAIT: closed on both sides, no descriptor held
    return counts


def open_sockets() -> int:
    """Socket descriptors this process holds (the service runs in it, on a thread)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def spool_files() -> list[str]:
    """Upload spool files open in this process, wherever they are."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if "bulkhook-upload-" in target:
                names.append(target)
    return names


def uploads_in(directory: Path) -> list[Path]:
    """The upload files under ``directory``, in whichever app's spool directory."""
    return sorted(directory.glob("**/bulkhook-upload-*"))


@pytest.fixture
def spool_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where uploads are spooled during the test (below the temporary directory, where
    the default spool root is): a directory of its own."""
    directory = tmp_path / "spool"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


# -- uploads below the minimum rate ---------------------------------------------------


def test_a_trickling_upload_is_cut_with_408_and_leaves_nothing(
    start_sandbox: StartSandbox, start_service: StartService, spool_dir: Path
) -> None:
    upstream = start_sandbox()
    service = start_service(upstream, **SHORT)
    started = time.monotonic()
    clients = SlowClients(service.server.port, 1, upload_head(service.server.port), 0.2, 20)
    answer = clients.wait()[0]
    assert status_of(answer) == 408, answer
    assert body_of(answer)["error"]["code"] == "upload_too_slow"
    assert b"connection: close" in answer.lower()
    assert time.monotonic() - started < 10
    # Nothing was sent upstream (the file never reached the relay threshold), no job
    # was recorded, and the spool file is gone.
    assert upstream.sandbox.upload_bytes == 0
    assert upstream.sandbox.jobs == {}
    assert service.http.get("/jobs").json()["jobs"] == []
    assert uploads_in(spool_dir) == []


def test_an_upload_that_stops_sending_is_cut_after_the_body_timeout(
    start_sandbox: StartSandbox, start_service: StartService, spool_dir: Path
) -> None:
    upstream = start_sandbox()
    service = start_service(upstream, body_timeout=1.0, upload_rate_window=60.0)
    with socket.create_connection(("127.0.0.1", service.server.port)) as sock:
        sock.sendall(upload_head(service.server.port))
        sock.settimeout(10)
        started = time.monotonic()
        answer = read_to_end(sock)
        waited = time.monotonic() - started
    assert status_of(answer) == 408, answer
    error = body_of(answer)["error"]
    assert error["code"] == "upload_too_slow"
    assert "nothing for 1 s" in error["message"]
    assert 0.8 < waited < 5
    assert uploads_in(spool_dir) == []
    assert upstream.sandbox.upload_bytes == 0


def test_a_promised_size_alone_opens_no_upstream_connection(
    start_sandbox: StartSandbox, start_service: StartService, spool_dir: Path
) -> None:
    # Content-Length says 10 MB, far past the relay threshold; 100 KB arrive quickly,
    # then nothing: no relay may start on a promise.
    upstream = start_sandbox()
    service = start_service(upstream, body_timeout=2.0)
    with socket.create_connection(("127.0.0.1", service.server.port)) as sock:
        sock.sendall(upload_head(service.server.port) + ROW * 3500)
        time.sleep(1.0)
        assert upstream.sandbox.upload_bytes == 0
        assert len(uploads_in(spool_dir)) == 1  # being received
        sock.settimeout(10)
        answer = read_to_end(sock)
    assert status_of(answer) == 408
    assert upstream.sandbox.upload_bytes == 0
    assert upstream.sandbox.jobs == {}
    assert uploads_in(spool_dir) == []


# -- the flood ------------------------------------------------------------------------


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_150_slow_uploads_stall_nothing_and_leave_nothing_behind(
    start_sandbox: StartSandbox,
    start_service: StartService,
    spool_dir: Path,
    tmp_path: Path,
) -> None:
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=60)
    service = start_service(upstream, callback_grace=60, **SHORT)
    csv = write_csv(tmp_path / "small.csv", [["Email"], ["a@example.com"], ["b@example.com"]])
    job = service.submit(csv).json()
    port = service.server.port
    assert service.http.get("/healthz").status_code == 200
    sockets_before, connections_before = open_sockets(), server_sockets(port)

    clients = SlowClients(port, 150, upload_head(port), 0.5, 30)
    eventually(lambda: len(spool_files()) == 150, within=10)  # every upload is in hand
    latencies: list[float] = []
    for index in range(10):
        news = {"id": job["upstream_id"], "status": "RUNNING", "callback-payload": job["id"]}
        body = json.dumps(news | {"recordsCount": index}).encode()
        url, headers = f"/callbacks/jobs/{job['id']}", signed(body, f"flood-{index}")
        answer, took = timed(partial(service.http.post, url, content=body, headers=headers))
        assert answer.status_code == 200, answer.text
        latencies.append(took)
        health, took = timed(lambda: service.http.get("/healthz"))
        assert health.status_code == 200
        latencies.append(took)
    assert clients.open > 100, "the flood ended before it was measured"
    # A normal client still submits, and discovery still has its connections.
    submitted, took = timed(lambda: service.submit(csv))
    assert submitted.status_code == 202, submitted.text
    assert took < 5
    objects, took = timed(lambda: service.http.get("/objects"))
    assert objects.status_code == 200 and "contact" in objects.json()["objects"]
    latencies.append(took)
    assert clients.open > 100, "the flood ended before it was measured"
    assert max(latencies) < 1.0, latencies

    answers = clients.wait()
    assert len(answers) == 150
    statuses = [status_of(answer) for answer in answers.values()]
    assert set(statuses) <= {408, None}  # 408, or closed before its answer was read
    assert statuses.count(408) > 100, statuses
    assert all(
        body_of(answer)["error"]["code"] == "upload_too_slow"
        for answer in answers.values()
        if status_of(answer) == 408
    )
    # Once they are gone, the service holds nothing of theirs.
    eventually(lambda: open_sockets() <= sockets_before + 4, within=10)
    eventually(lambda: server_sockets(port).get("01", 0) <= connections_before.get("01", 0) + 2)
    assert "08" not in server_sockets(port)  # CLOSE_WAIT: a socket the service forgot
    assert spool_files() == []
    assert uploads_in(spool_dir) == []
    assert upstream.sandbox.upload_bytes < 10_000  # the two small submits, nothing else
    assert len(upstream.sandbox.jobs) == 2


# -- a submission that never got a connection -----------------------------------------


@pytest.mark.anyio
async def test_a_submit_that_found_no_free_connection_fails_at_once_as_never_sent(
    sandbox: RunningSandbox, store_url: str, tmp_path: Path
) -> None:
    settings = Settings(
        database_url=store_url,
        oc_base_url=sandbox.api_url,
        oc_user_secret="user-secret",
        oc_org_secret="org-secret",
        oc_element_token="element-token",
    )
    store = open_store(store_url)
    await store.open()
    upstream = UpstreamClient(
        sandbox.api_url,
        settings.credentials(),
        timeout=httpx.Timeout(30.0, pool=0.3),
        submit_connections=1,
    )
    held = asyncio.Event()

    async def never_ends() -> AsyncIterator[bytes]:
        yield b"Email\r\n"
        await held.wait()

    # One upload holds the only submission connection, and never ends.
    holder = asyncio.ensure_future(
        upstream.submit("marketing", "contact", FileStream(1 << 20, never_ends))
    )
    try:
        for _ in range(500):  # until the upstream reads it
            if sandbox.sandbox.upload_bytes:
                break
            await asyncio.sleep(0.01)
        # Status calls and discovery have connections of their own.
        assert "contact" in await upstream.objects("marketing")
        tracker = Tracker(settings, store, upstream, "http://127.0.0.1:9")
        csv = write_csv(tmp_path / "one.csv", [["Email"], ["a@example.com"]])
        request = SubmitRequest("marketing", "contact", "/one.csv", "one.csv", 1, {})
        started = time.monotonic()
        with pytest.raises(ApiError) as refused:
            await tracker.submit(request, csv)
        assert time.monotonic() - started < 5
        assert (refused.value.status, refused.value.code) == (502, "upstream_unavailable")
        job = await store.get_job(refused.value.extra["job"]["id"])
        assert job is not None and job.state == State.SUBMIT_FAILED
        assert "nothing was sent" in " ".join(event.detail or "" for event in job.events)
        eventually(lambda: not csv.exists(), within=5)
        assert sandbox.sandbox.jobs == {}
        again = write_csv(tmp_path / "two.csv", [["Email"], ["b@example.com"]])
        with pytest.raises(UpstreamUnavailable) as direct:
            await upstream.submit("marketing", "contact", again)
        assert direct.value.request_sent is False
    finally:
        holder.cancel()
        with contextlib.suppress(BaseException):
            await holder
        await upstream.aclose()
        await store.close()


# -- request headers ------------------------------------------------------------------


@pytest.fixture(params=implementations())
def quick_deadline(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerThread]:
    """The service under each HTTP parser installed, its header deadline 0.5 s."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'bulkhook.db'}")
    server = ServerThread(http=http_protocol(0.5, request.param))
    server.start(create_app(settings.replace(public_url=server.url)))
    yield server
    server.stop()


def answers(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False


def closed_within(sock: socket.socket, seconds: float) -> float:
    """How long until the service closed ``sock`` (it sends nothing first)."""
    sock.settimeout(seconds)
    started = time.monotonic()
    assert sock.recv(1024) == b""
    return time.monotonic() - started


def test_half_a_request_line_is_disconnected_after_the_header_timeout(
    quick_deadline: ServerThread,
) -> None:
    with socket.create_connection(("127.0.0.1", quick_deadline.port)) as sock:
        sock.sendall(b"GET /heal")
        assert 0.3 < closed_within(sock, 5) < 3


def test_a_connection_that_sends_nothing_is_closed(quick_deadline: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", quick_deadline.port)) as sock:
        assert closed_within(sock, 5) < 3


def test_trickled_headers_are_cut_even_while_bytes_keep_coming(
    quick_deadline: ServerThread,
) -> None:
    with socket.create_connection(("127.0.0.1", quick_deadline.port)) as sock:
        started = time.monotonic()
        with contextlib.suppress(OSError):
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
        assert closed_within(sock, 5) + (time.monotonic() - started) < 4


def test_requests_on_time_are_served_again_and_again_on_one_connection(
    quick_deadline: ServerThread,
) -> None:
    # The deadline starts again after each response: four requests 0.3 s apart (1.2 s
    # on one connection, past the 0.5 s deadline in all) are each answered.
    request = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{quick_deadline.port}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", quick_deadline.port)) as sock:
        sock.settimeout(5)
        for _ in range(4):
            sock.sendall(request.encode())
            answer = b""
            while not answer.endswith(b"}"):
                chunk = sock.recv(4096)
                assert chunk, "the connection was closed"
                answer += chunk
            assert status_of(answer) == 200
            time.sleep(0.3)


def test_a_callback_body_trickled_past_the_deadline_is_cut(
    quick_deadline: ServerThread,
) -> None:
    # The deadline covers the body of every request but an upload: a callback sent a
    # few bytes at a time would otherwise hold its connection for as long as it likes.
    body = json.dumps({"status": "RUNNING", "callback-payload": "job-x"}).encode()
    head = "".join(
        f"{name}: {value}\r\n"
        for name, value in {
            "Host": f"127.0.0.1:{quick_deadline.port}",
            **signed(body, "w-slow"),
            "Content-Length": str(len(body)),
        }.items()
    )
    with socket.create_connection(("127.0.0.1", quick_deadline.port)) as sock:
        started = time.monotonic()
        sock.sendall(f"POST /callbacks HTTP/1.1\r\n{head}\r\n".encode() + body[:5])
        with contextlib.suppress(OSError):
            for byte in body[5:]:
                time.sleep(0.05)
                sock.sendall(bytes([byte]))
        assert closed_within(sock, 5) + (time.monotonic() - started) < 4
    assert answers(f"{quick_deadline.url}/healthz")


def test_a_download_request_trickled_past_the_deadline_is_cut(
    quick_deadline: ServerThread,
) -> None:
    # A download's JSON is as small as a callback: POST /jobs is an upload's pace only
    # with a file.
    body = json.dumps({"object": "contact", "format": "jsonl"}).encode()
    head = (
        f"Host: 127.0.0.1:{quick_deadline.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    with socket.create_connection(("127.0.0.1", quick_deadline.port)) as sock:
        started = time.monotonic()
        sock.sendall(f"POST /jobs HTTP/1.1\r\n{head}\r\n".encode() + body[:5])
        with contextlib.suppress(OSError):
            for byte in body[5:]:
                time.sleep(0.05)
                sock.sendall(bytes([byte]))
        assert closed_within(sock, 5) + (time.monotonic() - started) < 4
    assert answers(f"{quick_deadline.url}/healthz")


@pytest.mark.parametrize(
    ("path", "content_type", "begun"),
    [
        ("/jobs", "application/json", b'{"object": "con'),
        ("/ui/login", "application/x-www-form-urlencoded", b"token=abc"),
    ],
)
def test_a_client_gone_before_its_body_ended_is_no_error(
    start_service: StartService,
    caplog: pytest.LogCaptureFixture,
    path: str,
    content_type: str,
    begun: bytes,
) -> None:
    caplog.set_level(logging.DEBUG, logger="bulkhook")
    service = start_service(None)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        "Content-Length: 1000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", int(service.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(head.encode() + begun)
        time.sleep(0.2)
    eventually(lambda: any("went away" in r.getMessage() for r in caplog.records))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert service.http.get("/healthz").status_code == 200


def test_an_upload_body_may_take_longer_than_the_deadline(
    quick_deadline: ServerThread,
) -> None:
    # An upload's body is judged by the upload rules (its pace over a window), not by
    # the deadline: here a small CSV sent in pieces over 1.5 s is received whole.
    csv = b"Email,Name\r\n" + b"".join(b"a%d@example.com,A\r\n" % n for n in range(20))

    def pieces() -> Iterator[bytes]:
        multipart = (
            b'--b\r\nContent-Disposition: form-data; name="object"\r\n\r\ncontact\r\n'
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="c.csv"\r\n'
            b"Content-Type: text/csv\r\n\r\n" + csv + b"\r\n--b--\r\n"
        )
        for start in range(0, len(multipart), 50):
            time.sleep(1.5 * 50 / len(multipart))
            yield multipart[start : start + 50]

    with httpx.Client(base_url=quick_deadline.url, timeout=30) as http:
        response = http.post(
            "/jobs", content=pieces(), headers={"Content-Type": "multipart/form-data; boundary=b"}
        )
    assert response.status_code == 202, response.text


def test_bulkhook_serve_has_the_header_timeout(tmp_path: Path) -> None:
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("OC_", "BULKHOOK_"))
    }
    env |= {
        "BULKHOOK_HEADER_TIMEOUT": "0.5",
        "BULKHOOK_DATABASE_URL": f"sqlite:///{tmp_path / 'bulkhook.db'}",
        "BULKHOOK_LOG_LEVEL": "warning",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", "0"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        port = int(re.search(r"serving on http://127\.0\.0\.1:(\d+)", line).group(1))  # type: ignore[union-attr]
        eventually(lambda: answers(f"http://127.0.0.1:{port}/healthz"))
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /jobs HTT")
            assert closed_within(sock, 5) < 3
    finally:
        process.terminate()
        process.wait(30)


# -- settings -------------------------------------------------------------------------


def test_the_limits_are_settings_and_nonsense_is_refused() -> None:
    settings = Settings.from_env(
        {
            "BULKHOOK_HEADER_TIMEOUT": "2.5",
            "BULKHOOK_BODY_TIMEOUT": "30",
            "BULKHOOK_UPLOAD_MIN_RATE": "4096",
            "BULKHOOK_UPLOAD_RATE_WINDOW": "20",
            "BULKHOOK_MAX_RELAYS": "3",
        },
        env_file=None,
    )
    assert (settings.header_timeout, settings.body_timeout) == (2.5, 30.0)
    assert (settings.upload_min_rate, settings.upload_rate_window, settings.max_relays) == (
        4096,
        20.0,
        3,
    )
    defaults = Settings()
    assert (defaults.header_timeout, defaults.body_timeout, defaults.upload_min_rate) == (
        10.0,
        60.0,
        1024,
    )
    for var, bad in [
        ("BULKHOOK_HEADER_TIMEOUT", "0"),
        ("BULKHOOK_BODY_TIMEOUT", "-1"),
        ("BULKHOOK_UPLOAD_MIN_RATE", "1.5"),
        ("BULKHOOK_UPLOAD_RATE_WINDOW", "nan"),
        ("BULKHOOK_MAX_RELAYS", "0"),
        ("BULKHOOK_MAX_RELAYS", "many"),
    ]:
        with pytest.raises(ConfigError, match=var):
            Settings.from_env({var: bad}, env_file=None)
