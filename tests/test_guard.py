"""Attacks from a browser and from guessers: cross-site changes, DNS rebinding, anonymous
fault injection into the embedded sandbox, and token guessing. Each is performed
against a real service and judged by what the attacker gets and what changed."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from service.api.guard import ServedHosts, Tokens, cross_site, split_host
from service.callbacks.signatures import sign
from service.config import ConfigError, Settings
from service.errors import ApiError
from service.logs import Repeats
from service.metrics import Metrics
from service.openapi.jobs import openapi_spec

from .helpers import (
    SIGNATURE_KEY,
    RunningSandbox,
    RunningService,
    StartSandbox,
    StartService,
    free_port,
    wait_healthy,
)

TOKEN = "guard-test-token"
EVIL = "https://evil.example"
# What a browser adds to a request another site's page makes.
CROSS_SITE_MARKS: list[dict[str, str]] = [
    {"Origin": EVIL},
    {"Origin": EVIL, "Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
    {"Origin": "null"},
]
FOREIGN_HOSTS = [
    "evil.example",
    "evil.example:80",
    "127.0.0.1.evil.example",
    "localhost.evil.example",
    "evil.localhost",
    "[::1",
    "",
]


def upstream_calls(upstream: RunningSandbox) -> dict[str, int]:
    """What the upstream saw, asked over HTTP like any other client would."""
    stats = httpx.get(f"{upstream.url}/_sandbox/stats", timeout=10).json()
    return stats["calls"]  # type: ignore[no-any-return]


def auth_failures(service: RunningService) -> dict[tuple[str, str], float]:
    """bulkhook_auth_failures_total by (where, outcome), read from /metrics."""
    found = {}
    for line in service.http.get("/metrics").text.splitlines():
        if line.startswith("bulkhook_auth_failures_total{"):
            labels, value = line.removeprefix("bulkhook_auth_failures_total").split(" ")
            named = dict(re.findall(r'(\w+)="(\w+)"', labels))
            found[named["where"], named["outcome"]] = float(value)
    return found


def client_from(service: RunningService, address: str, **headers: str) -> httpx.Client:
    """A client whose connections come from another loopback address: another client."""
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=service.url, transport=transport, headers=headers, timeout=30)


def raw_request(service: RunningService, request: bytes) -> bytes:
    """Send bytes as they are (no client adds a Host) and read the whole answer."""
    with socket.create_connection((service.server.host, service.server.port), 10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def submit_with(service: RunningService, csv: Path, headers: dict[str, str]) -> httpx.Response:
    return service.submit(csv, headers=headers)  # type: ignore[no-any-return]


@pytest.fixture
def quiet_upstream(start_sandbox: StartSandbox) -> RunningSandbox:
    """An upstream whose jobs run long and never call back: nothing changes by itself."""
    return start_sandbox(drop_callbacks=1.0, job_seconds=60)


# --- Cross-site requests ---------------------------------------------------------------


def test_a_cross_site_submit_is_refused_and_nothing_reaches_the_upstream(
    quiet_upstream: RunningSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    service = start_service(quiet_upstream, callback_grace=60)
    port = service.server.port
    marks = [*CROSS_SITE_MARKS, {"Origin": f"http://127.0.0.1:{port + 1}"}]
    for headers in marks:
        refused = submit_with(service, contacts_csv, headers)
        assert refused.status_code == 403, (headers, refused.text)
        assert refused.json()["error"]["code"] == "cross_origin"
    assert upstream_calls(quiet_upstream).get("submit", 0) == 0
    assert service.http.get("/jobs").json()["jobs"] == []
    assert service.query("SELECT COUNT(*) FROM jobs") == [(0,)]

    # The dashboard's own page (same origin) and a script (no browser headers) pass.
    same_origin = {"Origin": service.url, "Sec-Fetch-Site": "same-origin"}
    assert submit_with(service, contacts_csv, same_origin).status_code == 202
    assert submit_with(service, contacts_csv, {"Sec-Fetch-Site": "none"}).status_code == 202
    assert service.submit(contacts_csv).status_code == 202
    assert upstream_calls(quiet_upstream)["submit"] == 3


def test_cross_site_cancel_refresh_and_login_change_nothing(
    quiet_upstream: RunningSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    service = start_service(quiet_upstream, callback_grace=60)
    job = service.submit(contacts_csv).json()
    before = service.http.get(f"/jobs/{job['id']}").json()
    calls = upstream_calls(quiet_upstream)
    for headers in CROSS_SITE_MARKS:
        for path in (
            f"/jobs/{job['id']}/cancel",
            f"/jobs/{job['id']}/refresh",
            f"/ui/jobs/{job['id']}/cancel",
            f"/ui/jobs/{job['id']}/refresh",
            "/ui/logout",
        ):
            refused = service.http.post(path, headers=headers)
            assert refused.status_code == 403, (path, headers, refused.text)
            assert refused.json()["error"]["code"] == "cross_origin"
        for method in ("PUT", "PATCH", "DELETE"):
            assert service.http.request(method, "/jobs", headers=headers).status_code == 403
    assert service.http.get(f"/jobs/{job['id']}").json() == before
    assert upstream_calls(quiet_upstream) == calls

    cancelled = service.http.post(f"/jobs/{job['id']}/cancel", headers={"Origin": service.url})
    assert cancelled.status_code == 200, cancelled.text
    assert upstream_calls(quiet_upstream)["cancel"] == 1


def test_behind_a_tls_proxy_the_dashboards_own_origin_passes(
    quiet_upstream: RunningSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    service = start_service(quiet_upstream, callback_grace=60, allowed_hosts=("ops.example",))
    job = service.submit(contacts_csv).json()
    # The proxy passes the browser's Host; https has no port in either.
    proxied = {"Host": "ops.example", "Origin": "https://ops.example"}
    answer = service.http.post(f"/ui/jobs/{job['id']}/refresh", headers=proxied)
    assert answer.status_code == 200, answer.text
    other_port = {"Host": "ops.example", "Origin": "https://ops.example:8443"}
    assert service.http.post(f"/ui/jobs/{job['id']}/refresh", headers=other_port).status_code == 403


# --- DNS rebinding and the Host check ----------------------------------------------------


def test_a_rebinding_page_cannot_read_jobs(
    quiet_upstream: RunningSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    service = start_service(quiet_upstream, callback_grace=60)
    job = service.submit(contacts_csv).json()
    for host in FOREIGN_HOSTS:
        for path in ("/jobs", f"/jobs/{job['id']}", "/", f"/ui/jobs/{job['id']}", "/metrics"):
            answer = service.http.get(path, headers={"Host": host})
            assert answer.status_code == 421, (host, path, answer.text)
            assert answer.json()["error"]["code"] == "host_not_allowed"
            assert job["id"] not in answer.text
            assert str(job["upstream_id"]) not in answer.text
        # Refused before the route: nothing is submitted either.
        assert submit_with(service, contacts_csv, {"Host": host}).status_code == 421
    assert upstream_calls(quiet_upstream)["submit"] == 1


def test_loopback_the_public_host_and_allowed_hosts_are_served(
    quiet_upstream: RunningSandbox, start_service: StartService
) -> None:
    service = start_service(
        quiet_upstream,
        public_url="https://bulkhook.example.com",
        allowed_hosts=("api.internal.example", "*.corp.example"),
    )
    port = service.server.port
    served = [
        f"127.0.0.1:{port}",
        "127.0.0.1",
        "127.8.9.10:1234",
        "localhost",
        "LocalHost:9",
        "localhost.",
        "[::1]:8000",
        "[::ffff:127.0.0.1]",
        "bulkhook.example.com",
        "BULKHOOK.example.com:443",
        "api.internal.example:8080",
        "ops.corp.example",
        "a.b.corp.example",
    ]
    for host in served:
        answer = service.http.get("/jobs", headers={"Host": host})
        assert answer.status_code == 200, (host, answer.text)
        assert answer.json() == {"jobs": [], "next_cursor": None}
    for host in [
        "corp.example",
        "evilcorp.example",
        "bulkhook.example.com.evil.example",
        "10.0.0.5",
    ]:
        assert service.http.get("/jobs", headers={"Host": host}).status_code == 421, host


def test_a_service_bound_to_a_name_serves_that_name(
    quiet_upstream: RunningSandbox, start_service: StartService
) -> None:
    service = start_service(quiet_upstream, bind_host="bulkhook.lan")
    assert service.http.get("/jobs", headers={"Host": "bulkhook.lan:8000"}).status_code == 200
    assert service.http.get("/jobs", headers={"Host": "other.lan"}).status_code == 421


def test_callbacks_and_probes_answer_under_any_host(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    upstream = start_sandbox(drop_callbacks=1.0, job_seconds=0.2)
    service = start_service(upstream, callback_grace=60)
    job = service.submit(contacts_csv).json()
    foreign = {"Host": "proxy-internal.example", "Origin": EVIL, "Sec-Fetch-Site": "cross-site"}
    for path in ("/healthz", "/readyz"):
        assert service.http.get(path, headers={"Host": "10.244.1.7:8000"}).status_code == 200
    unsigned = service.http.post("/callbacks", content=b"{}", headers=foreign)
    assert unsigned.status_code == 401
    assert unsigned.json()["error"]["code"] == "bad_signature"  # reached the signature check
    assert service.http.get("/callbacks", headers=foreign).status_code == 405
    assert service.http.get(f"/callbacks/jobs/{job['id']}", headers=foreign).status_code == 405
    # A path that is no callback URL is served under this service's hosts only: no
    # redirect is built from a stranger's Host.
    for near in ("/callbacks/", "/callbacks/jobs/", "/callbacks/jobs/a/b"):
        answer = service.http.post(near, content=b"{}", headers=foreign)
        assert answer.status_code == 421, (near, answer.status_code, answer.headers)
        assert "location" not in answer.headers

    # The upstream finished the job but its callback got lost; the proxy redelivers it
    # under a Host of its own.
    upstream_job = upstream.sandbox.find_job("marketing", str(job["upstream_id"]))
    assert upstream_job is not None
    deadline = time.monotonic() + 10
    while upstream_job.status != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(0.05)
    body = upstream.sandbox.callback_body(upstream_job)
    delivered = service.http.post(
        f"/callbacks/jobs/{job['id']}",
        content=body,
        headers={
            **foreign,
            "Content-Type": "application/json",
            "Elements-Webhook-Id": "w-foreign-host",
            "Elements-Webhook-Signature": sign(SIGNATURE_KEY, body),
        },
    )
    assert delivered.status_code == 200, delivered.text
    done = service.http.get(f"/jobs/{job['id']}").json()
    assert done["state"] == "COMPLETED"
    assert done["last_source"] == "callback"


def test_a_request_without_host_is_taken_for_the_bound_address(
    quiet_upstream: RunningSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    service = start_service(quiet_upstream, callback_grace=60)
    job = service.submit(contacts_csv).json()
    answer = raw_request(service, b"GET /jobs HTTP/1.0\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert [listed["id"] for listed in json.loads(body)["jobs"]] == [job["id"]]


@pytest.fixture
def served_on_every_address(tmp_path: Path) -> Iterator[str]:
    """``bulkhook serve --host 0.0.0.0`` in its own process, with a token; its URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OC_", "BULKHOOK_"))}
    env.update(BULKHOOK_API_TOKENS=TOKEN, BULKHOOK_DATABASE_URL=f"sqlite:///{tmp_path}/b.db")
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--host", "0.0.0.0", "--port", str(port)],  # noqa: S104
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(30)


