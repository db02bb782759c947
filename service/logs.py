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

__all__ = ["CONTEXT_FIELDS", "JsonFormatter", "log_config"]

CONTEXT_FIELDS = ("job_id", "webhook_id", "upstream_id", "outcome")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def log_config(fmt: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for uvicorn and the service's own loggers."""
    formatter = (
        {"()": f"{__name__}.JsonFormatter"}
        if fmt == "json"
        else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    )
    handler = {"class": "logging.StreamHandler", "formatter": "main", "stream": "ext://sys.stderr"}
    logger = {"handlers": ["main"], "level": "INFO", "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "handlers": {"main": handler},
        "loggers": {
            "bulkhook": logger,
            "uvicorn": logger,
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": logger,
        },
    }
