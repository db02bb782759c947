"""With several connector instances, a callback is verified with its job's instance's
keys only: a key of one instance never moves another instance's job, at any URL.

Two sandboxes, ``crm`` and ``shop``, each sign with its own key; one service has
``OC_INSTANCES=crm,shop``. Both sandboxes start from the same seed, so their first jobs
have the same upstream id, as two Open Connectors accounts can.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.callbacks.job_instances import JobInstances
from service.store import Store, StoreError, open_store

from .helpers import (
    CRM_KEY,
    CRM_OLD_KEY,
    SHOP_KEY,
    SHOP_OLD_KEY,
    SIGNATURE_KEY,
    RunningSandbox,
    RunningService,
    assert_error,
    counted,
    deliver,
    essentials,
    genuine,
    instance_job,
    job_now,
    job_url,
    make_job,
    stored_job,
)

StartSandbox = Callable[..., RunningSandbox]
StartService = Callable[..., RunningService]


def two_instances(
    start_service: StartService,
    crm: RunningSandbox,
    shop: RunningSandbox,
    *,
    crm_keys: str = CRM_KEY,
    shop_keys: str = SHOP_KEY,
    **overrides: Any,
) -> RunningService:
    """The service with instances crm (the default) and shop, each with its own keys."""
    return start_service(
        crm,
        oc_instances=("crm", "shop"),
        instance_env={
            "OC_CRM_SIGNATURE_KEYS": crm_keys,
            "OC_SHOP_SIGNATURE_KEYS": shop_keys,
            "OC_SHOP_BASE_URL": shop.api_url,
        },
        callback_grace=60,
        **overrides,
    )


@pytest.fixture
def quiet(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> tuple[RunningService, dict[str, Any], dict[str, Any]]:
    """The two instances' sandboxes send no callbacks (the tests send them); one running
    job each, with the same upstream id."""
    crm = start_sandbox(signature_key=CRM_KEY, drop_callbacks=1.0, job_seconds=60, seed=7)
    shop = start_sandbox(signature_key=SHOP_KEY, drop_callbacks=1.0, job_seconds=60, seed=7)
    service = two_instances(start_service, crm, shop)
    crm_job = instance_job(service, crm, "crm", contacts_csv)
    shop_job = instance_job(service, shop, "shop", contacts_csv)
    assert crm_job["upstream_id"] == shop_job["upstream_id"]
    return service, crm_job, shop_job


def unchanged(service: RunningService, job: dict[str, Any]) -> None:
    """The job now is just as it was: its state, ids, counts and timeline."""
    now = job_now(service, job["id"])
    assert (essentials(now), now["events"]) == (essentials(job), job["events"])


def refused_rows(service: RunningService) -> list[tuple[Any, ...]]:
    """The refusals noted for the dashboard (just after each answer)."""
    time.sleep(0.2)
    return service.query("SELECT reason, job_ref, webhook_id FROM rejected_callbacks ORDER BY id")


def test_jobs_of_both_instances_complete_by_their_own_signed_callbacks(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    crm = start_sandbox(signature_key=CRM_KEY)
    shop = start_sandbox(signature_key=SHOP_KEY)
    service = two_instances(start_service, crm, shop)
    jobs = [
        instance_job(service, crm, "crm", contacts_csv),
        instance_job(service, shop, "shop", contacts_csv),
    ]
    for job in jobs:
        done = service.wait_for(job["id"], {"COMPLETED"})
        assert any(
            (e["source"], e["state"]) == ("callback", "COMPLETED")
            and "signature verified" in e["detail"]
            for e in done["events"]
        ), done["events"]
    assert [job_now(service, job["id"])["instance"] for job in jobs] == ["crm", "shop"]
    assert counted(service, "accepted", "crm") >= 1
    assert counted(service, "accepted", "shop") >= 1
    assert counted(service, "bad_signature") == 0


def test_a_body_signed_with_the_other_instances_key_is_refused_at_every_url(quiet: Any) -> None:
    service, crm_job, shop_job = quiet
    attempts = [
        # (URL, the job the body is about, the key it is signed with)
        (job_url(crm_job), crm_job, SHOP_KEY),
        ("/callbacks/instances/crm", crm_job, SHOP_KEY),
        ("/callbacks", crm_job, SHOP_KEY),
        (job_url(shop_job), shop_job, CRM_KEY),
        ("/callbacks/instances/shop", shop_job, CRM_KEY),
        # The suite's usual key is neither instance's.
        (job_url(shop_job), shop_job, SIGNATURE_KEY),
    ]
    for n, (url, job, key) in enumerate(attempts):
        response = deliver(service, url, genuine(job), f"other-key-{n}", key)
        assert_error(response, 401, "bad_signature")
    unchanged(service, crm_job)
    unchanged(service, shop_job)
    assert service.query("SELECT COUNT(*) FROM deliveries") == [(0,)]
    assert service.query("SELECT COUNT(*) FROM kept_callbacks") == [(0,)]
    # Each noted; at a job's URL against that job (its dashboard page shows it).
    assert sorted(refused_rows(service), key=lambda row: row[2]) == [
        (
            "bad_signature",
            job["id"] if url.startswith("/callbacks/jobs/") else None,
            f"other-key-{n}",
        )
        for n, (url, job, _) in enumerate(attempts)
    ]
    assert counted(service, "bad_signature", "crm") == 3
    assert counted(service, "bad_signature", "shop") == 3
    # Each body, signed with its own instance's key, still applies.
    crm_done = deliver(service, job_url(crm_job), genuine(crm_job), "genuine-crm", CRM_KEY)
    shop_url = "/callbacks/instances/shop"
    shop_done = deliver(service, shop_url, genuine(shop_job), "genuine-shop", SHOP_KEY)
    assert (crm_done.status_code, shop_done.status_code) == (200, 200)
    assert job_now(service, crm_job["id"])["state"] == "COMPLETED"
    assert job_now(service, shop_job["id"])["state"] == "COMPLETED"


def test_a_body_naming_another_instances_job_at_an_instance_url_is_409(quiet: Any) -> None:
    service, crm_job, shop_job = quiet
    # Signed with crm's key, about shop's job: by its payload and by its upstream id
    # (which crm's own job happens to have too), and by its payload alone.
    bodies = [genuine(shop_job), genuine(shop_job, id=None)]
    for n, body in enumerate(bodies):
        for url in ("/callbacks/instances/crm", "/callbacks"):
            response = deliver(service, url, body, f"crm-about-shop-{n}-{url}", CRM_KEY)
            assert_error(response, 409, "wrong_job")
    unchanged(service, crm_job)
    unchanged(service, shop_job)
    assert service.query("SELECT COUNT(*) FROM kept_callbacks") == [(0,)]
    assert service.query("SELECT COUNT(*) FROM deliveries") == [(0,)]
    assert [reason for reason, _, _ in refused_rows(service)] == ["wrong_job"] * 4
    assert counted(service, "wrong_job", "crm") == 4


def test_an_upstream_id_is_looked_up_within_the_urls_instance(quiet: Any) -> None:
    service, crm_job, shop_job = quiet
    # Both jobs have this upstream id: at shop's URL it is shop's job.
    body = json.dumps({"id": shop_job["upstream_id"], "status": "COMPLETED"}).encode()
    response = deliver(service, "/callbacks/instances/shop", body, "by-upstream-id", SHOP_KEY)
    assert response.status_code == 200, response.text
    assert response.json()["job"] == shop_job["id"]
    assert job_now(service, shop_job["id"])["state"] == "COMPLETED"
    unchanged(service, crm_job)


def test_a_callback_kept_at_an_instance_url_is_kept_with_that_instance(quiet: Any) -> None:
    service, crm_job, shop_job = quiet
    body = json.dumps({"id": "77777", "status": "COMPLETED"}).encode()
    kept = deliver(service, "/callbacks/instances/shop", body, "not-yet", SHOP_KEY)
    assert (kept.status_code, kept.json()) == (202, {"status": "kept"})
    assert service.query("SELECT job_ref, instance FROM kept_callbacks") == [("77777", "shop")]
    # crm's body about its own upstream job 77777 is crm's to keep, separately.
    crm_body = json.dumps({"id": "77777", "status": "RUNNING"}).encode()
    other = deliver(service, "/callbacks/instances/crm", crm_body, "not-yet-crm", CRM_KEY)
    assert (other.status_code, other.json()) == (202, {"status": "kept"})
    kept_rows = service.query("SELECT job_ref, instance FROM kept_callbacks ORDER BY id")
    assert kept_rows == [("77777", "shop"), ("77777", "crm")]
    unchanged(service, crm_job)
    unchanged(service, shop_job)


def test_an_instance_url_of_an_instance_not_configured_is_404_and_stores_nothing(
    quiet: Any,
) -> None:
    service, crm_job, shop_job = quiet
    for n, name in enumerate(("billing", "default", "CRM", "x" * 300, "%F0%9F%98%80")):
        body = genuine(crm_job)
        response = deliver(service, f"/callbacks/instances/{name}", body, f"unknown-{n}", CRM_KEY)
        assert_error(response, 404, "unknown_instance")
        assert len(response.content) < 300  # the name is not echoed whole
    assert refused_rows(service) == []
    assert service.query("SELECT COUNT(*) FROM kept_callbacks") == [(0,)]
    assert counted(service, "unknown_instance", "unknown") == 5
    unchanged(service, crm_job)
    unchanged(service, shop_job)
    # Other methods get the usual answer.
    assert service.http.get("/callbacks/instances/crm").status_code == 405


def test_keys_rotate_per_instance(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    # shop's sandbox still signs with shop's previous key; crm's with its current one.
    crm = start_sandbox(signature_key=CRM_KEY, drop_callbacks=1.0, job_seconds=60)
    shop = start_sandbox(signature_key=SHOP_OLD_KEY)
    service = two_instances(
        start_service,
        crm,
        shop,
        crm_keys=f"{CRM_KEY},{CRM_OLD_KEY}",
        shop_keys=f"{SHOP_KEY},{SHOP_OLD_KEY}",
    )
    crm_job = instance_job(service, crm, "crm", contacts_csv)
    shop_job = instance_job(service, shop, "shop", contacts_csv)
    done = service.wait_for(shop_job["id"], {"COMPLETED"})
    assert any("key 1" in e["detail"] for e in done["events"] if e["source"] == "callback")
    # crm's previous key verifies crm's jobs, and is nothing to shop's.
    body = genuine(crm_job, status="RUNNING")
    assert deliver(service, job_url(crm_job), body, "crm-old", CRM_OLD_KEY).status_code == 200
    late = genuine(shop_job, status="RUNNING")
    for url in (job_url(shop_job), "/callbacks/instances/shop"):
        refused = deliver(service, url, late, f"crm-old-at-{url}", CRM_OLD_KEY)
        assert_error(refused, 401, "bad_signature")
    unchanged(service, done)


def test_a_job_of_an_instance_no_longer_configured_is_refused_401(quiet: Any) -> None:
    service, crm_job, _ = quiet
    gone = make_job(instance="billing")
    stored_job(service, gone)
    stored_job(service, gone, upstream_id="4242")
    before = job_now(service, gone.id)
    body = json.dumps({"id": "4242", "status": "COMPLETED", "callback-payload": gone.id})
    for key in (CRM_KEY, SHOP_KEY, SIGNATURE_KEY):
        response = deliver(service, f"/callbacks/jobs/{gone.id}", body.encode(), key, key)
        assert_error(response, 401, "unknown_instance")
    unchanged(service, before)
    assert [(reason, ref) for reason, ref, _ in refused_rows(service)] == [
        ("unknown_instance", gone.id)
    ] * 3
    unchanged(service, crm_job)


def shop_job_watched(
    start_sandbox: StartSandbox, start_service: StartService, store: Any, contacts_csv: Path
) -> tuple[RunningService, dict[str, Any]]:
    """Both instances served over ``store`` (a wrapper that watches the real one), and a
    job of the shop instance that stays running (its callbacks dropped)."""
    crm = start_sandbox(signature_key=CRM_KEY, drop_callbacks=1.0, job_seconds=60)
    shop = start_sandbox(signature_key=SHOP_KEY, drop_callbacks=1.0, job_seconds=60)
    service = two_instances(start_service, crm, shop, store=store)
    return service, instance_job(service, shop, "shop", contacts_csv)


class InstanceReads:
    """The service's store, counting the reads of a job's instance."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.reads: list[str] = []

    async def job_instance(self, job_id: str) -> str | None:
        self.reads.append(job_id)
        return await self._store.job_instance(job_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_jobs_instance_is_read_once_however_many_callbacks_come(
    start_sandbox: StartSandbox,
    start_service: StartService,
    store_url: str,
    contacts_csv: Path,
) -> None:
    store = InstanceReads(open_store(store_url))
    service, job = shop_job_watched(start_sandbox, start_service, store, contacts_csv)
    for n in range(30):
        body = genuine(job, status="RUNNING", recordsCount=n)
        response = deliver(service, job_url(job), body, f"running-{n}", SHOP_KEY)
        assert response.status_code == 200, response.text
    # Forged ones too, and one the other instance signed: the same one read.
    deliver(service, job_url(job), genuine(job), "forged", CRM_KEY)
    assert store.reads == [job["id"]]
    # A made-up job id is read each time: it is never remembered.
    for n in range(3):
        made_up = deliver(service, "/callbacks/jobs/nosuchjob", b"{}", f"made-up-{n}", SHOP_KEY)
        assert_error(made_up, 404, "job_not_found")
    assert store.reads == [job["id"]] + ["nosuchjob"] * 3


def test_the_single_instance_deployment_has_its_default_instance_url(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    service = start_service(start_sandbox(drop_callbacks=1.0, job_seconds=60), callback_grace=60)
    job = service.submit(contacts_csv).json()
    assert job["instance"] == "default"
    elsewhere = deliver(service, "/callbacks/instances/crm", genuine(job), "w-crm")
    assert_error(elsewhere, 404, "unknown_instance")
    done = deliver(service, "/callbacks/instances/default", genuine(job), "w-default")
    assert done.json() == {"status": "accepted", "job": job["id"], "state": "COMPLETED"}
    assert counted(service, "accepted", "default") == 1


def test_the_remembered_instances_are_bounded() -> None:
    remembered = JobInstances(most=3)
    for n in range(10):
        remembered.remember(f"job-{n}", "crm" if n % 2 else "shop")
        assert len(remembered) <= 3
    assert [remembered.get(f"job-{n}") for n in range(10)] == [None] * 7 + ["crm", "shop", "crm"]
    remembered.remember("job-9", "crm")  # again: nothing pushed out
    assert remembered.get("job-7") == "crm"


class FailingInstanceReads(InstanceReads):
    """The service's store, its reads of a job's instance failing while ``down``."""

    down = False

    async def job_instance(self, job_id: str) -> str | None:
        if self.down:
            raise StoreError("the store is away for a moment")
        return await super().job_instance(job_id)


def test_while_the_store_cannot_say_a_jobs_instance_no_key_at_all_is_refused_at_once(
    start_sandbox: StartSandbox,
    start_service: StartService,
    store_url: str,
    contacts_csv: Path,
) -> None:
    store = FailingInstanceReads(open_store(store_url))
    service, job = shop_job_watched(start_sandbox, start_service, store, contacts_csv)
    store.down = True
    forged = deliver(service, job_url(job), genuine(job), "forged", "no-instances-key")
    assert_error(forged, 401, "bad_signature")
    # Signed with a configured key: which instance's it must be is unknown, so it waits.
    waits = deliver(service, job_url(job), genuine(job), "genuine", SHOP_KEY)
    assert_error(waits, 503, "store_unavailable")
    assert int(waits.headers["Retry-After"]) > 0
    unchanged(service, job)
    store.down = False
    again = deliver(service, job_url(job), genuine(job), "genuine", SHOP_KEY)
    assert again.json() == {"status": "accepted", "job": job["id"], "state": "COMPLETED"}


def test_refusal_log_lines_name_the_instance(quiet: Any, caplog: pytest.LogCaptureFixture) -> None:
    service, crm_job, shop_job = quiet
    with caplog.at_level(logging.WARNING, logger="bulkhook.callbacks"):
        deliver(service, job_url(shop_job), genuine(shop_job), "crm-at-shop", CRM_KEY)
        deliver(service, "/callbacks/instances/crm", genuine(shop_job), "shop-job", CRM_KEY)
        deliver(service, "/callbacks/instances/nope", genuine(crm_job), "nope", CRM_KEY)
    named = {
        (record.outcome, record.instance)  # type: ignore[attr-defined]
        for record in caplog.records
        if hasattr(record, "instance")
    }
    assert named == {
        ("bad_signature", "shop"),
        ("wrong_job", "crm"),
        ("unknown_instance", "unknown"),
    }
