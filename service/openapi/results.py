"""``GET`` of a download's stored result, as the job API (``/jobs/{id}/result``) and the
dashboard (``/ui/jobs/{id}/result``) both answer it: the file with its ETag and byte
ranges (``service.downloads.serving``), or why there is none."""

from __future__ import annotations

from service.downloads.serving import CONTENT_TYPES
from service.openapi.parts import Schema, error, job_id_param, operation, param

__all__ = ["result_operation"]


def _file(description: str, **headers: str) -> Schema:
    # The media types the file is served as; its bytes are the upstream's, unparsed.
    content: Schema = {media: {"schema": {}} for media in CONTENT_TYPES.values()}
    return {
        "description": description,
        "content": content,
        "headers": {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        },
    }


def result_operation(op_id: str, summary: str) -> Schema:
    file_headers = {
        "ETag": '`"<sha256>"`: the file\'s SHA-256, the same on every replica',
        "Content-Disposition": '`attachment; filename="<object>-<job id>.<format>"`',
        "Accept-Ranges": "`bytes`",
    }
    return operation(
        op_id,
        summary,
        {
            "200": _file(
                "The whole file: `text/csv; charset=utf-8`, `application/json` (a JSON "
                "array) or `application/x-ndjson` (JSON Lines), by the job's format",
                **file_headers,
            ),
            "206": _file(
                "The one byte range asked for (`Range: bytes=...`)",
                **{**file_headers, "Content-Range": "`bytes <first>-<last>/<size>`"},
            ),
            "304": {
                "description": "`If-None-Match` names the ETag: the copy the client has is "
                "the file",
                "headers": {"ETag": {"description": "the ETag", "schema": {"type": "string"}}},
            },
            "404": error(
                "No such job, an upload, or a result not stored (yet, or ever: "
                "`result` in the error says where it stands)",
                "job_not_found",
                "not_a_download",
                "result_not_stored",
            ),
            "416": {
                "description": "The range starts past the end of the file (no body)",
                "headers": {
                    "Content-Range": {
                        "description": "`bytes */<size>`",
                        "schema": {"type": "string"},
                    }
                },
            },
        },
        params=[
            job_id_param(),
            param("Range", "header", {"type": "string"}, "one range of bytes; others are ignored"),
            param(
                "If-Range", "header", {"type": "string"}, "the ETag: the range only if unchanged"
            ),
            param("If-None-Match", "header", {"type": "string"}, "ETags the client has"),
        ],
        secured=True,
    )