def test_bound_to_every_address_ip_hosts_are_served_but_foreign_names_are_not(
    served_on_every_address: str,
) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=served_on_every_address, headers=auth, timeout=10) as http:
        for host in ["10.1.2.3:8000", "192.0.2.7", "[fd00::17]:8000", "localhost:8000"]:
            assert http.get("/jobs", headers={"Host": host}).status_code == 200, host
        refused = http.get("/jobs", headers={"Host": "evil.example"})
        assert refused.status_code == 421
        assert refused.json()["error"]["code"] == "host_not_allowed"


# --- The embedded sandbox's control routes ---------------------------------------------


def test_with_tokens_the_sandbox_control_routes_take_no_anonymous_faults(
    start_service: StartService, contacts_csv: Path
) -> None:
    service = start_service(None, api_tokens=(TOKEN,))  # embedded: the sandbox is mounted
    fault = {"operation": "submit", "status": 500, "times": 5}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic Zm9vOmJhcg=="}):
        refused = service.http.post("/sandbox/_sandbox/faults", json=fault, headers=headers)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "unauthorized"
        assert service.http.get("/sandbox/_sandbox/stats", headers=headers).status_code == 401
        assert service.http.get("/sandbox/_sandbox/anything", headers=headers).status_code == 401
    # Only a bearer token is a guess: three "Bearer wrong", counted; the rest carry none.
    assert auth_failures(service) == {("sandbox", "wrong"): 3.0}

    authorized = {"Authorization": f"Bearer {TOKEN}"}
    # No fault was installed: the submit reaches the embedded upstream and is accepted,
    # through the sandbox's own Authorization scheme with the instance's credentials.
    accepted = service.submit(contacts_csv, headers=authorized)
    assert accepted.status_code == 202, accepted.text
    assert service.http.get("/objects", headers=authorized).status_code == 200
    stats = service.http.get("/sandbox/_sandbox/stats", headers=authorized)
    assert stats.status_code == 200
    assert stats.json()["calls"]["submit"] == 1

    # With the token the same fault is installed, and it bites: the gate was the token.
    installed = service.http.post("/sandbox/_sandbox/faults", json=fault, headers=authorized)
    assert installed.status_code == 200
    assert service.submit(contacts_csv, headers=authorized).status_code == 502


