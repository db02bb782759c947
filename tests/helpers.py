"""What the suite's tests share: real servers and the handles on them, free ports, a
service started as a process, signed callbacks, Server-Sent Events, jobs and errors.

Fixtures that build these live in ``conftest.py``; no test module imports another.
"""

from __future__ import annotations

import contextlib
import csv
import html
import io
import itertools
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.callbacks.signatures import sign
from service.jobs import Job, State, new_job_id
from service.sandbox import API_PREFIX, Sandbox
from service.server.thread import ServerThread

if TYPE_CHECKING:
    from service.app import Components, Service

SAMPLES = Path(__file__).resolve().parent.parent / "service" / "samples"
SIGNATURE_KEY = "test-instance-key"
# Two connector instances' own keys (``OC_INSTANCES=crm,shop``), and a previous one each.
CRM_KEY, CRM_OLD_KEY = "crm-instance-key", "crm-previous-key"
SHOP_KEY, SHOP_OLD_KEY = "shop-instance-key", "shop-previous-key"
# The second connector instance's own credentials (``start_two_instances``); the
# first, crm, keeps the unnamed credentials and has its own key.
SHOP_SECRETS = {
    "OC_SHOP_USER_SECRET": "shop-user-secret",
    "OC_SHOP_ORG_SECRET": "shop-org-secret",
    "OC_SHOP_ELEMENT_TOKEN": "shop-element-token",
}
# Every secret the suite configures: none may ever be logged (see suite_logs).
CONFIGURED_SECRETS = (
    SIGNATURE_KEY,
    "user-secret",
    "org-secret",
    "element-token",
    CRM_KEY,
    CRM_OLD_KEY,
    SHOP_KEY,
    SHOP_OLD_KEY,
    *SHOP_SECRETS.values(),
)


# Servers and the handles on them -------------------------------------------------


@dataclass
class RunningSandbox:
    sandbox: Sandbox
    server: ServerThread

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def api_url(self) -> str:
        return self.server.url + API_PREFIX


def odd_upstream(download: Callable[[Request], Awaitable[Response]]) -> Starlette:
    """An upstream whose every bulk query completes at once and whose result answer is
    ``download``'s: for answers the sandbox does not give (a body that lies about its
    encoding, one that trickles). Serve it with ``ServerThread`` and point the service
    at ``url + API_PREFIX``."""
    ids = itertools.count(100)

    async def query(request: Request) -> Response:
        return JSONResponse({"id": str(next(ids)), "status": "COMPLETED"})

    async def status(request: Request) -> Response:
        job_id = request.path_params["id"]
        return JSONResponse({"id": job_id, "status": "COMPLETED", "recordsFailedCount": 0})

    jobs = API_PREFIX + "/hubs/{hub}/bulk"
    return Starlette(
        routes=[
            Route(jobs + "/query", query, methods=["POST"]),
            Route(jobs + "/{id}/status", status, methods=["GET"]),
            Route(jobs + "/{id}/{object}", download, methods=["GET"]),
        ]
    )


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """A bare callback endpoint that records every POST exactly as it arrived."""

    server: ServerThread | None = None
    deliveries: list[Delivery] = field(default_factory=list)
    # Status codes to answer, in order; 200 once they run out.
    answers: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url + "/callbacks"

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.deliveries) >= count:
                    return list(self.deliveries)
            time.sleep(0.01)
        with self._lock:
            return list(self.deliveries)

    async def _endpoint(self, request: Request) -> Response:
        body = await request.body()
        with self._lock:
            self.deliveries.append(
                Delivery(request.url.path, dict(request.headers), body, time.monotonic())
            )
            status = self.answers.pop(0) if self.answers else 200
        return JSONResponse({"received": True}, status_code=status)


