"""Log lines as JSON objects, carrying the job and webhook ids they concern.

Code logs with ``extra={"job_id": …, "webhook_id": …}``; the formatter lifts those
fields into the JSON object so a log collector can search by them. Secrets are never
passed to a logger in the first place.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

__all__ = ["CONTEXT_FIELDS", "JsonFormatter", "lighten_records", "log_config"]

CONTEXT_FIELDS = ("job_id", "webhook_id", "upstream_id", "outcome")
_string = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


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


def lighten_records() -> None:
    """Stop collecting what no log line shows: caller, thread and process details.

    The logging HOWTO's "Optimization" section names these switches. They are process
    wide, so only ``bulkhook serve`` (which owns its process) turns them off; at debug
    level a busy callback endpoint logs a line per delivery and this halves its cost.
    """
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # type: ignore[attr-defined]


def log_config(fmt: str, level: str = "info") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for uvicorn and the service's own loggers."""
    formatter = (
        {"()": f"{__name__}.JsonFormatter"}
        if fmt == "json"
        else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    )
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
