"""The operator dashboard over real HTTP: pages, filters, failed records, the login,
the callbacks panel and the live event stream (on SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import logging
import re
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.dashboard import live

from .helpers import (
    SSE,
    RunningSandbox,
    RunningService,
    events,
    forged,
    make_job,
    serve,
    upstream_error_shown,
    write_csv,
)

TOKEN = "dashboard-test-token"


@pytest.fixture
def bad_csv(tmp_path: Path) -> Path:
    """Three contacts; the second has an invalid email, the third none: two fail."""
    return write_csv(
        tmp_path / "contacts-bad.csv",
        [
            ["FirstName", "LastName", "Email"],
            ["Ada", "Lovelace", "ada@example.com"],
            ["Bad", "Address", "not-an-email"],
            ["No", "Address", ""],
        ],
    )


def completed(service: RunningService, csv: Path, **headers: str) -> dict[str, Any]:
    submitted = service.submit(csv, headers=headers)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        job = service.http.get(f"/jobs/{job_id}", headers=headers).json()
        if job["state"] == "COMPLETED":
            return job  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not complete")


def test_pages_render_the_jobs_table_and_the_job_page(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    bad_csv: Path,
) -> None:
    service = start_service(start_sandbox())
    job = completed(service, bad_csv)
    page = service.http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    assert f'id="job-{job["id"]}"' in html
    assert '<span class="badge partial">COMPLETED</span>' in html  # 2 of 3 failed
    assert '<td class="num failed">2</td>' in html
    assert '<td class="source">callback</td>' in html
    assert 'data-outcome="accepted"' in html  # the callbacks panel
    detail = service.http.get(f"/ui/jobs/{job['id']}")
    assert detail.status_code == 200
    for needle in ("received contacts-bad.csv (3 rows)", "verified", "Timeline"):
        assert needle in detail.text, needle
    assert detail.text.count('class="event callback"') == 1
    assert 'data-action="cancel" class="danger" disabled' in detail.text  # terminal
    missing = service.http.get("/ui/jobs/nope")
    assert missing.status_code == 404
    assert "No such job" in missing.text
    static = service.http.get("/ui/static/dashboard.js")
    assert static.status_code == 200
    assert "EventSource" in static.text


def test_the_job_page_shows_the_path_or_that_none_was_given(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    service = start_service(start_sandbox())
    without = service.submit(contacts_csv).json()
    given = service.submit(contacts_csv, path="/imports/c.csv").json()
    pages = [service.http.get(f"/ui/jobs/{job['id']}").text for job in (without, given)]
    assert '<dt>Path</dt><dd class="mono">\u2013</dd>' in pages[0]  # an en dash
    assert '<dt>Path</dt><dd class="mono">/imports/c.csv</dd>' in pages[1]
    assert ">None<" not in pages[0]


def test_the_job_page_writes_times_in_utc_and_counts_in_words(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    tmp_path: Path,
) -> None:
    # Every callback lost: the job finishes by polling, and each poll names its due time.
    service = start_service(start_sandbox(drop_callbacks=1.0), callback_grace=0.2)
    job = completed(service, write_csv(tmp_path / "one.csv", [["Email"], ["ada@example.com"]]))
    page = service.http.get(f"/ui/jobs/{job['id']}")
    assert page.status_code == 200
    text = html.unescape(re.sub(r"<[^>]+>", " ", page.text))
    assert "(1 row uploaded)" in text
    assert "received one.csv (1 row)" in text
    assert re.search(r"poll due \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text)
    assert "1 record, 0 failed" in text
    assert not re.search(r"\b\d{10}\.\d+", text), "a raw epoch"
    assert "1 records" not in text and "1 rows" not in text


def test_the_upstream_error_of_a_failed_job_is_shown_escaped_on_its_page_and_stream(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    message = "<img src=x onerror=alert(1)> & 'quoted'\nsecond line"
    service = start_service(start_sandbox(fail_whole=1.0, fail_whole_message=message))
    job = service.submit(contacts_csv).json()
    done = service.wait_for(job["id"], {"ABORTED"})
    assert done["upstream_error"] == message
    page = service.http.get(f"/ui/jobs/{job['id']}")
    assert "<img" not in page.text
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; &#39;quoted&#39;" in page.text
    assert upstream_error_shown(service, job["id"]) == message
    assert '<span id="state" class="badge bad">ABORTED</span>' in page.text
    with service.http.stream("GET", "/ui/stream", params={"job": job["id"]}, headers=SSE) as stream:
        name, data = next(events(stream))
    assert (name, data["job"]["upstream_error"]) == ("job", message)
    assert "<img" not in data["detail"]
    assert "&lt;img src=x onerror=alert(1)&gt;" in data["detail"]


def test_the_table_filters_by_state_and_searches_by_id(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    service = start_service(start_sandbox(job_seconds=60, drop_callbacks=1.0), callback_grace=60)
    first = service.submit(contacts_csv).json()
    second = service.submit(contacts_csv).json()
    cancelled = service.http.post(f"/jobs/{first['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    state = cancelled.json()["state"]

    def rows(**params: str) -> set[str]:
        page = service.http.get("/", params=params)
        assert page.status_code == 200
        return {job_id for job_id in (first["id"], second["id"]) if f"job-{job_id}" in page.text}

    assert rows() == {first["id"], second["id"]}
    assert rows(state=state) == {first["id"]}
    assert rows(state="created") == {second["id"]}
    assert rows(state="COMPLETED") == set()
    assert rows(q=second["id"]) == {second["id"]}
    assert rows(q=first["upstream_id"]) == {first["id"]}
    a, b = first["id"], second["id"]
    common = next(a[:n] for n in range(len(a), 0, -1) if b.startswith(a[:n]))
    assert rows(q=common) == {first["id"], second["id"]}
    assert rows(q="%") == set()  # not a wildcard: a bad search, explained
    assert "Search by a job id" in service.http.get("/", params={"q": "%"}).text
    assert rows(q="0_") == set()  # "_" matches itself only


def test_failed_records_download_as_csv(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    bad_csv: Path,
) -> None:
    service = start_service(start_sandbox())
    job = completed(service, bad_csv)
    download = service.http.get(f"/ui/jobs/{job['id']}/failed.csv")
    assert download.status_code == 200
    assert download.headers["content-type"].startswith("text/csv")
    disposition = download.headers["content-disposition"]
    assert disposition == f'attachment; filename="bulkhook-{job["id"]}-failed.csv"'
    lines = download.text.splitlines()
    assert lines[0] == "lineNumber,errorMessage,FirstName,LastName,Email"
    assert lines[1].startswith("3,") and lines[1].endswith(",Bad,Address,not-an-email")
    assert lines[2].startswith("4,") and lines[2].endswith(",No,Address,")
    assert len(lines) == 3
    fragment = service.http.get(f"/ui/jobs/{job['id']}/failed")
    assert "2 failed records" in fragment.text
    assert "not-an-email" in fragment.text
    missing = service.http.get("/ui/jobs/nope/failed.csv")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "job_not_found"


def test_the_dashboard_asks_for_a_token_and_keeps_it_in_an_httponly_cookie(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    bad_csv: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    service = start_service(start_sandbox(), api_tokens=("another-token", TOKEN))
    job = completed(service, bad_csv, Authorization=f"Bearer {TOKEN}")
    anonymous = httpx.Client(base_url=service.url, timeout=10)
    for path in ("/", f"/ui/jobs/{job['id']}"):
        refused = anonymous.get(path)
        assert refused.status_code == 401
        assert 'action="/ui/login"' in refused.text
        assert job["id"] not in refused.text.replace(f'value="/ui/jobs/{job["id"]}"', "")
    for path in ("/ui/callbacks", "/ui/stream", f"/ui/jobs/{job['id']}/failed.csv"):
        refused = anonymous.get(path, headers=SSE)
        assert refused.status_code == 401, path
        assert refused.json()["error"]["code"] == "unauthorized"
    assert anonymous.post(f"/ui/jobs/{job['id']}/refresh").status_code == 401

    wrong = anonymous.post("/ui/login", data={"token": TOKEN + "x", "next": "/"})
    assert wrong.status_code == 401
    assert "That token is not valid." in wrong.text
    assert TOKEN not in wrong.text
    assert "set-cookie" not in wrong.headers
    cross_site = anonymous.post(
        "/ui/login", data={"token": TOKEN}, headers={"Origin": "http://evil.example"}
    )
    assert cross_site.status_code == 403
    login = anonymous.post("/ui/login", data={"token": TOKEN, "next": "//evil.example/x"})
    assert login.status_code == 303
    assert login.headers["location"] == "/"  # never another site
    cookie = login.headers["set-cookie"]
    assert cookie.startswith(f"bulkhook_token={TOKEN};")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie

    # The cookie opens the dashboard's pages and its JSON, CSV and stream routes...
    page = anonymous.get("/")
    assert page.status_code == 200
    assert f"job-{job['id']}" in page.text
    assert TOKEN not in page.text
    assert anonymous.get(f"/ui/jobs/{job['id']}").status_code == 200
    assert anonymous.get("/ui/callbacks").status_code == 200
    assert anonymous.get(f"/ui/jobs/{job['id']}/failed.csv").status_code == 200
    refreshed = anonymous.post(f"/ui/jobs/{job['id']}/refresh")
    assert refreshed.status_code == 200, refreshed.text
    assert refreshed.json()["state"] == "COMPLETED"
    # ... but not the job API, which takes bearer tokens only.
    assert anonymous.get("/jobs").status_code == 401
    # A bearer token works on the dashboard's data routes too.
    bearer = service.http.get("/ui/callbacks", headers={"Authorization": f"Bearer {TOKEN}"})
    assert bearer.status_code == 200

    logout = anonymous.post("/ui/logout")
    assert logout.status_code == 303
    assert "bulkhook_token=" in logout.headers["set-cookie"]
    assert anonymous.get("/").status_code == 401
    anonymous.close()
    # Never logged by the service (the test's own HTTP client logs headers at DEBUG).
    served = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    assert served
    assert not [r for r in served if TOKEN in r.getMessage()]


def test_refused_callbacks_show_in_the_panel_and_the_timeline_without_bodies(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    service = start_service(start_sandbox(), max_callback_bytes=1024)
    job = completed(service, contacts_csv)
    assert forged(service, job["id"], "SECRET-BODY-1").status_code == 401
    too_large = service.http.post(
        f"/callbacks/jobs/{job['id']}", content=b"x" * 2048, headers={"Elements-Webhook-Id": "big"}
    )
    assert too_large.status_code == 413
    panel: dict[str, Any] = {}
    deadline = time.monotonic() + 5  # refusals are noted just after they are answered
    while time.monotonic() < deadline and len(panel.get("recent", [])) < 3:
        panel = service.http.get("/ui/callbacks").json()
    assert panel["counts_24h"]["accepted"] == 1
    assert panel["counts_24h"]["bad_signature"] == 1
    assert panel["counts_24h"]["too_large"] == 1
    assert panel["replica_counts"]["bad_signature"] == 1
    outcomes = [(d["outcome"], d["job"], d["webhook_id"]) for d in panel["recent"]]
    assert outcomes[:2] == [
        ("too_large", job["id"], "big"),
        ("bad_signature", job["id"], "forged-SECRET-BODY-1"),
    ]
    assert outcomes[2][0] == "accepted"
    everything = json.dumps(panel) + service.http.get("/").text
    page = service.http.get(f"/ui/jobs/{job['id']}").text
    assert "refused: bad signature" in page and "refused: too large" in page
    assert '"marker"' not in everything + page  # never a body
    stored = service.query("SELECT * FROM rejected_callbacks")
    assert len(stored) == 2
    assert "marker" not in repr(stored)
    # The job itself did not change.
    assert service.http.get(f"/jobs/{job['id']}").json()["events"] == job["events"]


def test_the_event_stream_sends_a_job_changing_state(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    service = start_service(start_sandbox(job_seconds=1.0))
    refused = service.http.get("/ui/stream")
    assert refused.status_code == 406
    assert refused.json()["error"]["code"] == "not_acceptable"
    seen: list[tuple[str, dict[str, Any]]] = []
    job_id: list[str] = []

    def submit_soon() -> None:
        time.sleep(0.5)
        job_id.append(service.submit(contacts_csv).json()["id"])

    threading.Thread(target=submit_soon, daemon=True).start()
    with service.http.stream("GET", "/ui/stream", params={"since": time.time()}, headers=SSE) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        for name, data in events(s):
            seen.append((name, data))
            if name == "job" and data["job"]["state"] == "COMPLETED":
                break
    states = [data["job"]["state"] for name, data in seen if name == "job"]
    assert states[-1] == "COMPLETED"
    assert states[0] in {"SUBMITTING", "CREATED", "RUNNING"}
    last = next(data for name, data in reversed(seen) if name == "job")
    assert last["job"]["id"] == job_id[0]
    assert f'id="job-{job_id[0]}"' in last["row"]
    assert '<span class="badge ok">COMPLETED</span>' in last["row"]
    assert any(name == "callbacks" for name, _ in seen)


def test_one_replica_streams_what_another_changed(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    """Served from the store: a job submitted and completed through one replica shows
    up live on another replica's dashboard, whose process never saw it."""
    upstream = start_sandbox(job_seconds=1.0)
    submitter = start_service(upstream)
    watcher = start_service(upstream)
    job_id = submitter.submit(contacts_csv).json()["id"]
    with watcher.http.stream("GET", "/ui/stream", params={"job": job_id}, headers=SSE) as s:
        details = []
        for name, data in events(s):
            assert name == "job"
            details.append(data)
            if data["job"]["state"] == "COMPLETED":
                break
    assert details[-1]["terminal"] is True
    assert "verified" in details[-1]["detail"]
    assert len(details) >= 2  # the state it had, then the change


