"""The API description served at ``/openapi.json``."""

from __future__ import annotations

from typing import Any

__all__ = ["openapi_spec"]


def openapi_spec() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "bulkhook", "version": "0.1.0"},
        "paths": {},
    }