# --- Guessing tokens ---------------------------------------------------------------------


def test_a_client_guessing_api_tokens_is_slowed_and_others_are_not(
    quiet_upstream: RunningSandbox,
    start_service: StartService,
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = start_service(quiet_upstream, api_tokens=(TOKEN,))
    caplog.set_level(logging.WARNING, logger="bulkhook")
    answers = [
        service.http.get("/jobs", headers={"Authorization": f"Bearer guess-{n:02d}"})
        for n in range(20)
    ]
    assert [a.status_code for a in answers] == [401] * 10 + [429] * 10
    for answer in answers[10:]:
        assert answer.json()["error"]["code"] == "too_many_attempts"
        assert 1 <= int(answer.headers["retry-after"]) <= 60
    # While slowed, even the right token is not checked from that client...
    same_client = service.http.get("/jobs", headers={"Authorization": f"Bearer {TOKEN}"})
    assert same_client.status_code == 429
    # ... but another client with the right token is served at once.
    with client_from(service, "127.0.0.2", Authorization=f"Bearer {TOKEN}") as other:
        assert other.get("/jobs").status_code == 200
        wrong_once = other.get("/jobs", headers={"Authorization": "Bearer nope"})
        assert wrong_once.status_code == 401

    assert auth_failures(service) == {("api", "wrong"): 11.0, ("api", "throttled"): 11.0}
    lines = [r.getMessage() for r in caplog.records if r.name == "bulkhook"]
    assert 1 <= len([line for line in lines if "wrong token" in line]) <= 2
    assert len(lines) <= 4, lines
    assert not any("guess-" in line or TOKEN in line for line in lines)


def test_a_client_guessing_dashboard_logins_is_slowed_and_others_are_not(
    quiet_upstream: RunningSandbox, start_service: StartService
) -> None:
    service = start_service(quiet_upstream, api_tokens=(TOKEN,))
    with client_from(service, "127.0.0.3") as guesser:
        answers = [
            guesser.post("/ui/login", data={"token": f"guess-{n}", "next": "/"}) for n in range(12)
        ]
    assert [a.status_code for a in answers] == [401] * 10 + [429] * 2
    assert "That token is not valid." in answers[0].text
    assert "Too many wrong tokens" in answers[-1].text
    assert 1 <= int(answers[-1].headers["retry-after"]) <= 60
    assert all("set-cookie" not in a.headers for a in answers)
    with client_from(service, "127.0.0.4") as operator:
        login = operator.post("/ui/login", data={"token": TOKEN, "next": "/"})
        assert login.status_code == 303
        assert "bulkhook_token=" in login.headers["set-cookie"]
        assert operator.get("/").status_code == 200
    assert auth_failures(service) == {("dashboard", "wrong"): 10.0, ("dashboard", "throttled"): 2.0}


def _scope(address: str) -> dict[str, Any]:
    return {"client": (address, 50000)}


def _tokens(clock: list[float], **limits: Any) -> tuple[Tokens, Metrics]:
    metrics = Metrics()
    repeats = Repeats(logging.getLogger("bulkhook.test"), clock=lambda: clock[0])
    return Tokens((TOKEN, "second"), metrics, repeats, clock=lambda: clock[0], **limits), metrics


def test_the_slowdown_ends_with_its_window() -> None:
    clock = [1000.0]
    tokens, _ = _tokens(clock, attempts=3, window=60.0)
    for _ in range(3):
        assert tokens.check("wrong", _scope("192.0.2.1"), "api") is False
    with pytest.raises(ApiError) as slowed:
        tokens.check(TOKEN, _scope("192.0.2.1"), "api")
    assert slowed.value.status == 429
    assert slowed.value.headers == {"Retry-After": "60"}
    clock[0] += 45
    with pytest.raises(ApiError) as later:
        tokens.check(TOKEN, _scope("192.0.2.1"), "api")
    assert later.value.headers == {"Retry-After": "15"}
    clock[0] += 15
    assert tokens.check(TOKEN, _scope("192.0.2.1"), "api") is True
    assert tokens.check("second", _scope("192.0.2.1"), "api") is True
    assert tokens.check("", _scope("192.0.2.1"), "api") is False  # no token: no attempt


def test_the_client_table_is_bounded_and_ipv6_clients_count_by_their_64() -> None:
    clock = [0.0]
    tokens, metrics = _tokens(clock, attempts=2, clients=3)
    for address in ("2001:db8::1", "2001:db8::2"):  # one /64: one client
        tokens.check("wrong", _scope(address), "api")
    with pytest.raises(ApiError):
        tokens.check(TOKEN, _scope("2001:db8::ffff"), "api")
    assert tokens.check(TOKEN, _scope("2001:db8:0:1::1"), "api") is True  # another /64
    for address in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):  # push the /64 out
        tokens.check("wrong", _scope(address), "api")
    assert tokens.check(TOKEN, _scope("2001:db8::1"), "api") is True
    wrong = {"where": "api", "outcome": "wrong"}
    assert metrics.registry.get_sample_value("bulkhook_auth_failures_total", wrong) == 5


