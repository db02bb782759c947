"""The state machine: every (state, observed status) pair, table-driven."""

from __future__ import annotations

import itertools
import time

import pytest

from service.jobs import TERMINAL, Job, Observation, Source, State, decide, new_job_id
from service.upstream.statuses import normalize_status

ORDER = [
    State.SUBMITTING,
    State.CREATED,
    State.STARTED,
    State.RUNNING,
    State.CANCELLATION_PENDING,
]
UPSTREAM = [
    "CREATED",
    "STARTED",
    "RUNNING",
    "CANCELLATION_PENDING",
    "COMPLETED",
    "ERROR",
    "ABORTED",
    "CANCELLED",
]


def expected(current: State, status: str) -> State:
    """The rule, stated independently: forward only, terminal sticky."""
    if current in TERMINAL:
        return current
    target = State(status)
    if target in TERMINAL:
        return target
    return target if ORDER.index(target) > ORDER.index(current) else current


@pytest.mark.parametrize(("current", "status"), list(itertools.product(list(State), UPSTREAM)))
def test_every_state_and_status_pair(current: State, status: str) -> None:
    decision = decide(current, Observation(Source.POLL, status=status))
    assert decision.state == expected(current, status)
    assert decision.changed == (decision.state != current)


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("COMPLETE", "COMPLETED"),
        ("complete", "COMPLETED"),
        ("CANCELED", "CANCELLED"),
        (" running ", "RUNNING"),
        ("COMPLETED", "COMPLETED"),
        ("FINISHED", None),
        ("", None),
        (None, None),
        (3, None),
    ],
)
def test_aliases_normalise(raw: object, normal: str | None) -> None:
    assert normalize_status(raw) == normal


def test_an_alias_completes_a_running_job() -> None:
    status = normalize_status("COMPLETE")
    assert decide(State.RUNNING, Observation(Source.CALLBACK, status=status)).state == (
        State.COMPLETED
    )


def test_a_late_running_after_completed_is_ignored_and_says_so() -> None:
    decision = decide(State.COMPLETED, Observation(Source.POLL, status="RUNNING"))
    assert decision.state == State.COMPLETED
    assert not decision.changed and not decision.accepted
    assert "ignored" in decision.note


def test_a_regression_is_ignored() -> None:
    decision = decide(State.RUNNING, Observation(Source.CALLBACK, status="CREATED"))
    assert (decision.state, decision.changed, decision.accepted) == (State.RUNNING, False, False)


def test_the_same_terminal_news_is_accepted_without_a_change() -> None:
    decision = decide(State.COMPLETED, Observation(Source.POLL, status="COMPLETED"))
    assert (decision.changed, decision.accepted) == (False, True)


def test_no_readable_status_is_a_nudge() -> None:
    decision = decide(State.RUNNING, Observation(Source.CALLBACK, status=None))
    assert (decision.state, decision.changed, decision.accepted) == (State.RUNNING, False, False)


@pytest.mark.parametrize("forced", [State.SUBMIT_FAILED, State.TIMED_OUT, State.ABORTED])
def test_service_side_states_end_a_live_job(forced: State) -> None:
    start = State.SUBMITTING if forced == State.SUBMIT_FAILED else State.RUNNING
    assert decide(start, Observation(Source.POLL, state=forced)).state == forced


def test_submit_failed_only_from_submitting() -> None:
    decision = decide(State.CREATED, Observation(Source.SUBMIT, state=State.SUBMIT_FAILED))
    assert decision.state == State.CREATED


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_terminal_states_never_change(terminal: State) -> None:
    for forced in (State.TIMED_OUT, State.ABORTED):
        assert decide(terminal, Observation(Source.TIMEOUT, state=forced)).state == terminal
    for status in UPSTREAM:
        assert decide(terminal, Observation(Source.CALLBACK, status=status)).state == terminal


def test_job_ids_sort_by_creation_and_are_unique() -> None:
    ids = [new_job_id() for _ in range(200)]
    assert len(set(ids)) == 200
    spaced = []
    for _ in range(5):
        spaced.append(new_job_id())
        time.sleep(0.002)
    assert spaced == sorted(spaced)


def _job(state: State, failed: int | None) -> Job:
    return Job(
        id="j",
        hub="marketing",
        object="contact",
        path="/c.csv",
        state=state,
        created_at=0.0,
        updated_at=0.0,
        last_source="poll",
        records_count=10,
        records_failed_count=failed,
    )


def test_partial_failure_shows_plainly() -> None:
    assert _job(State.COMPLETED, 0).to_json()["succeeded"] is True
    assert _job(State.COMPLETED, 3).to_json()["succeeded"] is False
    assert _job(State.COMPLETED, None).to_json()["succeeded"] is None
    assert _job(State.RUNNING, None).to_json()["succeeded"] is None
    assert _job(State.ERROR, None).to_json()["succeeded"] is False


def test_job_json_has_the_documented_fields() -> None:
    body = _job(State.RUNNING, None).to_json()
    for name in (
        "id",
        "upstream_id",
        "hub",
        "object",
        "path",
        "state",
        "upstream_status",
        "records_count",
        "records_failed_count",
        "upstream_error",
        "created_at",
        "updated_at",
        "last_source",
        "events",
    ):
        assert name in body
    assert body["upstream_error"] is None
    assert body["created_at"] == "1970-01-01T00:00:00.000Z"