@dataclass
class RunningService:
    """A real bulkhook app on its own uvicorn server, with an HTTP client."""

    server: ServerThread
    settings: Any
    http: Any

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def components(self) -> Components:
        """What the app was built from: its store, keyring, tracker, spool..."""
        app: Service = self.server.app
        return app.components

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Run SQL straight on the service's database, whichever kind it is."""
        if self.settings.sqlite_path is not None:
            with sqlite3.connect(self.settings.sqlite_path) as conn:
                return conn.execute(sql).fetchall()
        import psycopg

        with psycopg.connect(self.settings.database_url, autocommit=True) as conn:
            cursor = conn.execute(sql)  # type: ignore[arg-type]
            rows = cursor.fetchall() if cursor.description else []
        return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in rows]

    def submit(self, file: Path, *, headers: dict[str, str] | None = None, **fields: str) -> Any:
        fields.setdefault("object", "contact")
        with file.open("rb") as handle:
            return self.http.post(
                "/jobs",
                data=fields,
                files={"file": (file.name, handle, "text/csv")},
                headers=headers or {},
            )

    def download(
        self, object_name: str = "contact", *, headers: dict[str, str] | None = None, **fields: Any
    ) -> Any:
        """Ask for a download (a bulk query) of ``object_name``: ``POST /jobs`` with JSON."""
        return self.http.post("/jobs", json={"object": object_name, **fields}, headers=headers)

    def wait_for_result(
        self, job_id: str, statuses: set[str], within: float = 30.0
    ) -> dict[str, Any]:
        """The job once its ``result`` has one of ``statuses``."""
        deadline = time.monotonic() + within
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.http.get(f"/jobs/{job_id}").json()
            if (job.get("result") or {}).get("status") in statuses:
                return job
            time.sleep(0.05)
        raise AssertionError(f"the result of job {job_id} stayed {job.get('result')}: {job}")

    def wait_for(self, job_id: str, states: set[str], within: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + within
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.http.get(f"/jobs/{job_id}").json()
            if job.get("state") in states:
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} stayed {job.get('state')}: {job}")


@dataclass(frozen=True)
class RawRequest:
    """One HTTP request exactly as its bytes arrived: the head and the body."""

    head: bytes
    body: bytes

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("ascii")

    @property
    def target(self) -> str:
        return self.request_line.split(" ")[1]

    @property
    def headers(self) -> dict[str, str]:
        lines = self.head.decode("latin-1").split("\r\n")[1:]
        pairs = (line.split(":", 1) for line in lines if line)
        return {name.strip().lower(): value.strip() for name, value in pairs}


@dataclass(frozen=True)
class FormPart:
    """One part of a ``multipart/form-data`` body: its header lines as sent, and its data."""

    header_lines: tuple[bytes, ...]
    data: bytes


def form_parts(request: RawRequest) -> list[FormPart]:
    """The parts of the request's multipart body, in the order they were sent; the body
    must be exactly well-formed: each delimiter, the CRLFs and the closing boundary."""
    match = re.search(r"boundary=([^;\s]+)", request.headers["content-type"])
    assert match, request.headers["content-type"]
    delimiter = b"--" + match.group(1).encode()
    body = request.body
    assert body.startswith(delimiter + b"\r\n"), body[:200]
    assert body.endswith(b"\r\n" + delimiter + b"--\r\n"), body[-200:]
    inner = body[len(delimiter) + 2 : -(len(delimiter) + 6)]
    parts = []
    for chunk in inner.split(b"\r\n" + delimiter + b"\r\n"):
        head, _, data = chunk.partition(b"\r\n\r\n")
        parts.append(FormPart(tuple(head.split(b"\r\n")), data))
    return parts


def sent_upload(
    request: RawRequest, service_url: str, job: dict[str, Any], path: str | None
) -> tuple[dict[str, Any], FormPart]:
    """Check a submit as the upstream received it (the URL, ``path`` as a query
    parameter only when given, the job's callback URL, ``metaData`` first as a plain
    field) and return the ``metaData`` it carried and the file part."""
    target = urlsplit(request.target)
    assert target.path == f"{API_PREFIX}/hubs/marketing/bulk/contact"
    assert parse_qs(target.query) == ({"path": [path]} if path else {})
    callback_url = request.headers["elements-async-callback-url"]
    assert callback_url == f"{service_url}/callbacks/jobs/{job['id']}"
    meta, file = form_parts(request)
    assert meta.header_lines == (b'Content-Disposition: form-data; name="metaData"',)
    return json.loads(meta.data), file