# --- The rules themselves ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "fetch_site", "origin", "host", "refused"),
    [
        ("POST", None, None, "127.0.0.1:8000", False),
        ("POST", "same-origin", "http://127.0.0.1:8000", "127.0.0.1:8000", False),
        ("POST", "none", None, "127.0.0.1:8000", False),
        ("POST", "cross-site", None, "127.0.0.1:8000", True),
        ("DELETE", "Same-Site", None, "127.0.0.1:8000", True),
        ("POST", None, "null", "127.0.0.1:8000", True),
        ("POST", None, "http://127.0.0.1:8001", "127.0.0.1:8000", True),
        ("POST", None, "http://localhost:8000", "127.0.0.1:8000", True),
        ("POST", None, "https://ops.example", "ops.example", False),
        ("POST", None, "https://ops.example", "ops.example:443", False),
        ("POST", None, "http://ops.example", "ops.example:443", True),
        ("PUT", None, "https://evil.example", "ops.example", True),
        ("POST", None, "chrome-extension://abc", "127.0.0.1:8000", True),
        ("POST", None, "http://[::1]:8000", "[::1]:8000", False),
        ("POST", None, "http://127.0.0.1:8000", None, True),
        ("GET", "cross-site", EVIL, "127.0.0.1:8000", False),
        ("HEAD", None, "null", "127.0.0.1:8000", False),
    ],
)
def test_which_requests_count_as_cross_site(
    method: str, fetch_site: str | None, origin: str | None, host: str | None, refused: bool
) -> None:
    assert cross_site(method, fetch_site, origin, host) is refused


