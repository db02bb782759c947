"""``bulkhook instances``: the connector instances a service runs jobs on.

One row per instance (``GET /instances``): its name, whether it is the default one,
its hub and base URL, whether a signature key is set and how many, and its jobs.
The service never sends a secret, and nothing here asks for one: whether keys are
set is all an operator needs to see that callbacks can be verified.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from service.cli.remote import call, connect, print_table, printable, service_options

__all__ = ["add_instances_command"]

COLUMNS = ("instance", "default", "hub", "base URL", "keys", "jobs")


def add_instances_command(commands: Any) -> None:
    instances = commands.add_parser(
        "instances",
        help="list the connector instances and their jobs",
        description="The service's connector instances, the default one first: hub, base "
        "URL, whether callbacks can be verified (signature keys set) and how many jobs "
        "each has. No secret is ever shown.",
    )
    service_options(instances)
    instances.set_defaults(run=lambda args, stdin: _instances(args))


def _keys(instance: dict[str, Any]) -> str:
    """``none``: callbacks cannot be verified (they are refused); else how many keys
    are set: two while a key is being rotated."""
    count = instance.get("signature_keys")
    if not instance.get("signature_key_set") or not isinstance(count, int) or count < 1:
        return "none"
    return str(count)


def _cells(instance: dict[str, Any]) -> list[str]:
    jobs = instance.get("jobs") or {}
    return [
        printable(instance["name"]),
        "yes" if instance.get("default") else "no",
        printable(instance.get("hub") or "-"),
        printable(instance.get("base_url") or "-"),
        _keys(instance),
        str(jobs.get("total", 0)),
    ]


def _instances(args: argparse.Namespace) -> int:
    with connect(args) as client:
        answer = call(client.instances)
    if args.json:
        print(json.dumps(answer))
        return 0
    listed = answer.get("instances") or []
    if not listed:
        print("no instances")
        return 0
    print_table(COLUMNS, [_cells(instance) for instance in listed])
    return 0