class RecordingUpstream:
    """A bare HTTP/1.1 server on loopback that keeps every request's bytes exactly as
    they arrived (no framework parses them first) and answers each with ``answer``.

    ``received`` counts body bytes as they come in, so a test can see an upload arrive
    before its client has sent all of it.
    """

    def __init__(self, answer: Any, status: int = 200) -> None:
        self._answer = json.dumps(answer).encode()
        self._status = status
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.requests: list[RawRequest] = []
        self.received = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def posts(self) -> list[RawRequest]:
        with self._lock:
            return [r for r in self.requests if r.request_line.startswith("POST ")]

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            buffer = b""
            while b"\r\n\r\n" not in buffer:
                if not (data := connection.recv(1 << 16)):
                    return
                buffer += data
            head, _, body = buffer.partition(b"\r\n\r\n")
            length = int(RawRequest(head, b"").headers.get("content-length", "0"))
            with self._lock:
                self.received += len(body)
            pieces = [body]
            while sum(map(len, pieces)) < length:
                if not (data := connection.recv(1 << 16)):
                    return  # cut off before the end: no request, as upstream
                pieces.append(data)
                with self._lock:
                    self.received += len(data)
            with self._lock:
                self.requests.append(RawRequest(head, b"".join(pieces)))
            connection.sendall(
                f"HTTP/1.1 {self._status} Answer\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(self._answer)}\r\nConnection: close\r\n\r\n".encode()
                + self._answer
            )