@given(host=st.text(max_size=40), origin=st.text(max_size=40))
@example(host="[", origin="http://[")
@example(host="a:99999", origin="http://a:99999")
@example(host="\x00", origin="http://\udcff")
def test_any_host_or_origin_text_gets_an_answer_never_an_error(host: str, origin: str) -> None:
    hosts = ServedHosts(Settings(allowed_hosts=("*.corp.example",), bind_host="0.0.0.0"))  # noqa: S104
    assert isinstance(hosts.serves(host), bool)
    assert isinstance(cross_site("POST", None, origin, host), bool)
    parts = split_host(host)
    assert parts is None or (parts[0] == parts[0].lower() and parts[0])


@pytest.mark.parametrize(
    ("bind", "served", "refused"),
    [
        ("0.0.0.0", ["10.1.2.3:8000", "[fd00::1]"], ["evil.example"]),  # noqa: S104
        ("::", ["10.1.2.3", "[fd00::1]:8000"], ["evil.example"]),
        ("[::]", ["10.1.2.3"], ["evil.example"]),
        ("192.0.2.7", ["192.0.2.7:8000"], ["192.0.2.8", "evil.example"]),
        ("fd00::7", ["[fd00::7]:8000", "[FD00:0::7]"], ["[fd00::8]"]),
        ("Bulkhook.LAN", ["bulkhook.lan:8000"], ["lan", "evil.example"]),
    ],
)
def test_the_bound_address_is_served(bind: str, served: list[str], refused: list[str]) -> None:
    hosts = ServedHosts(Settings(bind_host=bind))
    for host in [*served, "localhost:8000", "127.0.0.1"]:
        assert hosts.serves(host), (bind, host)
    for host in refused:
        assert not hosts.serves(host), (bind, host)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("api.example.com", ("api.example.com",)),
        (" API.Example.com. , *.corp.example ", ("api.example.com", "*.corp.example")),
        ("10.0.0.5,[::1],FD00::1", ("10.0.0.5", "::1", "fd00::1")),
        ("*", ("*",)),
    ],
)
def test_allowed_hosts_are_read_from_the_environment(
    raw: str, expected: tuple[str, ...], tmp_path: Path
) -> None:
    settings = Settings.from_env({"BULKHOOK_ALLOWED_HOSTS": raw}, env_file=tmp_path / "none")
    assert settings.allowed_hosts == expected


@pytest.mark.parametrize(
    "raw", ["https://api.example.com", "api.example.com:8443", "a/b", "a..b", "foo.*.example"]
)
def test_an_allowed_host_that_is_not_a_host_stops_start_up(raw: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="BULKHOOK_ALLOWED_HOSTS"):
        Settings.from_env({"BULKHOOK_ALLOWED_HOSTS": raw}, env_file=tmp_path / "none")


def test_the_api_description_lists_what_the_guard_answers() -> None:
    paths = openapi_spec()["paths"]
    assert "host_not_allowed" in paths["/jobs"]["get"]["responses"]["421"]["description"]
    assert "cross_origin" in paths["/jobs"]["post"]["responses"]["403"]["description"]
    assert "too_many_attempts" in paths["/jobs"]["post"]["responses"]["429"]["description"]
    assert "Retry-After" in paths["/jobs/{job_id}"]["get"]["responses"]["429"]["headers"]
    for open_path in ("/callbacks", "/callbacks/jobs/{job_id}", "/healthz", "/readyz"):
        for operation in paths[open_path].values():
            assert not {"421", "403", "429"} & operation["responses"].keys(), open_path
    assert "429" not in paths["/metrics"]["get"]["responses"]  # no token, nothing to guess
