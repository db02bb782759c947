"""The API description of the connector instances: ``GET /instances``, its schema,
and the ``instance`` a job runs on (a field, a request field, a list filter), which
``jobs`` puts where each belongs."""

from __future__ import annotations

from service.jobs import State
from service.openapi.parts import Schema, json_response, obj, operation, param, ref

__all__ = [
    "INSTANCE_PATTERN",
    "instance_field",
    "instance_filter",
    "instance_paths",
    "instance_request_field",
    "instance_schemas",
]

# A configured instance's name: what OC_INSTANCES accepts.
INSTANCE_PATTERN = "^[a-z0-9][a-z0-9-]{0,39}$"


def instance_field() -> Schema:
    """A job's ``instance``: set when the job is made, never changed."""
    return {
        "type": "string",
        "pattern": INSTANCE_PATTERN,
        "description": "the connector instance the job runs on (its upstream account, "
        "credentials and signature keys); `default` without OC_INSTANCES",
    }


def instance_request_field() -> Schema:
    """``instance`` in ``POST /jobs``, a form field or a JSON field."""
    return {
        "type": "string",
        "pattern": INSTANCE_PATTERN,
        "description": "the connector instance to run the job on (one `GET /instances` "
        "lists); default: the default instance. An unknown one is 400 `unknown_instance`",
    }


def instance_filter(what: str) -> Schema:
    """The ``?instance=`` parameter of a listing."""
    return param("instance", "query", {"type": "string", "pattern": INSTANCE_PATTERN}, what)


def instance_schemas() -> dict[str, Schema]:
    return {
        "Instances": obj(
            {
                "instances": {
                    "type": "array",
                    "items": ref("Instance"),
                    "description": "in configuration order: the default instance first",
                }
            }
        ),
        "Instance": obj(
            {
                "name": {"type": "string", "pattern": INSTANCE_PATTERN},
                "default": {
                    "type": "boolean",
                    "description": "true for the instance a request naming none uses, "
                    "whose instance-wide callback URL is `/callbacks`",
                },
                "hub": {"type": "string", "description": "the default hub of its jobs"},
                "base_url": {
                    "type": "string",
                    "description": "the upstream's base URL, without credentials; "
                    "`embedded` for the embedded sandbox",
                },
                "signature_key_set": {
                    "type": "boolean",
                    "description": "whether its callbacks can be verified (the keys "
                    "themselves are never shown)",
                },
                "signature_keys": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "how many keys verify its callbacks (two while one is "
                    "being rotated)",
                },
                "jobs": obj(
                    {
                        "total": {"type": "integer", "minimum": 0},
                        "by_state": {
                            "type": "object",
                            "propertyNames": {"enum": [str(state) for state in State]},
                            "additionalProperties": {"type": "integer", "minimum": 0},
                            "description": "the count of its jobs in each state they are in",
                        },
                    }
                ),
            }
        ),
    }


def instance_paths() -> dict[str, Schema]:
    return {
        "/instances": {
            "get": operation(
                "listInstances",
                "The connector instances jobs run on, with their job counts (never a secret)",
                {"200": json_response(ref("Instances"), "Every configured instance")},
                secured=True,
            )
        }
    }