StartSandbox = Callable[..., RunningSandbox]
StartService = Callable[..., RunningService]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_bulkhook(
    *args: str,
    stdin: bytes = b"",
    timeout: float = 60,
    text: bool = True,
    cwd: Path | None = None,
    **env: str,
) -> subprocess.CompletedProcess[Any]:
    """The ``bulkhook`` command run as a user runs it, without the suite's own ``OC_*`` and
    ``BULKHOOK_*`` settings (``env`` adds some back); output as text unless ``text`` is
    false; in ``cwd`` when given."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("OC_", "BULKHOOK_"))}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        input=stdin if not text else stdin.decode(),
        capture_output=True,
        text=text,
        timeout=timeout,
        env=environment,
        cwd=cwd,
        check=False,
    )


def drained(primary: int) -> bytes:
    """Everything written to a pseudo-terminal until the process on it closes it."""
    drawn = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        drawn += chunk
    return drawn


def serve(cwd: Path, **env: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("OC_", "BULKHOOK_"))}
    environment.update(env)
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--port", str(port)],
        cwd=cwd,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
    except AssertionError:
        process.kill()
        raise
    return process, url


def wait_healthy(
    url: str,
    process: subprocess.Popen[Any] | None = None,
    within: float = 20,
    path: str = "/healthz",
) -> None:
    """Until the server at ``url`` answers ``path`` (the service's ``/healthz``);
    fails if ``process`` (the server's, when given) exits first or ``within`` seconds
    pass."""
    deadline = time.monotonic() + within
    while True:
        if process is not None and process.poll() is not None:
            raise AssertionError("the service exited")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}{path}", timeout=1).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise AssertionError("the service did not start")
        time.sleep(0.05)


def eventually(check: Callable[[], bool], within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not hold in time")
        time.sleep(0.02)


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    """Write a small CSV with the given rows (the first is the header)."""
    path.write_text("".join(",".join(row) + "\r\n" for row in rows), encoding="utf-8")
    return path


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *sorted(cuts), len(data)]
    return [data[start:end] for start, end in itertools.pairwise(edges)]


# Downloads ----------------------------------------------------------------------


def sandbox_result(upstream: RunningSandbox, upstream_id: str, fmt: str) -> bytes:
    """The result file exactly as the sandbox itself writes it."""
    job = upstream.sandbox.jobs[int(upstream_id)]
    return b"".join(upstream.sandbox.result(job, fmt))


def records_of(data: bytes, fmt: str) -> list[dict[str, str]]:
    """A result file's records, each without its empty fields (CSV writes every column,
    JSON only those a record has)."""
    text = data.decode("utf-8")
    if fmt == "csv":
        rows: list[dict[str, str]] = list(csv.DictReader(io.StringIO(text, newline="")))
    elif fmt == "json":
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [{name: value for name, value in row.items() if value != ""} for row in rows]


def metric(text: str, name: str) -> float:
    """One sample of a Prometheus text page (``name`` with its labels), 0 when absent."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# Callbacks ----------------------------------------------------------------------


def signed(body: bytes, webhook_id: str, key: str = SIGNATURE_KEY) -> dict[str, str]:
    """The headers Open Connectors sends with a body signed by ``key`` (the instance's)."""
    return {
        "Content-Type": "application/json",
        "Elements-Webhook-Id": webhook_id,
        "Elements-Webhook-Signature": sign(key, body),
    }


def genuine(job: dict[str, Any], **fields: Any) -> bytes:
    """The body the upstream sends when ``job`` completes: its ids, status and counts."""
    body = {
        "id": job["upstream_id"],
        "status": "COMPLETED",
        "recordsCount": 10,
        "recordsFailedCount": 0,
        "callback-payload": job["id"],
    }
    body.update(fields)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def deliver(
    service: RunningService, path: str, body: bytes, webhook_id: str, key: str = SIGNATURE_KEY
) -> httpx.Response:
    """POST ``body`` to ``path`` as the upstream does, signed with ``key``."""
    return service.http.post(path, content=body, headers=signed(body, webhook_id, key))


def stored_job(service: RunningService, job: Job, upstream_id: str | None = None) -> None:
    """Put ``job`` in the service's database, through a store of its own, as the service
    records a job; with ``upstream_id``, record the upstream's acceptance too."""
    import asyncio

    from service.jobs import Observation, Source
    from service.store import open_store

    async def record() -> None:
        store = open_store(service.settings.database_url)
        await store.open()
        try:
            if upstream_id is None:
                await store.create_job(job)
            else:
                await store.apply(
                    job.id,
                    Observation(Source.SUBMIT, status="CREATED", detail="accepted upstream"),
                    upstream_id=upstream_id,
                )
        finally:
            await store.close()

    asyncio.run(record())


def instance_job(
    service: RunningService, upstream: RunningSandbox, instance: str, file: Path
) -> dict[str, Any]:
    """A job of connector instance ``instance`` submitted to ``upstream`` (that instance's
    sandbox) as the service submits one: its row first, then the upload with the job's
    own callback URL and its id as ``callback-payload``, then the upstream's id
    recorded. Returns the job as the job API shows it."""
    job = make_job(instance=instance, filename=file.name, path=f"/{file.name}")
    stored_job(service, job)
    answer = httpx.post(
        f"{upstream.api_url}/hubs/marketing/bulk/contact",
        data={"metaData": json.dumps({"callback-payload": job.id})},
        files={"file": (file.name, file.read_bytes(), "text/csv")},
        headers={
            "Elements-Async-Callback-Url": f"{service.url}/callbacks/jobs/{job.id}",
            "Authorization": "User user-secret, Organization org-secret, Element element-token",
        },
    )
    assert answer.status_code == 200, answer.text
    stored_job(service, job, upstream_id=str(answer.json()["id"]))
    return job_now(service, job.id)


def job_url(job: dict[str, Any]) -> str:
    return f"/callbacks/jobs/{job['id']}"


def job_now(service: RunningService, job_id: str) -> dict[str, Any]:
    response = service.http.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def essentials(job: dict[str, Any]) -> tuple[Any, ...]:
    """What a callback about another job must never change."""
    return (
        job["state"],
        job["upstream_id"],
        job["records_count"],
        job["records_failed_count"],
        job["upstream_status"],
    )


def refusals(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in job["events"] if e["detail"].startswith("refused:")]


def counted(service: RunningService, outcome: str, instance: str | None = None) -> float:
    """``bulkhook_callbacks_total{outcome=..., instance=...}`` summed over every instance
    (or of ``instance`` only), 0 when never counted."""
    text = service.http.get("/metrics").text
    which = re.escape(instance) if instance is not None else '[^"]*'
    found = re.findall(
        rf'^bulkhook_callbacks_total\{{instance="{which}",outcome="{re.escape(outcome)}"\}} (\S+)$',
        text,
        re.MULTILINE,
    )
    return sum(float(value) for value in found)


# Server-Sent Events ---------------------------------------------------------------


SSE = {"Accept": "text/event-stream"}


def events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, data) for each Server-Sent Event, as they arrive."""
    name, data = "message", ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")
        elif not line and data:
            yield name, json.loads(data)
            name, data = "message", ""


def forged(service: RunningService, job_id: str, marker: str) -> httpx.Response:
    """A callback signed with a key that is not the instance's: refused, and noted."""
    body = json.dumps({"status": "ERROR", "marker": marker}).encode()
    response: httpx.Response = service.http.post(
        f"/callbacks/jobs/{job_id}",
        content=body,
        headers={
            "Elements-Webhook-Signature": sign("not-the-instance-key", body),
            "Elements-Webhook-Id": f"forged-{marker}",
        },
    )
    return response


