"""Several connector instances: each its own settings, upstream, poll budget and jobs."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.config import ConfigError, Settings
from service.jobs import Observation, Source, State
from service.sandbox import API_PREFIX
from service.store import Delivery, Store

from .helpers import (
    CONFIGURED_SECRETS,
    CRM_KEY,
    SHOP_KEY,
    RecordingUpstream,
    StartSandbox,
    StartService,
    assert_error,
    eventually,
    make_job,
    sandbox_result,
    start_two_instances,
    two_instance_settings,
)

DONE = {"COMPLETED", "ERROR", "ABORTED", "CANCELLED", "TIMED_OUT", "SUBMIT_FAILED"}
# Both sandboxes drop every callback: the jobs finish by polling alone.
POLLED = {"drop_callbacks": 1.0}

# The unnamed variables of a deployment whose instances share one upstream account.
UNNAMED = {
    "OC_BASE_URL": "https://api.example.com/elements/api-v2",
    "OC_USER_SECRET": "unnamed-user",
    "OC_ORG_SECRET": "unnamed-org",
    "OC_ELEMENT_TOKEN": "unnamed-token",
}


def settings(**env: str) -> Settings:
    return Settings.from_env(env, env_file=None)


def refused(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        settings(**env)
    return str(caught.value)


# Settings -------------------------------------------------------------------------


def test_without_oc_instances_the_unnamed_variables_are_the_one_instance_default() -> None:
    single = settings(**UNNAMED, OC_HUB="crm", OC_SIGNATURE_KEYS="k1,k2")
    [instance] = single.instances
    assert single.default_instance == "default"
    assert (instance.name, instance.base_url, instance.hub) == (
        "default",
        UNNAMED["OC_BASE_URL"],
        "crm",
    )
    assert instance.signature_keys == ("k1", "k2")
    assert (instance.user_secret, instance.org_secret, instance.element_token) == (
        "unnamed-user",
        "unnamed-org",
        "unnamed-token",
    )
    # Variables of an instance nobody named are not read.
    assert settings(OC_CRM_BASE_URL="not a url").instances[0].base_url is None
    assert settings().embedded


def test_named_instances_take_their_own_variables_and_fall_back_to_the_unnamed_ones() -> None:
    named = settings(
        **UNNAMED,
        OC_INSTANCES="crm, shop-eu",
        OC_SIGNATURE_KEYS="shared",
        OC_CRM_SIGNATURE_KEYS="crm-key",
        OC_SHOP_EU_BASE_URL="https://eu.example.com/elements/api-v2/",
        OC_SHOP_EU_ELEMENT_TOKEN="eu-token",
        OC_SHOP_EU_HUB="crm",
        OC_SHOP_EU_SIGNATURE_KEYS="eu-new,eu-old",
    )
    crm, shop = named.instances
    assert named.default_instance == "crm"
    assert not named.embedded
    assert (crm.name, crm.base_url, crm.hub, crm.signature_keys) == (
        "crm",
        UNNAMED["OC_BASE_URL"],
        "marketing",
        ("crm-key",),
    )
    assert crm.element_token == "unnamed-token"
    assert (shop.name, shop.base_url, shop.hub, shop.signature_keys) == (
        "shop-eu",
        "https://eu.example.com/elements/api-v2",
        "crm",
        ("eu-new", "eu-old"),
    )
    assert (shop.user_secret, shop.element_token) == ("unnamed-user", "eu-token")
    assert named.instance_warnings == ()


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"OC_INSTANCES": "Crm"}, "OC_INSTANCES"),
        ({"OC_INSTANCES": "crm,crm"}, "OC_INSTANCES"),
        ({"OC_INSTANCES": "-crm"}, "OC_INSTANCES"),
        ({"OC_INSTANCES": "a" * 41}, "OC_INSTANCES"),
        ({"OC_INSTANCES": "crm"}, "OC_CRM_BASE_URL"),
        ({"OC_INSTANCES": "crm", "OC_CRM_BASE_URL": "https://crm.example.com"}, "OC_CRM_"),
        ({**UNNAMED, "OC_INSTANCES": "crm", "OC_CRM_BASE_URL": "ftp://x"}, "OC_CRM_BASE_URL"),
        ({**UNNAMED, "OC_INSTANCES": "crm", "OC_CRM_HUB": "a/b"}, "OC_CRM_HUB"),
        ({**UNNAMED, "OC_INSTANCES": "crm", "OC_CRM_ELEMENT_TOKEN": "a b"}, "OC_CRM_ELEMENT_TOKEN"),
        ({**UNNAMED, "OC_INSTANCES": "a-b", "OC_A_B_ORG_SECRET": "x\ty"}, "OC_A_B_ORG_SECRET"),
        ({**UNNAMED, "OC_INSTANCES": "crm", "OC_CRM_USER_SECRET": "REPLACE_ME"}, "OC_CRM_USER"),
    ],
)
def test_a_bad_instance_setting_stops_start_up_naming_the_variable(
    env: dict[str, str], variable: str
) -> None:
    message = refused(env)
    assert message.startswith(variable)
    assert "\n" not in message


def test_an_instance_setting_error_never_shows_the_value() -> None:
    secret = "s3cr3t-token with-a-space"
    message = refused({**UNNAMED, "OC_INSTANCES": "crm", "OC_CRM_ELEMENT_TOKEN": secret})
    assert "OC_CRM_ELEMENT_TOKEN" in message
    assert "s3cr3t" not in message
    url = "https://user:hunter2@crm.example.com/x?token=hunter2"
    message = refused({**UNNAMED, "OC_INSTANCES": "crm", "OC_CRM_BASE_URL": url})
    assert message.startswith("OC_CRM_BASE_URL") and "hunter2" not in message


def test_instances_sharing_a_signature_key_start_with_a_warning_naming_both() -> None:
    shared = settings(
        **UNNAMED,
        OC_INSTANCES="crm,shop,erp",
        OC_SIGNATURE_KEYS="the-shared-key",
        OC_ERP_SIGNATURE_KEYS="erp-own-key",
    )
    [warning] = shared.instance_warnings
    assert "'crm'" in warning and "'shop'" in warning and "erp" not in warning
    assert "the-shared-key" not in warning


def test_no_instance_secret_is_in_a_repr() -> None:
    named = settings(
        **UNNAMED,
        OC_INSTANCES="crm",
        OC_CRM_SIGNATURE_KEYS="crm-secret-key",
        OC_CRM_ELEMENT_TOKEN="crm-secret-token",
    )
    shown = repr(named) + repr(named.instances)
    for secret in ("crm-secret-key", "crm-secret-token", *list(UNNAMED.values())[1:]):
        assert secret not in shown


# Store ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_upstream_ids_are_looked_up_within_one_instance(store: Store) -> None:
    crm, _ = await store.create_job(make_job(instance="crm"))
    shop, _ = await store.create_job(make_job(instance="shop"))
    for job in (crm, shop):  # both accounts have an upstream job 1234
        await store.apply(job.id, Observation(Source.SUBMIT, status="CREATED"), upstream_id="1234")
    found_crm = await store.find_by_upstream_id("1234", "crm")
    found_shop = await store.find_by_upstream_id("1234", "shop")
    assert found_crm is not None and found_crm.id == crm.id
    assert found_shop is not None and found_shop.id == shop.id
    assert await store.find_by_upstream_id("1234", "erp") is None
    stored = await store.get_job(shop.id)
    assert stored is not None and stored.instance == "shop"


@pytest.mark.anyio
async def test_jobs_are_listed_and_counted_by_instance(store: Store) -> None:
    crm = [(await store.create_job(make_job(instance="crm")))[0] for _ in range(3)]
    shop = (await store.create_job(make_job(instance="shop")))[0]
    await store.apply(shop.id, Observation(Source.SUBMIT, state=State.SUBMIT_FAILED))
    assert [job.id for job in await store.list_jobs(instance="crm")] == sorted(
        (job.id for job in crm), reverse=True
    )
    assert [job.id for job in await store.list_jobs(instance="shop")] == [shop.id]
    assert await store.list_jobs(instance="erp") == []
    assert len(await store.list_jobs()) == 4
    assert await store.count_by_instance() == {
        "crm": {"SUBMITTING": 3},
        "shop": {"SUBMIT_FAILED": 1},
    }


@pytest.mark.anyio
async def test_a_kept_callback_is_only_for_the_instance_that_verified_it(store: Store) -> None:
    delivery = Delivery("hook-1", time.time(), "777")
    assert await store.keep_callback(delivery, reason="unknown_job", body=b"{}", instance="shop")
    assert await store.kept_for(["777"], "crm") == []
    [kept] = await store.kept_for(["777"], "shop")
    assert kept.instance == "shop"
    # crm's job 777 is no reason to hand shop's callback over: it is still kept.
    crm, _ = await store.create_job(make_job(instance="crm"))
    await store.apply(crm.id, Observation(Source.SUBMIT, status="CREATED"), upstream_id="777")
    later = Delivery("hook-2", time.time(), "777")
    assert await store.keep_callback(later, reason="unknown_job", body=b"[]", instance="shop") == (
        "kept"
    )
    crm_side = Delivery("hook-3", time.time(), "777")
    assert await store.keep_callback(crm_side, reason="unknown_job", body=b"1", instance="crm") == (
        "known"
    )


@pytest.mark.anyio
async def test_the_same_body_kept_for_one_instance_never_shadows_anothers(store: Store) -> None:
    body = b'{"id": "77777", "status": "COMPLETED"}'
    digest = hashlib.sha256(body).hexdigest()
    first = Delivery("crm-hook", time.time(), "77777", digest)
    second = Delivery("shop-hook", time.time(), "77777", digest)
    assert await store.keep_callback(first, reason="unknown_job", body=body, instance="crm") == (
        "kept"
    )
    assert await store.keep_callback(second, reason="unknown_job", body=body, instance="shop") == (
        "kept"
    )
    [kept] = await store.kept_for(["77777"], "shop")
    assert (kept.webhook_id, kept.body) == ("shop-hook", body)


@pytest.mark.anyio
async def test_one_instances_kept_callbacks_never_push_out_anothers(store: Store) -> None:
    store.kept_limits = (3, 64 << 20)
    shop = Delivery("shop-hook", time.time(), "88888")
    assert await store.keep_callback(shop, reason="unknown_job", body=b"{}", instance="shop")
    for n in range(5):
        crm = Delivery(f"crm-hook-{n}", time.time(), f"5000{n}")
        await store.keep_callback(crm, reason="unknown_job", body=b"[%d]" % n, instance="crm")
    assert [kept.webhook_id for kept in await store.kept_for(["88888"], "shop")] == ["shop-hook"]
    crm_refs = [f"5000{n}" for n in range(5)]
    assert [kept.webhook_id for kept in await store.kept_for(crm_refs, "crm")] == [
        "crm-hook-2",
        "crm-hook-3",
        "crm-hook-4",
    ]


# The service ------------------------------------------------------------------------


def test_an_upload_on_each_instance_goes_to_its_own_upstream_and_completes_by_polling(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    two = start_two_instances(start_sandbox, start_service, POLLED, callback_grace=0.2)
    service = two.service
    on_crm = service.submit(contacts_csv).json()  # no instance named: the default, crm
    on_shop = service.submit(contacts_csv, object="contacts", instance="shop").json()
    assert (on_crm["instance"], on_crm["hub"]) == ("crm", "marketing")
    assert (on_shop["instance"], on_shop["hub"]) == ("shop", "crm")  # shop's own hub
    for job in (on_crm, on_shop):
        final = service.wait_for(job["id"], DONE)
        assert (final["state"], final["last_source"]) == ("COMPLETED", "poll")
    # Each sandbox accepts only its own instance's credentials and holds only its job.
    [crm_job] = two.crm.sandbox.jobs.values()
    [shop_job] = two.shop.sandbox.jobs.values()
    assert str(crm_job.id) == on_crm["upstream_id"] and crm_job.hub == "marketing"
    assert str(shop_job.id) == on_shop["upstream_id"] and shop_job.hub == "crm"
    assert two.crm.sandbox.calls["status"] > 0 and two.shop.sandbox.calls["status"] > 0
    listed = service.http.get("/jobs", params={"instance": "shop"}).json()["jobs"]
    assert [job["id"] for job in listed] == [on_shop["id"]]
    metrics = service.http.get("/metrics").text
    assert 'bulkhook_upstream_calls_total{instance="shop",operation="submit",status="200"}' in (
        metrics
    )
    assert 'bulkhook_jobs{instance="crm",state="COMPLETED"} 1.0' in metrics


def test_jobs_started_through_the_api_on_each_instance_complete_by_its_own_signed_callbacks(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    two = start_two_instances(start_sandbox, start_service, callback_grace=60)
    service = two.service
    on_crm = service.submit(contacts_csv).json()
    on_shop = service.submit(contacts_csv, object="contacts", instance="shop").json()
    done = {job["id"]: service.wait_for(job["id"], DONE) for job in (on_crm, on_shop)}
    for job in done.values():
        assert (job["state"], job["last_source"]) == ("COMPLETED", "callback")
        [verified] = [e for e in job["events"] if e["source"] == "callback"]
        assert "signature verified" in verified["detail"]
    # Each sandbox signed with its own instance's key and saw its callback taken.
    assert [entry["outcome"] for entry in two.crm.sandbox.callback_log] == [200]
    assert [entry["outcome"] for entry in two.shop.sandbox.callback_log] == [200]
    # No status poll was needed on either instance.
    assert two.crm.sandbox.calls["status"] == 0 and two.shop.sandbox.calls["status"] == 0


def test_a_large_upload_naming_its_instance_after_the_file_sends_nothing_to_another(
    start_sandbox: StartSandbox, start_service: StartService
) -> None:
    """A relay starts while the file still arrives; with several instances it waits to
    know the upload's instance, so the default instance's upstream never sees a byte."""
    shop = start_sandbox(signature_key=SHOP_KEY)
    crm = RecordingUpstream({"id": 1, "status": "CREATED"})
    service = start_service(
        shop,
        oc_base_url=crm.url + API_PREFIX,
        oc_instances=("crm", "shop"),
        instance_env={
            "OC_CRM_SIGNATURE_KEYS": CRM_KEY,
            "OC_SHOP_SIGNATURE_KEYS": SHOP_KEY,
            "OC_SHOP_BASE_URL": shop.api_url,
        },
    )
    boundary = "instance-after-the-file"
    rows = b"email,first\n" + b"".join(b"u%d@example.com,N\n" % n for n in range(250_000))
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="object"\r\n\r\ncontact\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="c.csv"\r\n'
        "Content-Type: text/csv\r\n\r\n"
    ).encode()
    tail = (
        f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="instance"\r\n\r\nshop'
        f"\r\n--{boundary}--\r\n"
    ).encode()

    def body() -> Iterator[bytes]:
        yield head
        for start in range(0, len(rows), 1 << 20):
            yield rows[start : start + (1 << 20)]
        time.sleep(1.0)  # the file is in; the instance is not yet
        yield tail

    answer = service.http.post(
        "/jobs",
        content=body(),
        headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(head) + len(rows) + len(tail)),
        },
    )
    assert answer.status_code == 202, answer.text
    assert answer.json()["instance"] == "shop"
    assert [job.hub for job in shop.sandbox.jobs.values()] == ["marketing"]
    assert (crm.received, crm.requests) == (0, [])


def test_a_download_on_the_second_instance_comes_from_its_upstream(
    start_sandbox: StartSandbox, start_service: StartService
) -> None:
    two = start_two_instances(start_sandbox, start_service, POLLED, callback_grace=0.2)
    answer = two.service.download("contacts", instance="shop")
    assert answer.status_code == 202, answer.text
    assert (answer.json()["instance"], answer.json()["hub"]) == ("shop", "crm")
    job = two.service.wait_for_result(answer.json()["id"], {"stored"})
    assert two.crm.sandbox.jobs == {}
    [upstream_job] = two.shop.sandbox.jobs.values()
    assert upstream_job.direction == "DOWNLOAD"
    result = two.service.http.get(f"/jobs/{job['id']}/result")
    assert result.content == sandbox_result(two.shop, job["upstream_id"], "csv")
    metrics = two.service.http.get("/metrics").text
    assert 'bulkhook_downloads_total{instance="shop",outcome="stored"} 1.0' in metrics


def test_an_unknown_instance_is_refused_and_creates_no_job(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    two = start_two_instances(start_sandbox, start_service)
    service = two.service
    assert_error(service.submit(contacts_csv, instance="erp"), 400, "unknown_instance")
    assert_error(service.download("contact", instance="erp"), 400, "unknown_instance")
    assert_error(service.download("contact", instance=7), 400, "bad_instance")
    assert_error(service.http.get("/objects", params={"instance": "erp"}), 400, "unknown_instance")
    assert_error(service.http.get("/jobs", params={"instance": "Not A Name"}), 400, "bad_instance")
    assert service.http.get("/jobs").json()["jobs"] == []
    assert two.crm.sandbox.jobs == {} and two.shop.sandbox.jobs == {}
    # A name that is valid but not configured simply matches no job.
    assert service.http.get("/jobs", params={"instance": "erp"}).json()["jobs"] == []


def test_objects_are_listed_from_the_named_instance(
    start_sandbox: StartSandbox, start_service: StartService
) -> None:
    two = start_two_instances(start_sandbox, start_service)
    shop = two.service.http.get("/objects", params={"instance": "shop"})
    assert shop.status_code == 200 and shop.json()["hub"] == "crm"
    assert two.shop.sandbox.calls["objects"] == 1 and two.crm.sandbox.calls["objects"] == 0


def test_get_instances_shows_each_instance_and_never_a_secret(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    two = start_two_instances(start_sandbox, start_service, api_tokens=("api-token-1",))
    service = two.service
    assert_error(service.http.get("/instances"), 401, "unauthorized")
    auth = {"Authorization": "Bearer api-token-1"}
    service.submit(contacts_csv, object="contacts", instance="shop", headers=auth)
    answer = service.http.get("/instances", headers=auth)
    assert answer.status_code == 200
    crm, shop = answer.json()["instances"]
    assert crm == {
        "name": "crm",
        "default": True,
        "hub": "marketing",
        "base_url": two.crm.api_url,
        "signature_key_set": True,
        "signature_keys": 1,
        "jobs": {"total": 0, "by_state": {}},
    }
    assert (shop["name"], shop["default"], shop["hub"], shop["base_url"]) == (
        "shop",
        False,
        "crm",
        two.shop.api_url,
    )
    assert shop["jobs"]["total"] == 1 and sum(shop["jobs"]["by_state"].values()) == 1
    for secret in (*CONFIGURED_SECRETS, CRM_KEY, SHOP_KEY, "api-token-1"):
        assert secret not in answer.text


def test_a_single_instance_deployment_lists_its_one_instance(
    start_service: StartService, contacts_csv: Path
) -> None:
    service = start_service()  # the embedded sandbox
    job = service.submit(contacts_csv).json()
    assert job["instance"] == "default"
    [default] = service.http.get("/instances").json()["instances"]
    assert (default["name"], default["default"], default["base_url"]) == (
        "default",
        True,
        "embedded",
    )
    assert default["signature_key_set"] and default["jobs"]["total"] == 1


def test_the_poll_budget_holds_per_instance(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    rate = 5
    two = start_two_instances(
        start_sandbox,
        start_service,
        {"drop_callbacks": 1.0, "job_seconds": 0.1},
        callback_grace=0.5,
        poll_interval=0.2,
        poll_rate=rate,
    )
    ids = []
    for _ in range(12):
        ids.append(two.service.submit(contacts_csv).json()["id"])
        ids.append(
            two.service.submit(contacts_csv, object="contacts", instance="shop").json()["id"]
        )
    for job_id in ids:
        assert two.service.wait_for(job_id, DONE, within=30)["state"] == "COMPLETED"
    crm_seconds = {int(at) for at, _ in two.crm.sandbox.status_log}
    shop_seconds = {int(at) for at, _ in two.shop.sandbox.status_log}
    assert crm_seconds & shop_seconds  # both instances were polled at the same time
    for upstream in (two.crm, two.shop):
        # As each upstream counts its own calls (give or take one call's network
        # jitter at a second's edge, as for a single instance).
        assert upstream.sandbox.stats()["status_calls_busiest_second"] <= rate + 1


def test_a_restart_keeps_each_jobs_instance(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    two = start_two_instances(
        start_sandbox, start_service, {"drop_callbacks": 1.0, "job_seconds": 1.0}
    )
    on_shop = two.service.submit(contacts_csv, object="contacts", instance="shop").json()
    assert on_shop["upstream_id"] is not None
    two.service.server.stop()
    again = start_service(two.crm, **two_instance_settings(two.crm, two.shop))
    final = again.wait_for(on_shop["id"], DONE)
    assert (final["instance"], final["state"]) == ("shop", "COMPLETED")
    assert two.crm.sandbox.calls["status"] == 0  # never asked the wrong account


def test_a_job_whose_instance_is_gone_is_not_polled_but_still_served(
    start_sandbox: StartSandbox,
    start_service: StartService,
    contacts_csv: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    two = start_two_instances(
        start_sandbox, start_service, {"drop_callbacks": 1.0, "job_seconds": 60}
    )
    on_shop = two.service.submit(contacts_csv, object="contacts", instance="shop").json()
    two.service.server.stop()
    polled = two.shop.sandbox.calls["status"]
    caplog.set_level(logging.WARNING, logger="bulkhook.poller")
    # Restarted with crm alone: shop is no longer configured.
    crm_only = start_service(two.crm, oc_instances=("crm",))
    seen: set[float] = set()

    def looked_at_twice() -> bool:
        [(due,)] = crm_only.query(f"SELECT next_poll_at FROM jobs WHERE id = '{on_shop['id']}'")
        seen.add(due)
        return len(seen) >= 3

    eventually(looked_at_twice, within=20)
    assert two.shop.sandbox.calls["status"] == polled
    lines = [r for r in caplog.records if "is not polled" in r.getMessage()]
    assert len(lines) == 1 and on_shop["id"] in lines[0].getMessage()
    assert (lines[0].job_id, lines[0].instance) == (on_shop["id"], "shop")  # type: ignore[attr-defined]
    job = crm_only.http.get(f"/jobs/{on_shop['id']}")
    assert job.status_code == 200 and job.json()["instance"] == "shop"
    refresh = crm_only.http.post(f"/jobs/{on_shop['id']}/refresh")
    assert_error(refresh, 409, "unknown_instance")