def test_a_stream_resumes_from_the_last_event_id(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Streams end by themselves (so no tab delays a shutdown); the browser reconnects
    with Last-Event-ID and is sent what changed meanwhile."""
    monkeypatch.setattr(live, "MAX_STREAM", 1.0)
    service = start_service(start_sandbox())
    started = time.monotonic()
    with service.http.stream("GET", "/ui/stream", headers=SSE) as s:
        first = [name for name, _ in events(s)]
    assert first == ["callbacks"]  # the panel as it is; then the stream ended by itself
    assert time.monotonic() - started < 5
    mark = f"{time.time():.6f}"
    job = completed(service, contacts_csv)
    with service.http.stream("GET", "/ui/stream", headers={**SSE, "Last-Event-ID": mark}) as s:
        sent = [data["job"] for name, data in events(s) if name == "job"]
    assert [(j["id"], j["state"]) for j in sent] == [(job["id"], "COMPLETED")]


def test_a_job_pages_stream_never_goes_back_to_an_earlier_state(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The page shows each update as it comes: quiet ticks and heartbeats after the job
    completed must not send the job as the stream first found it."""
    monkeypatch.setattr(live, "MAX_STREAM", 3 * live.HEARTBEAT)
    service = start_service(start_sandbox(job_seconds=1.0))
    job = service.submit(contacts_csv).json()
    with service.http.stream("GET", "/ui/stream", params={"job": job["id"]}, headers=SSE) as s:
        sent = [data for name, data in events(s) if name == "job"]
    final = service.http.get(f"/jobs/{job['id']}").json()
    assert final["state"] == "COMPLETED"
    states = [data["job"]["state"] for data in sent]
    assert states[0] in {"SUBMITTING", "CREATED", "RUNNING"}
    assert states[-1] == "COMPLETED", states
    assert states.count("COMPLETED") == 1, states
    updated = [data["job"]["updated_at"] for data in sent]
    assert updated == sorted(updated), states
    assert '<span id="state" class="badge ok">COMPLETED</span>' in sent[-1]["detail"]


def refuse_at(service: RunningService, job_ref: str | None, at: float, webhook_id: str) -> None:
    """A refused callback as the service records it, straight into its database."""
    ref = f"'{job_ref}'" if job_ref is not None else "NULL"
    service.query(
        "INSERT INTO rejected_callbacks (received_at, reason, detail, job_ref, webhook_id)"
        f" VALUES ({at}, 'bad_signature', 'refused {webhook_id}', {ref}, '{webhook_id}')"
    )


def test_a_job_page_shows_a_new_refusal_when_a_hundred_are_shown_already(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The page lists the newest 100 refusals: a new one keeps the count at 100 and
    must still reach the open page."""
    monkeypatch.setattr(live, "MAX_STREAM", 6.0)
    service = start_service(start_sandbox(job_seconds=60, drop_callbacks=1.0), callback_grace=60)
    job = service.submit(contacts_csv).json()
    now = time.time()
    for n in range(100):
        refuse_at(service, job["id"], now - 100 + n, f"old-{n}")
    with service.http.stream("GET", "/ui/stream", params={"job": job["id"]}, headers=SSE) as s:
        sent = events(s)
        name, first = next(sent)
        assert name == "job" and "refused old-99" in first["detail"]
        refuse_at(service, job["id"], time.time(), "the-newest")
        shown = [data["detail"] for name, data in sent if name == "job"]
    assert shown and "refused the-newest" in shown[-1]
    assert "refused old-0" not in shown[-1]  # the oldest made way


def test_a_reconnecting_table_stream_gets_what_the_feed_read_for_other_tabs(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a job page keeps the feed running, a job created as the table's browser
    reconnects is sent to it, though the feed read it before the browser was back."""
    monkeypatch.setattr(live, "MAX_STREAM", 6.0)
    service = start_service(start_sandbox(job_seconds=60, drop_callbacks=1.0), callback_grace=60)
    watched = service.submit(contacts_csv).json()
    page_open = threading.Event()

    def job_page() -> None:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            params = {"job": watched["id"]}
            with client.stream("GET", "/ui/stream", params=params, headers=SSE) as s:
                for _ in events(s):
                    page_open.set()

    page = threading.Thread(target=job_page, daemon=True)
    page.start()
    assert page_open.wait(10)
    mark = f"{time.time():.6f}"
    created = service.submit(contacts_csv).json()
    time.sleep(3 * live.TICK)  # the feed has read it, for the job page alone
    resumed = {**SSE, "Last-Event-ID": mark}
    with service.http.stream("GET", "/ui/stream", headers=resumed) as s:
        for name, data in events(s):
            if name == "job" and data["job"]["id"] == created["id"]:
                break
        else:
            pytest.fail("the job created while the browser reconnected was never sent")
    page.join(live.MAX_STREAM + 5)  # its stream ends by itself, before the service stops


def test_the_table_stream_sends_every_job_when_thousands_change_at_once(
    start_service: Callable[..., RunningService], monkeypatch: pytest.MonkeyPatch
) -> None:
    """More changes than one read of the feed takes: the next read goes on from there."""
    monkeypatch.setattr(live, "MAX_STREAM", 15.0)  # ends the stream if some never come
    service = start_service(None)
    count = 2500
    seen: set[str] = set()
    with service.http.stream("GET", "/ui/stream", headers=SSE) as s:
        for name, data in events(s):
            if name == "callbacks" and not seen:  # the feed has read once: now they change
                now = time.time()
                rows = ", ".join(
                    f"('bulk-{n:05d}', 'marketing', 'contact', '/c.csv', 'RUNNING',"
                    f" {now}, {now + n / 10_000}, 'poll')"
                    for n in range(count)
                )
                service.query(
                    "INSERT INTO jobs (id, hub, object, path, state, created_at, updated_at,"
                    f" last_source) VALUES {rows}"
                )
                seen.add("")
            elif name == "job":
                seen.add(data["job"]["id"])
                if len(seen) == count + 1:
                    break
    assert len(seen - {""}) == count


def test_the_callbacks_panel_shows_a_refusal_dated_before_the_newest_delivery(
    start_service: Callable[..., RunningService], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal is written after its answer's delay, dated when it came: the panel
    shows it though a delivery arrived in between."""
    monkeypatch.setattr(live, "MAX_STREAM", 10.0)  # ends the stream if it never comes
    service = start_service(None)
    now = time.time()
    newest_written = late_written = shown = False
    with service.http.stream("GET", "/ui/stream", headers=SSE) as s:
        for name, data in events(s):
            if name != "callbacks":
                continue
            if not newest_written:
                refuse_at(service, None, now, "the-newest")
                newest_written = True
            elif "the-newest" in data["panel"] and not late_written:
                refuse_at(service, None, now - 1, "written-late")
                late_written = True
            elif "written-late" in data["panel"]:
                shown = True
                break
    assert late_written and shown


def test_the_cancel_and_refresh_buttons_answer_like_the_job_api(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    service = start_service(start_sandbox(job_seconds=60, drop_callbacks=1.0), callback_grace=60)
    job = service.submit(contacts_csv).json()
    refreshed = service.http.post(f"/ui/jobs/{job['id']}/refresh")
    assert refreshed.status_code == 200
    assert "refresh requested" in refreshed.json()["events"][-1]["detail"]
    foreign = service.http.post(
        f"/ui/jobs/{job['id']}/cancel", headers={"Origin": "http://evil.example"}
    )
    assert foreign.status_code == 403
    assert foreign.json()["error"]["code"] == "cross_origin"
    cancelled = service.http.post(f"/ui/jobs/{job['id']}/cancel", headers={"Origin": service.url})
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] in {"CANCELLATION_PENDING", "CANCELLED"}
    missing = service.http.post("/ui/jobs/nope/cancel")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "job_not_found"


def test_an_open_stream_does_not_hold_up_stopping(
    start_service: Callable[..., RunningService],
) -> None:
    """A client that goes ends its stream at once (the server stops without waiting)."""
    service = start_service(None)
    client = httpx.Client(base_url=service.url, timeout=10)
    with client.stream("GET", "/ui/stream", headers=SSE) as s:
        next(s.iter_lines())
    client.close()
    time.sleep(live.TICK * 2)
    started = time.monotonic()
    service.server.stop()
    assert time.monotonic() - started < 3


def test_sigterm_ends_open_streams_and_the_service_stops(tmp_path: Path) -> None:
    process, url = serve(tmp_path)
    try:
        with httpx.stream("GET", f"{url}/ui/stream", headers=SSE, timeout=10) as s:
            lines = s.iter_lines()
            assert next(lines) == "retry: 1000"
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            for _ in lines:  # the stream ends instead of running on
                pass
        assert time.monotonic() - started < live.MAX_STREAM / 2
        # uvicorn re-raises SIGTERM once it has shut down cleanly.
        assert process.wait(timeout=10) in (0, -signal.SIGTERM)
        assert time.monotonic() - started < 10
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def test_a_database_from_before_the_dashboard_gains_its_tables(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 2 (refused callbacks, the change feed's index) upgrades a database
    that already holds jobs, on both stores."""
    from service.store import open_store
    from service.store.base import Rejection
    from service.store.postgres import store as postgres
    from service.store.sqlite import store as sqlite

    module: Any = sqlite if store_url.startswith("sqlite") else postgres

    async def scenario() -> None:
        monkeypatch.setattr(module, "MIGRATIONS", module.MIGRATIONS[:1])
        old = open_store(store_url)
        await old.open()
        await old.close()
        job = make_job()
        # Written as the first schema has it: today's store reads and writes later columns.
        insert = (
            "INSERT INTO jobs (id, hub, object, path, state, created_at, updated_at,"
            " last_source) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
        )
        row = (
            job.id,
            job.hub,
            job.object,
            job.path,
            str(job.state),
            *[job.created_at] * 2,
            job.last_source,
        )
        if module is sqlite:
            with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
                conn.execute(insert.replace("%s", "?"), row)
        else:
            import psycopg

            with psycopg.connect(store_url) as conn:
                conn.execute(insert, row)  # type: ignore[arg-type]
        monkeypatch.undo()
        store = open_store(store_url)
        await store.open()
        try:
            assert await store.get_job(job.id) is not None
            await store.record_rejection(Rejection(time.time(), "too_large", "over 1 MiB"))
            assert [r.outcome for r in await store.recent_callbacks()] == ["too_large"]
            assert [j.id for j in await store.jobs_changed_since(0.0, "", 10)] == [job.id]
        finally:
            await store.close()

    asyncio.run(scenario())


# Downloads ------------------------------------------------------------------------


def stored_download(service: RunningService, **fields: Any) -> dict[str, Any]:
    """A download of the contacts the sandbox holds, its result stored."""
    started = service.download("contact", **fields)
    assert started.status_code == 202, started.text
    return service.wait_for_result(started.json()["id"], {"stored"})


def test_a_download_shows_its_direction_query_format_and_result_with_a_download_button(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    service = start_service(start_sandbox())
    upload = completed(service, contacts_csv)
    query = "select * from contact where C_LastName = 'Smith'"
    job = stored_download(service, query=query, format="jsonl")
    result = job["result"]
    assert (result["records"], result["format"]) == (4, "jsonl")

    listed = service.http.get("/").text
    row = re.search(rf'<tr id="job-{job["id"]}".*?</tr>', listed, re.DOTALL)
    assert row and '<td class="direction">download</td>' in row.group(0)
    row = re.search(rf'<tr id="job-{upload["id"]}".*?</tr>', listed, re.DOTALL)
    assert row and '<td class="direction">upload</td>' in row.group(0)

    page = service.http.get(f"/ui/jobs/{job['id']}")
    assert page.status_code == 200
    text = html.unescape(page.text)
    assert '<dd class="direction">download</dd>' in text
    assert f'<dd class="mono query">{query}</dd>' in text
    assert '<dd class="format">jsonl</dd>' in text
    assert '<span id="result-status" class="badge ok">stored</span>' in text
    size = result["bytes"]
    assert f"{size:,} bytes" in text  # the exact size, beside a readable one from 1 KiB
    assert '<dd class="result-records">4</dd>' in text
    assert f'<dd class="mono sha256">{result["sha256"]}</dd>' in text
    assert f'<a id="download" class="button" href="/ui/jobs/{job["id"]}/result" download>' in text
    assert 'id="failed"' not in text  # a download has no failed records to list

    # The button's route answers as the job API's result route does.
    served = service.http.get(f"/ui/jobs/{job['id']}/result")
    api = service.http.get(f"/jobs/{job['id']}/result")
    assert served.status_code == api.status_code == 200
    assert served.content == api.content
    assert hashlib.sha256(served.content).hexdigest() == result["sha256"]
    for header in ("content-type", "content-length", "etag", "content-disposition"):
        assert served.headers[header] == api.headers[header], header
    assert served.headers["content-disposition"] == (
        f'attachment; filename="contact-{job["id"]}.jsonl"'
    )
    ranged = service.http.get(f"/ui/jobs/{job['id']}/result", headers={"Range": "bytes=0-9"})
    assert (ranged.status_code, ranged.content) == (206, api.content[:10])
    again = service.http.get(
        f"/ui/jobs/{job['id']}/result", headers={"If-None-Match": api.headers["etag"]}
    )
    assert again.status_code == 304

    # An upload's page says so and offers no result.
    upload_page = html.unescape(service.http.get(f"/ui/jobs/{upload['id']}").text)
    assert '<dd class="direction">upload</dd>' in upload_page
    assert 'id="result"' not in upload_page and "/result" not in upload_page
    not_a_download = service.http.get(f"/ui/jobs/{upload['id']}/result")
    assert not_a_download.status_code == 404
    assert not_a_download.json()["error"]["code"] == "not_a_download"
    missing = service.http.get("/ui/jobs/nope/result")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "job_not_found"


def test_the_download_button_needs_the_dashboard_login(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    service = start_service(start_sandbox(), api_tokens=(TOKEN,))
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    completed(service, contacts_csv, **bearer)
    started = service.download("contact", headers=bearer)
    assert started.status_code == 202, started.text
    deadline = time.monotonic() + 30
    job = started.json()
    while job["result"]["status"] != "stored":
        assert time.monotonic() < deadline, job["result"]
        time.sleep(0.05)
        job = service.http.get(f"/jobs/{job['id']}", headers=bearer).json()
    path = f"/ui/jobs/{job['id']}/result"
    with httpx.Client(base_url=service.url, timeout=10) as browser:
        refused = browser.get(path)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "unauthorized"
        assert refused.content.count(b"@") == 0  # not one record
        wrong = browser.get(path, headers={"Cookie": f"bulkhook_token={TOKEN}x"})
        assert wrong.status_code == 401
        assert browser.post("/ui/login", data={"token": TOKEN, "next": "/"}).status_code == 303
        served = browser.get(path)
        assert served.status_code == 200, served.text
        api = service.http.get(f"/jobs/{job['id']}/result", headers=bearer)
        assert served.content == api.content
        assert hashlib.sha256(served.content).hexdigest() == job["result"]["sha256"]


def test_a_job_page_shows_its_result_arrive_live(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    contacts_csv: Path,
) -> None:
    upstream = start_sandbox()
    # A failed fetch is tried again after the poll interval: long enough here for the
    # page to see the result between the two.
    service = start_service(upstream, poll_interval=1.5, poll_max_interval=3.0)
    completed(service, contacts_csv)
    # The first fetch is cut off mid-file: the result is fetched again after the job
    # has completed, which changes nothing of the job itself.
    upstream.sandbox.inject_fault("download", 200, cut_after=10)
    job = service.download("contact").json()
    shown: list[tuple[str, str]] = []
    with service.http.stream("GET", "/ui/stream", params={"job": job["id"]}, headers=SSE) as s:
        for name, data in events(s):
            assert name == "job"
            status = re.search(r'id="result-status" class="badge \w+">(\w+)<', data["detail"])
            assert status is not None
            shown.append((data["job"]["state"], status.group(1)))
            if status.group(1) == "stored":
                assert 'id="download"' in data["detail"]
                break
    assert shown[-1] == ("COMPLETED", "stored")
    assert ("COMPLETED", "fetching") in shown, shown
