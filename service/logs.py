"""Log lines as JSON objects, or as text for a person at a terminal, carrying the job
and webhook ids they concern.

Code logs with ``extra={"job_id": …, "webhook_id": …}``; the formatter lifts those
fields into the JSON object so a log collector can search by them (the text format
appends them). Secrets are never passed to a logger in the first place.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TextIO

__all__ = [
    "CONTEXT_FIELDS",
    "JsonFormatter",
    "Repeats",
    "TextFormatter",
    "chosen_format",
    "lighten_records",
    "log_config",
    "short",
]

CONTEXT_FIELDS = ("job_id", "webhook_id", "upstream_id", "instance", "outcome")
_string = json.encoder.encode_basestring_ascii


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""
        # One encoder for every line: json.dumps with an argument builds a new one each call.
        self._encode = json.JSONEncoder(default=str).encode

    def _timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # one strftime a second, not one a line
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        # Written out rather than built as a dict for json: a busy endpoint logs a line
        # per delivery. The bytes are json.dumps' own (default separators, ASCII).
        line = (
            f'{{"ts": "{self._timestamp(record.created)}", '
            f'"level": {_string(record.levelname.lower())}, "logger": {_string(record.name)}, '
            f'"message": {_string(record.getMessage())}'
        )
        fields = record.__dict__
        for name in CONTEXT_FIELDS:
            value = fields.get(name)
            if value is not None:
                text = _string(value) if type(value) is str else self._encode(value)
                line += f', "{name}": {text}'
        if record.exc_info:
            line += f', "error": {_string(self.formatException(record.exc_info))}'
        return line + "}"


class TextFormatter(logging.Formatter):
    """One readable line: UTC time, level, logger, message, then the ids it concerns."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(record.created))

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = record.__dict__
        context = [
            f"{name}={fields[name]}" for name in CONTEXT_FIELDS if fields.get(name) is not None
        ]
        if not context:
            return line
        first, newline, rest = line.partition("\n")  # a traceback stays below its line
        return f"{first} ({', '.join(context)}){newline}{rest}"


def chosen_format(configured: str, stream: TextIO) -> str:
    """``auto``: text when a person reads ``stream`` at a terminal, JSON lines for a log
    collector otherwise; ``json`` and ``text`` are taken as they are."""
    if configured != "auto":
        return configured
    try:
        interactive = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        interactive = False
    return "text" if interactive else "json"


def short(value: str | None, limit: int = 64) -> str | None:
    """An id as a log line may carry it: at most ``limit`` characters, marked when cut.

    Ids in refused requests are the sender's to choose; a 15 KB path id must not make
    15 KB of log per request.
    """
    if value is None or len(value) <= limit:
        return value
    return f"{value[:limit]}…(+{len(value) - limit})"


class Repeats:
    """Logs the first line of each kind per ``window`` seconds and counts the rest.

    A flood of refused requests (forged callbacks, wrong tokens) would otherwise write
    a line each and could fill a disk. The count of the lines held back is logged with
    the next line of that kind after the window, or by ``flush``. At most ``kinds``
    kinds are tracked; past that the oldest is flushed and forgotten.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        window: float = 10.0,
        kinds: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._window = window
        self._kinds = kinds
        self._clock = clock
        # kind -> [window start, lines held back since]
        self._seen: OrderedDict[str, list[float]] = OrderedDict()

    def warning(self, kind: str, msg: str, *args: Any, **kwargs: Any) -> None:
        """Log ``msg`` at WARNING unless a line of ``kind`` was logged within the window."""
        now = self._clock()
        entry = self._seen.get(kind)
        if entry is not None and now - entry[0] < self._window:
            entry[1] += 1
            return
        if entry is not None:
            self._summary(kind, entry)
            self._seen.move_to_end(kind)
        self._seen[kind] = [now, 0]
        if len(self._seen) > self._kinds:
            oldest, held = self._seen.popitem(last=False)
            self._summary(oldest, held)
        self._logger.warning(msg, *args, **kwargs)

    def flush(self) -> None:
        """Log the count of every kind's held-back lines (at shutdown, or periodically)."""
        for kind, entry in self._seen.items():
            self._summary(kind, entry)
            entry[1] = 0

    def _summary(self, kind: str, entry: list[float]) -> None:
        if entry[1]:
            self._logger.warning(
                "%d more like the last %s line, not logged (one per %g s)",
                int(entry[1]),
                kind,
                self._window,
                extra={"outcome": "repeated"},
            )


def lighten_records() -> None:
    """Stop collecting what no log line shows: caller, thread and process details.

    The logging HOWTO's "Optimization" section names these switches. They are process
    wide, so only ``bulkhook serve`` (which owns its process) turns them off; at debug
    level a busy callback endpoint logs a line per delivery and this halves its cost.
    """
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None


def log_config(fmt: str, level: str = "info") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for uvicorn and the service's own loggers; ``fmt``
    is ``json`` or ``text`` (see ``chosen_format``)."""
    formatter = {"()": f"{__name__}.{'JsonFormatter' if fmt == 'json' else 'TextFormatter'}"}
    handler = {"class": "logging.StreamHandler", "formatter": "main", "stream": "ext://sys.stderr"}
    logger = {"handlers": ["main"], "level": level.upper(), "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "handlers": {"main": handler},
        "loggers": {
            "bulkhook": logger,
            "uvicorn": logger,
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": logger,
        },
    }
