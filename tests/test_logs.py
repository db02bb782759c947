"""Log lines are JSON objects, one per line, carrying the ids they concern."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from service.logs import JsonFormatter


def record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    logger = logging.getLogger("bulkhook.callbacks")
    return logger.makeRecord(
        logger.name, logging.INFO, __file__, 1, msg, args, exc_info, extra=extra
    )


@pytest.mark.parametrize(
    "entry",
    [
        record("callback %s: job %s is %s", "accepted", "j1", "RUNNING", job_id="j1", outcome="ok"),
        record('quotes " and \\ and a\nnewline, é, 雪, \x00', webhook_id="w\t1"),
        record("numbers", upstream_id=12345, job_id=None),
        record("with a traceback", exc=True),
    ],
)
def test_a_line_is_exactly_what_json_dumps_gives(entry: logging.LogRecord) -> None:
    line = JsonFormatter().format(entry)
    parsed = json.loads(line)
    assert line == json.dumps(parsed)  # json's own bytes: default separators, ASCII only
    assert "\n" not in line
    assert parsed["message"] == entry.getMessage()
    assert parsed["level"] == "info"
    assert parsed["logger"] == "bulkhook.callbacks"
    for name in ("job_id", "webhook_id", "upstream_id", "outcome"):
        assert parsed.get(name) == getattr(entry, name, None)
    assert ("error" in parsed) == (entry.exc_info is not None)


def test_the_timestamp_is_utc_with_milliseconds() -> None:
    entry = record("hello")
    entry.created = 1_700_000_000.25
    assert json.loads(JsonFormatter().format(entry))["ts"] == "2023-11-14T22:13:20.250Z"