# Jobs and errors ------------------------------------------------------------------


def make_job(**changes: object) -> Job:
    now = time.time()
    fields: dict[str, object] = {
        "id": new_job_id(),
        "hub": "marketing",
        "object": "contact",
        "path": "/contacts.csv",
        "state": State.SUBMITTING,
        "created_at": now,
        "updated_at": now,
        "last_source": "submit",
        "filename": "contacts.csv",
        "rows": 10,
    }
    fields.update(changes)
    return Job(**fields)  # type: ignore[arg-type]


def download_job(**changes: object) -> Job:
    """``make_job`` for a download: a query and a result format, no file."""
    return make_job(
        direction="download",
        query="select * from contact",
        format="jsonl",
        path=None,
        filename=None,
        rows=None,
        **changes,
    )


def assert_error(response, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def upstream_error_shown(service: RunningService, job_id: str) -> str | None:
    """The upstream's message as the job page shows it (unescaped); None when absent."""
    page = service.http.get(f"/ui/jobs/{job_id}")
    assert page.status_code == 200, page.text
    found = re.search(r'<dd class="upstream-error">(.*?)</dd>', page.text, re.DOTALL)
    return html.unescape(found.group(1)) if found else None


def assert_failure_shown(service: RunningService, job_id: str, message: str, source: str) -> None:
    """A job the upstream failed as a whole is ABORTED with the upstream's ``message``
    wherever a user looks: the job API, its timeline (the entry from ``source``), the
    dashboard's job page and ``bulkhook status``."""
    job = job_now(service, job_id)
    assert (job["state"], job["upstream_error"], job["last_source"]) == ("ABORTED", message, source)
    assert job["succeeded"] is False
    assert any(
        (event["source"], event["state"]) == (source, "ABORTED") and message in event["detail"]
        for event in job["events"]
    ), job["events"]
    assert upstream_error_shown(service, job_id) == message
    shown = run_bulkhook("status", job_id, "--url", service.url)
    assert shown.returncode == 0, shown.stderr
    first, second, *timeline = shown.stdout.splitlines()
    assert first.startswith(f"job {job_id}  ABORTED  ")
    assert second == f"  upstream error: {message}"
    assert any("ABORTED" in line and message in line for line in timeline), shown.stdout


# Connector instances --------------------------------------------------------------


@dataclass
class TwoInstances:
    """One service with ``OC_INSTANCES=crm,shop``, each instance on a sandbox of its
    own (its own process-level server, signature key and credentials)."""

    service: RunningService
    crm: RunningSandbox
    shop: RunningSandbox


def _authorization(user: str, org: str, element: str) -> str:
    return f"User {user}, Organization {org}, Element {element}"


def two_instance_settings(crm: RunningSandbox, shop: RunningSandbox) -> dict[str, Any]:
    """Settings overrides for ``start_service(crm, ...)``: crm is the default instance
    (the unnamed OC_BASE_URL and credentials), shop has its own URL, credentials and
    hub; each has its own key."""
    return {
        "oc_instances": ("crm", "shop"),
        "instance_env": {
            "OC_CRM_SIGNATURE_KEYS": CRM_KEY,
            "OC_SHOP_BASE_URL": shop.api_url,
            "OC_SHOP_SIGNATURE_KEYS": SHOP_KEY,
            "OC_SHOP_HUB": "crm",
            **SHOP_SECRETS,
        },
    }


def start_two_instances(
    start_sandbox: StartSandbox,
    start_service: StartService,
    sandbox: dict[str, Any] | None = None,
    **overrides: Any,
) -> TwoInstances:
    """Two sandboxes that each accept only their own instance's credentials, and one
    service configured with both; ``sandbox`` options go to both sandboxes."""
    options = sandbox or {}
    crm = start_sandbox(
        signature_key=CRM_KEY,
        authorization=_authorization("user-secret", "org-secret", "element-token"),
        **options,
    )
    shop = start_sandbox(
        signature_key=SHOP_KEY,
        authorization=_authorization(*SHOP_SECRETS.values()),
        **options,
    )
    service = start_service(crm, **two_instance_settings(crm, shop), **overrides)
    return TwoInstances(service, crm, shop)
