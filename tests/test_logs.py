"""Log lines are JSON objects, one per line, carrying the ids they concern; a person at
a terminal gets readable text lines instead."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import sys

import pytest

from service.logs import JsonFormatter, Repeats, TextFormatter, chosen_format, short


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


def test_repeated_lines_are_counted_not_written() -> None:
    """A flood of one kind of line writes one line per window and a count of the rest."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("bulkhook.test.repeats")
    logger.addHandler(Keep())
    logger.propagate = False
    now = [0.0]
    repeats = Repeats(logger, window=10.0, kinds=2, clock=lambda: now[0])
    for n in range(10_000):
        repeats.warning("bad_signature", "callback refused %d", n)
    assert records == ["callback refused 0"]
    now[0] = 10.5
    repeats.warning("bad_signature", "callback refused again")
    repeats.warning("too_large", "too large")
    repeats.warning("too_large", "too large")
    repeats.warning("third", "a third kind pushes the oldest out")
    repeats.flush()
    assert records[1:] == [
        "9999 more like the last bad_signature line, not logged (one per 10 s)",
        "callback refused again",
        "too large",
        "a third kind pushes the oldest out",
        "1 more like the last too_large line, not logged (one per 10 s)",
    ]


def test_ids_in_log_lines_are_cut_short() -> None:
    assert short("a" * 15_000) == "a" * 64 + "…(+14936)"
    assert short("01abc") == "01abc"
    assert short(None) is None


def test_a_text_line_is_readable_and_names_the_ids() -> None:
    entry = record("callback %s for job %s", "accepted", "j1", job_id="j1", webhook_id="w1")
    entry.created = 1_700_000_000.25
    line = TextFormatter().format(entry)
    assert line == (
        "2023-11-14 22:13:20Z INFO    bulkhook.callbacks: callback accepted for job j1"
        " (job_id=j1, webhook_id=w1)"
    )
    traced = TextFormatter().format(record("failed", exc=True, job_id="j2"))
    first, *below = traced.splitlines()
    assert first.endswith("failed (job_id=j2)")
    assert below[-1] == "ValueError: boom"


def test_auto_is_text_at_a_terminal_and_json_elsewhere() -> None:
    primary, secondary = pty.openpty()
    try:
        with open(secondary, "w", closefd=False) as terminal:
            assert chosen_format("auto", terminal) == "text"
            assert chosen_format("json", terminal) == "json"
        assert chosen_format("auto", io.StringIO()) == "json"
        assert chosen_format("text", io.StringIO()) == "text"
        closed = io.StringIO()
        closed.close()
        assert chosen_format("auto", closed) == "json"
    finally:
        os.close(primary)
        os.close(secondary)
