"""``bulkhook demo``: the whole flow on loopback, with nothing to configure.

A sandbox upstream and the service start on free loopback ports with a throwaway
database. The sample contacts are submitted twice: first the signed callback
completes the job; then the sandbox drops every callback and polling completes it.
"""

from __future__ import annotations

import dataclasses
import secrets
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from service.app import create_app
from service.cli.api_client import ServiceClient
from service.config import Settings
from service.sandbox import API_PREFIX, Sandbox
from service.server.thread import ServerThread

__all__ = ["run_demo"]


def _say(text: str) -> None:
    print(text, flush=True)


def _follow(client: ServiceClient, job: dict[str, Any]) -> dict[str, Any]:
    final = job
    for update in client.follow(job["id"], interval=0.2, timeout=60):
        _say(f"    state {update['state']} (via {update['last_source']})")
        final = update
    return client.job(final["id"])


def _timeline(job: dict[str, Any]) -> None:
    for event in job["events"]:
        _say(f"      {event['at']}  {event['source']:<8} {event['state']:<11} {event['detail']}")


def run_demo() -> int:
    key = secrets.token_urlsafe(24)
    sample = resources.files("service") / "samples" / "contacts.csv"
    with tempfile.TemporaryDirectory(prefix="bulkhook-demo-") as tmp:
        contacts = Path(tmp) / "contacts.csv"
        contacts.write_bytes(sample.read_bytes())
        sandbox = Sandbox(signature_key=key, job_seconds=1.0, callback_retry_base=0.25)
        upstream = ServerThread(sandbox.app).start()
        service = ServerThread()
        settings = Settings(
            oc_base_url=upstream.url + API_PREFIX,
            oc_user_secret=secrets.token_urlsafe(12),
            oc_org_secret=secrets.token_urlsafe(12),
            oc_element_token=secrets.token_urlsafe(12),
            signature_keys=(key,),
            public_url=service.url,
            database_url=f"sqlite:///{tmp}/demo.db",
            results_dir=f"{tmp}/results",
            callback_grace=2.0,
            poll_interval=1.0,
            poll_max_interval=2.0,
        )
        service.start(create_app(settings))
        try:
            return _run(service.url, sandbox, contacts, upstream.url)
        finally:
            service.stop()
            upstream.stop()


def _run(url: str, sandbox: Sandbox, contacts: Path, upstream_url: str) -> int:
    _say(f"sandbox upstream on {upstream_url}{API_PREFIX}; service on {url}")
    ok = True
    with ServiceClient(url) as client:
        _say("\n1. Submit the sample contacts; the upstream calls back with a signed callback.")
        _say(
            "    (Open Connectors may call back up to a minute after a job ends; "
            "`bulkhook sandbox --callback-delay 60` does the same.)"
        )
        job = client.submit(contacts, object_name="contact")
        _say(f"    job {job['id']} accepted as upstream job {job['upstream_id']}")
        final = _follow(client, job)
        _timeline(final)
        callback_ok = final["state"] == "COMPLETED" and final["last_source"] == "callback"
        verified = any(
            e["source"] == "callback" and "signature verified" in e["detail"]
            for e in final["events"]
        )
        _say(
            f"    => {final['state']} by a verified callback, "
            f"{final['records_count']} records, {final['records_failed_count']} failed"
            if callback_ok and verified
            else f"    => unexpected: {final['state']} via {final['last_source']}"
        )
        ok &= callback_ok and verified

        _say("\n2. The upstream now loses every callback; polling finishes the job anyway.")
        sandbox.options = dataclasses.replace(sandbox.options, drop_callbacks=1.0)
        job = client.submit(contacts, object_name="contact")
        _say(f"    job {job['id']} accepted as upstream job {job['upstream_id']}")
        final = _follow(client, job)
        _timeline(final)
        polled_ok = final["state"] == "COMPLETED" and final["last_source"] == "poll"
        _say(
            f"    => {final['state']} by polling after the callback grace period"
            if polled_ok
            else f"    => unexpected: {final['state']} via {final['last_source']}"
        )
        ok &= polled_ok
    _say("\ndemo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1
