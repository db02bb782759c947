"""Hostile dashboard inputs, on SQLite and PostgreSQL: a path id that cannot be a job
id is not looked up, and no query parameter (NUL, invalid UTF-8, huge) gets a 5xx."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service.store import open_store

from .helpers import SSE, RunningService

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
NOT_JOB_IDS = ["a" * 65, "a.b", "...", "é", "x\x00y", "\x00", "a b", "%", "\ud800", "j" * 5000]


class Lookups:
    """The app's own store, with every job looked up by id noted."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.asked: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def get_job(self, job_id: str, **options: Any) -> Any:
        self.asked.append(job_id)
        return await self._store.get_job(job_id, **options)


def raw(text: str) -> str:
    """``text`` percent-encoded as it is, lone surrogates too (as invalid UTF-8)."""
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


@pytest.fixture
def service(start_service: Callable[..., RunningService], contacts_csv: Path) -> RunningService:
    running = start_service(None)
    assert running.submit(contacts_csv).status_code == 202
    return running


def test_a_path_id_that_cannot_be_a_job_is_not_found_without_asking_the_store(
    start_service: Callable[..., RunningService], contacts_csv: Path, store_url: str
) -> None:
    lookups = Lookups(open_store(store_url))
    service = start_service(None, store=lookups)
    assert service.submit(contacts_csv).status_code == 202
    lookups.asked.clear()  # the submission's own
    for job_id in NOT_JOB_IDS:
        page = service.http.get(f"/ui/jobs/{raw(job_id)}")
        assert page.status_code == 404, job_id
        assert "No such job" in page.text
        fragment = service.http.get(f"/ui/jobs/{raw(job_id)}/failed")
        assert fragment.status_code == 404, job_id
        download = service.http.get(f"/ui/jobs/{raw(job_id)}/failed.csv")
        assert download.status_code == 404, job_id
        assert download.json()["error"]["code"] == "job_not_found"
        for action in ("cancel", "refresh"):
            answer = service.http.post(f"/ui/jobs/{raw(job_id)}/{action}")
            assert answer.status_code == 404, (job_id, action)
            assert answer.json()["error"]["code"] == "job_not_found"
        stream = service.http.get(f"/ui/stream?job={raw(job_id)}", headers=SSE)
        assert stream.status_code == 404, job_id
        assert stream.json()["error"]["code"] == "job_not_found"
    assert lookups.asked == []
    # A well-formed id that names no job is looked up, and not found either.
    assert service.http.get("/ui/jobs/no-such-job").status_code == 404
    assert lookups.asked == ["no-such-job"]


@FUZZ
@given(value=st.text(max_size=300))
@example(value="\x00")
@example(value="a\x00")
@example(value="\ud800")
@example(value="0" * 5000)
@example(value="%_\\")
@example(value="1e400")
@example(value="nan")
@example(value="0/")
def test_no_query_parameter_gets_a_server_error(service: RunningService, value: str) -> None:
    encoded = raw(value)
    for url in (
        f"/?q={encoded}",
        f"/?state={encoded}",
        f"/?before={encoded}",
        f"/?q={encoded}&state={encoded}&before={encoded}",
    ):
        answer = service.http.get(url)
        assert answer.status_code == 200, (url, answer.status_code)
    # A path id with a slash may name another route (or a redirect): never a 5xx.
    answer = service.http.get(f"/ui/jobs/{encoded or 'x'}")
    assert answer.status_code < 500, (value, answer.status_code)
    # The login form sends a logged-in user on, to a path of this site only.
    login = service.http.get(f"/ui/login?next={encoded}")
    assert login.status_code == 303 and login.headers["location"].startswith("/")
    for url in (f"/ui/stream?since={encoded}", f"/ui/stream?job={encoded}"):
        with service.http.stream("GET", url, headers=SSE) as answer:
            assert answer.status_code in {200, 404}, (url, answer.status_code)


def test_searching_for_what_cannot_be_an_id_explains_and_finds_nothing(
    service: RunningService,
) -> None:
    for search in ("\x00", "a\x00b", "x" * 10_000, "\ud800", "' OR 1=1 --"):
        page = service.http.get(f"/?q={raw(search)}")
        assert page.status_code == 200, search
        assert 'id="job-' not in page.text
        assert "Search by a job id" in page.text or "No job matches." in page.text
