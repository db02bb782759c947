"""The building blocks of the API description, shared by ``jobs`` (the job API)
and ``dashboard`` (the dashboard's routes): a schema, a JSON response, an
error response listing its codes, a parameter, an operation."""

from __future__ import annotations

from typing import Any

__all__ = [
    "JSON",
    "Schema",
    "enum_of",
    "error",
    "job_id_param",
    "json_response",
    "nullable",
    "obj",
    "operation",
    "param",
    "ref",
]

JSON = "application/json"
Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(kind: str, **extra: Any) -> Schema:
    return {"type": [kind, "null"], **extra}


def obj(properties: dict[str, Schema], required: list[str] | None = None) -> Schema:
    needed = list(properties) if required is None else required
    return {"type": "object", "required": needed, "properties": properties}


def enum_of(values: Any) -> Schema:
    return {"type": "string", "enum": [str(value) for value in values]}


def json_response(schema: Schema, description: str, **headers: str) -> Schema:
    response: Schema = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()
        }
    return response


def error(description: str, *codes: str, **headers: str) -> Schema:
    listed = ", ".join(f"`{code}`" for code in codes)
    return json_response(ref("Error"), f"{description}. Error codes: {listed}.", **headers)


def param(name: str, where: str, schema: Schema, description: str = "", **extra: Any) -> Schema:
    param: Schema = {"name": name, "in": where, "schema": schema, **extra}
    if description:
        param["description"] = description
    return param


def job_id_param() -> Schema:
    return param("job_id", "path", {"type": "string"}, "the job's id", required=True)


def operation(
    op_id: str,
    summary: str,
    responses: dict[str, Schema],
    *,
    params: list[Schema] | None = None,
    body: Schema | None = None,
    secured: bool = False,
) -> Schema:
    """One operation; ``secured`` adds the bearer requirement and its 401."""
    operation: Schema = {"operationId": op_id, "summary": summary}
    if params:
        operation["parameters"] = params
    if body is not None:
        operation["requestBody"] = body
    operation["responses"] = dict(responses)
    if secured:
        operation["security"] = [{"bearer": []}]
        operation["responses"]["401"] = error(
            "A valid bearer token is required", "unauthorized", **{"WWW-Authenticate": "Bearer"}
        )
    return operation
