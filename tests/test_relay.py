"""A large upload goes upstream while it arrives, and never makes a job it should not."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from service.sandbox import API_PREFIX
from service.uploads.relay import RELAY_MIN_BYTES

from .helpers import (
    RecordingUpstream,
    RunningSandbox,
    RunningService,
    StartSandbox,
    StartService,
    eventually,
    sent_upload,
)

BOUNDARY = "relay-test-boundary"
HEADER = b"Email,First,Last\r\n"
ROW = b"someone@example.com,Some,One\r\n"
# Enough rows to be relayed, and to see the upstream receive them before the end.
FIRST = HEADER + ROW * ((RELAY_MIN_BYTES + (4 << 20)) // len(ROW))
REST = ROW * 1000
ROWS = (len(FIRST) - len(HEADER) + len(REST)) // len(ROW)


def _part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value


@dataclass
class Upload:
    """A multipart body sent in pieces, with a pause after the first (``wait``)."""

    before: dict[str, str] = field(default_factory=lambda: {"object": "contact"})
    pieces: tuple[bytes, ...] = (FIRST, REST)
    after: dict[str, str] = field(default_factory=dict)

    def chunks(self, wait: Callable[[], None]) -> Iterator[bytes]:
        yield b"".join(_part(name, value.encode()) + b"\r\n" for name, value in self.before.items())
        yield _part("file", b"", filename="big.csv")
        for index, piece in enumerate(self.pieces):
            if index == 1:
                wait()
            yield piece
        yield b"\r\n"
        yield b"".join(_part(name, value.encode()) + b"\r\n" for name, value in self.after.items())
        yield f"--{BOUNDARY}--\r\n".encode()

    def length(self) -> int:
        return sum(len(chunk) for chunk in self.chunks(lambda: None))

    def post(
        self, service: RunningService, wait: Callable[[], None] = lambda: None, **headers: str
    ) -> httpx.Response:
        headers = {
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
            "Content-Length": str(self.length()),
            **headers,
        }
        return service.http.post("/jobs", content=self.chunks(wait), headers=headers)


def upstream_receiving(upstream: RunningSandbox) -> Callable[[], None]:
    """Hold the rest of the upload back until the upstream has most of what came so far:
    a service that spooled the whole upload first would never get there."""
    return lambda: eventually(lambda: upstream.sandbox.upload_bytes >= len(FIRST) - (3 << 20))


@pytest.fixture
def upstream(start_sandbox: StartSandbox) -> RunningSandbox:
    return start_sandbox()


@pytest.fixture
def service(upstream: RunningSandbox, start_service: StartService) -> RunningService:
    return start_service(upstream)


def test_a_large_upload_reaches_the_upstream_while_it_is_still_arriving(
    service: RunningService, upstream: RunningSandbox
) -> None:
    response = Upload().post(service, upstream_receiving(upstream))
    assert response.status_code == 202, response.text
    job = service.wait_for(response.json()["id"], {"COMPLETED"})
    assert job["records_count"] == ROWS
    assert len(upstream.sandbox.jobs) == 1
    sent = upstream.sandbox.jobs[int(job["upstream_id"])]
    assert sent.metadata == {"callback-payload": job["id"]}
    assert (sent.path, job["path"]) == (None, None)  # none given, none sent
    assert upstream.sandbox.uploads_cut == 0


@pytest.mark.parametrize("path", [None, "/imports/big.csv"])
def test_a_relayed_upload_on_the_wire_sends_metadata_first_and_a_path_only_if_given(
    start_service: StartService, path: str | None
) -> None:
    upstream = RecordingUpstream({"id": 4321, "status": "CREATED", "instanceId": "inst-9"})
    try:
        service = start_service(oc_base_url=upstream.url + API_PREFIX)
        before = {"object": "contact", "metadata": '{"action": "upsert"}'}
        if path:
            before["path"] = path

        def arrived() -> None:
            """The rest is sent only once the upstream has most of the first part."""
            eventually(lambda: upstream.received >= len(FIRST) - (3 << 20))

        response = Upload(before=before).post(service, arrived)
    finally:
        upstream.close()
    assert response.status_code == 202, response.text
    job = response.json()
    [sent] = upstream.posts()
    meta, file = sent_upload(sent, service.url, job, path)
    assert meta == {"action": "upsert", "callback-payload": job["id"]}
    assert (
        file.header_lines[0] == b'Content-Disposition: form-data; name="file"; filename="big.csv"'
    )
    assert file.data == FIRST + REST
    assert (job["path"], job["upstream_id"]) == (path, "4321")
    assert any(e["detail"].endswith("upstream job 4321 (instanceId inst-9)") for e in job["events"])


def test_a_bad_row_found_late_leaves_no_job_upstream(
    service: RunningService, upstream: RunningSandbox
) -> None:
    upload = Upload(pieces=(FIRST, b"someone@example.com,\x00,One\r\n" + REST))
    response = upload.post(service, upstream_receiving(upstream))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "binary_file"
    # The upstream had most of the file, but never its end: the request was cut off.
    eventually(lambda: upstream.sandbox.uploads_cut == 1)
    assert upstream.sandbox.jobs == {}
    assert service.http.get("/jobs").json()["jobs"] == []


def test_fields_after_the_file_are_honoured(
    service: RunningService, upstream: RunningSandbox
) -> None:
    upload = Upload(after={"path": "/late/path.csv", "metadata": '{"action": "upsert"}'})
    response = upload.post(service, upstream_receiving(upstream))
    assert response.status_code == 202, response.text
    job = service.wait_for(response.json()["id"], {"COMPLETED"})
    assert (job["path"], job["records_count"]) == ("/late/path.csv", ROWS)
    assert len(upstream.sandbox.jobs) == 1
    sent = upstream.sandbox.jobs[int(job["upstream_id"])]
    assert (sent.path, sent.metadata["action"]) == ("/late/path.csv", "upsert")
    # The relay guessed the file ended the body; it did not, so it was cut and resent.
    eventually(lambda: upstream.sandbox.uploads_cut == 1)


def test_a_repeated_idempotency_key_relays_nothing_to_a_second_job(
    service: RunningService, upstream: RunningSandbox
) -> None:
    first = Upload().post(service, **{"Idempotency-Key": "big-1"})
    assert first.status_code == 202, first.text
    again = Upload().post(service, **{"Idempotency-Key": "big-1"})
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    service.wait_for(first.json()["id"], {"COMPLETED"})
    assert len(upstream.sandbox.jobs) == 1
    eventually(lambda: upstream.sandbox.uploads_cut == 1)  # the repeat's relay, cut off


def test_a_relayed_upload_refused_with_retry_after_is_sent_again(
    service: RunningService, upstream: RunningSandbox
) -> None:
    upstream.sandbox.inject_fault("submit", 429, retry_after=0.1)
    response = Upload().post(service)
    assert response.status_code == 202, response.text
    job = service.wait_for(response.json()["id"], {"COMPLETED"})
    assert job["records_count"] == ROWS
    assert len(upstream.sandbox.jobs) == 1


def test_a_refusal_after_the_end_fails_the_job(
    service: RunningService, upstream: RunningSandbox
) -> None:
    upstream.sandbox.inject_fault("submit", 500)
    response = Upload().post(service)
    assert response.status_code == 502, response.text
    assert response.json()["error"]["job"]["state"] == "SUBMIT_FAILED"
    assert upstream.sandbox.jobs == {}


class CuttingProxy:
    """A TCP proxy to the upstream that cuts the first upload it carries after ``cut``
    bytes, the way a dropped connection would; every other connection passes."""

    def __init__(self, port: int, cut: int) -> None:
        self._target = ("127.0.0.1", port)
        self._cut = cut
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.cuts = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, outbound: bool) -> None:
        sent, cutting = 0, False
        try:
            while data := source.recv(1 << 16):
                if outbound and sent == 0 and data.startswith(b"POST "):
                    with self._lock:
                        cutting, self.cuts = self.cuts == 0, self.cuts + 1
                sent += len(data)
                if cutting and sent > self._cut:
                    break
                target.sendall(data)
        except OSError:
            pass
        for each in (source, target):
            with contextlib.suppress(OSError):
                each.shutdown(socket.SHUT_RDWR)
            each.close()


def test_a_relay_cut_off_on_the_way_is_sent_again_as_one_job(
    upstream: RunningSandbox, start_service: StartService
) -> None:
    proxy = CuttingProxy(upstream.server.port, cut=2 << 20)
    try:
        service = start_service(upstream, oc_base_url=f"http://127.0.0.1:{proxy.port}{API_PREFIX}")
        response = Upload().post(service)
        assert response.status_code == 202, response.text
        job = service.wait_for(response.json()["id"], {"COMPLETED"})
        assert job["records_count"] == ROWS
        assert len(upstream.sandbox.jobs) == 1
        assert proxy.cuts >= 2  # the cut relay, and the upload sent again
        eventually(lambda: upstream.sandbox.uploads_cut == 1)
    finally:
        proxy.close()


def settled(read: Callable[[], int], quiet: float = 0.5) -> int:
    """``read()`` once it has stopped changing for ``quiet`` seconds."""
    value = read()
    while True:
        time.sleep(quiet)
        if (now := read()) == value:
            return value
        value = now


def test_past_the_most_relays_an_upload_is_spooled_whole_and_sent_after(
    upstream: RunningSandbox, start_service: StartService
) -> None:
    service = start_service(upstream, max_relays=1)
    release = threading.Event()
    answers: dict[str, httpx.Response] = {}

    def hold() -> None:
        release.wait(30)

    def first() -> None:
        answers["first"] = Upload().post(service, hold)

    holder = threading.Thread(target=first)
    holder.start()
    try:
        upstream_receiving(upstream)()  # the one relay is under way, and held
        before = settled(lambda: upstream.sandbox.upload_bytes)
        grew: list[int] = []

        def no_relay() -> None:
            time.sleep(1.5)
            grew.append(upstream.sandbox.upload_bytes - before)

        # The second upload's first 8 MiB are in the service, but none reach the upstream
        # until its body has ended.
        answers["second"] = Upload().post(service, no_relay)
        assert grew == [0]
    finally:
        release.set()
        holder.join(60)
    for name in ("first", "second"):
        assert answers[name].status_code == 202, answers[name].text
        job = service.wait_for(answers[name].json()["id"], {"COMPLETED"})
        assert job["records_count"] == ROWS
    assert len(upstream.sandbox.jobs) == 2
    assert upstream.sandbox.uploads_cut == 0
    assert service.components.tracker.relays == 0


def test_a_relayed_upload_that_stalls_is_cut_and_makes_no_job_upstream(
    upstream: RunningSandbox, start_service: StartService
) -> None:
    service = start_service(upstream, body_timeout=3.0)
    answer: httpx.Response | None = None

    def stall() -> None:
        upstream_receiving(upstream)()
        time.sleep(6)

    with contextlib.suppress(httpx.TransportError):  # closed while the client still sends
        answer = Upload().post(service, stall)
    if answer is not None:
        assert answer.status_code == 408, answer.text
        assert answer.json()["error"]["code"] == "upload_too_slow"
    # The upstream had most of the file, but never its end: the relay was cut off.
    eventually(lambda: upstream.sandbox.uploads_cut == 1)
    assert upstream.sandbox.jobs == {}
    assert service.http.get("/jobs").json()["jobs"] == []
    eventually(lambda: service.components.tracker.relays == 0, within=5)
