"""A download request's JSON body, read with a bound and checked, before its job exists.

``POST /jobs`` with ``Content-Type: application/json`` asks for a download: a JSON
object of at most ``MAX_BODY`` bytes with ``object`` (required), ``query``, ``hub``,
``format`` and ``instance``. The body is read only up to its bound (a larger one is
refused as soon as it passes it, or declares it will), and every mistake is a 400
naming the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

from service.downloads.records import FORMATS
from service.errors import ApiError
from service.jobs import DownloadRequest
from service.upstream.instances import unknown_instance
from service.values import is_clean, name_problem

__all__ = ["FIELDS", "MAX_BODY", "MAX_QUERY", "download_request", "is_json", "read_bounded"]

MAX_BODY = 64 * 1024
MAX_QUERY = 4000
FIELDS = ("object", "query", "hub", "format", "instance")


def is_json(content_type: str) -> bool:
    """Whether a request's Content-Type is JSON (any parameters, any case)."""
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def _too_large() -> ApiError:
    return ApiError(
        f"a download request is at most {MAX_BODY} bytes of JSON",
        code="too_large",
        status=413,
        # The rest of the body is not read: the connection cannot serve another request.
        headers={"Connection": "close"},
    )


async def read_bounded(chunks: AsyncIterator[bytes], declared: str | None) -> bytes:
    """The body, refused (413) as soon as it passes ``MAX_BODY`` bytes or its
    ``Content-Length`` says it will: never more than that is held."""
    if declared is not None and declared.strip().isdigit() and int(declared) > MAX_BODY:
        raise _too_large()
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > MAX_BODY:
            raise _too_large()
    return bytes(body)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse(body: bytes) -> Mapping[str, Any]:
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise ApiError("the body is not UTF-8 JSON", code="bad_json") from None
    except json.JSONDecodeError as exc:
        raise ApiError(f"the body is not JSON: {exc.msg}", code="bad_json") from None
    except (ValueError, RecursionError):
        raise ApiError("the body is not usable JSON", code="bad_json") from None
    if not isinstance(value, dict):
        raise ApiError("the body must be a JSON object", code="bad_json")
    return value


def _name(value: Any, field: str, *, required: bool = False) -> str | None:
    """An object or hub name, checked before it becomes a segment of an upstream URL."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ApiError(f"the field '{field}' is required", code=f"missing_{field}")
        return None
    if not isinstance(value, str):
        raise ApiError(f"'{field}' must be text", code=f"bad_{field}")
    problem = name_problem(value.strip())
    if problem is not None:
        raise ApiError(f"'{field}' is not a valid name: {problem}", code=f"bad_{field}")
    return value.strip()


# The object a CEQL query reads: the word after its first ``from``.
_FROM = re.compile(r"\bfrom\s+([^\s,;()]+)", re.IGNORECASE)
# An object name that can stand in a query as it is: no space, quote or separator.
_PLAIN = re.compile(r"[^\s'\"`,;()=<>]+")


def _query(value: Any, object_name: str) -> str:
    """The query to run. The result is fetched as the job's object, so the query must
    read that object: one that reads another starts an upstream job whose result can
    never be fetched (the upstream answers 404 for it)."""
    if value is None:
        if _PLAIN.fullmatch(object_name) is None:
            raise ApiError(
                f"'object' {object_name[:40]!r} cannot be named in the default query"
                " ('select * from <object>'): give 'query'",
                code="bad_object",
            )
        return f"select * from {object_name}"
    if (
        not isinstance(value, str)
        or not value.strip()
        or len(value) > MAX_QUERY
        or not is_clean(value)
        or not value.replace("\r", " ").replace("\n", " ").replace("\t", " ").isprintable()
    ):
        raise ApiError(
            f"'query' must be printable text of 1 to {MAX_QUERY} characters", code="bad_query"
        )
    read = _FROM.search(value)
    if read is None or read.group(1).strip("`\"'[]").lower() != object_name.lower():
        raise ApiError(
            f"'query' must read the job's object ('from {object_name[:40]}'): its result"
            " is fetched as that object",
            code="bad_query",
        )
    return value.strip()


def _format(value: Any) -> str:
    if value is None:
        return "csv"
    if value not in FORMATS:
        raise ApiError(f"'format' must be one of {', '.join(FORMATS)}", code="bad_format")
    return str(value)


def _instance(value: Any, hubs: Mapping[str, str]) -> str:
    """The configured instance named (none: the first, the default one)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return next(iter(hubs))
    if not isinstance(value, str):
        raise ApiError("'instance' must be text", code="bad_instance")
    if value.strip() not in hubs:
        raise unknown_instance(value.strip())
    return value.strip()


def download_request(body: bytes, *, hubs: Mapping[str, str], key: str | None) -> DownloadRequest:
    """The checked request a JSON body makes, or the 400 that says what is wrong.

    ``hubs`` maps each configured instance to its hub (the default instance first):
    a request naming no hub uses its instance's."""
    fields = _parse(body)
    for name in fields:
        if name not in FIELDS:
            shown = repr(name[:40]) if is_clean(name[:40]) else "given"
            raise ApiError(
                f"unknown field {shown}: a download takes {', '.join(FIELDS)}",
                code="unknown_field",
            )
    object_name = str(_name(fields.get("object"), "object", required=True))
    instance = _instance(fields.get("instance"), hubs)
    return DownloadRequest(
        hub=_name(fields.get("hub"), "hub") or hubs[instance],
        object=object_name,
        query=_query(fields.get("query"), object_name),
        format=_format(fields.get("format")),
        idempotency_key=key,
        instance=instance,
    )
