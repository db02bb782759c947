"""What a user sees of several connector instances: the ``bulkhook`` commands, the
dashboard and the API description, against a real service with two instances
(``crm`` and ``shop``), each its own sandbox upstream signing with its own key."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker

from service.openapi.jobs import openapi_spec

from .helpers import (
    CONFIGURED_SECRETS,
    RunningService,
    StartSandbox,
    StartService,
    TwoInstances,
    eventually,
    job_now,
    run_bulkhook,
    start_two_instances,
    write_csv,
)


@pytest.fixture
def two(start_sandbox: StartSandbox, start_service: StartService) -> TwoInstances:
    """OC_INSTANCES=crm,shop: crm (the default) on hub marketing, shop on hub crm."""
    return start_two_instances(start_sandbox, start_service)


def bulkhook(service: RunningService, *args: str) -> Any:
    result = run_bulkhook(*args, "--url", service.url)
    for secret in CONFIGURED_SECRETS:
        assert secret not in result.stdout + result.stderr
    return result


def plain_rows(stdout: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of a command's plain (piped) table."""
    header, *rows = stdout.splitlines()
    return header.split(), [row.split() for row in rows]


def submitted(service: RunningService, csv: Path, **fields: str) -> dict[str, Any]:
    answer = service.submit(csv, **fields)
    assert answer.status_code == 202, answer.text
    return service.wait_for(answer.json()["id"], {"COMPLETED"})


def conforms(name: str, body: Any) -> None:
    spec = openapi_spec()
    schema = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    Draft202012Validator(schema, format_checker=FormatChecker()).validate(body)


# The commands ---------------------------------------------------------------------


def test_submit_with_an_instance_runs_the_job_on_that_instances_upstream(
    two: TwoInstances, contacts_csv: Path
) -> None:
    result = bulkhook(
        two.service,
        "submit",
        str(contacts_csv),
        "--object",
        "contacts",
        "--instance",
        "shop",
        "--wait",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "COMPLETED" in lines[-1] and "instance shop" in lines[-1]
    job_id = lines[-1].split()[1]
    job = two.service.http.get(f"/jobs/{job_id}").json()
    assert (job["instance"], job["hub"], job["state"]) == ("shop", "crm", "COMPLETED")
    # The records went to shop's upstream, none to crm's.
    assert len(two.shop.sandbox.objects[("crm", "contacts")].rows) == 10
    assert not two.crm.sandbox.objects
    status = bulkhook(two.service, "status", job_id)
    assert status.returncode == 0
    assert "instance shop" in status.stdout.splitlines()[0]


def test_submit_without_an_instance_uses_the_default_one_and_its_hub(
    two: TwoInstances, contacts_csv: Path
) -> None:
    result = bulkhook(
        two.service, "submit", str(contacts_csv), "--object", "contact", "--wait", "--json"
    )
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout.splitlines()[-1])
    assert (job["instance"], job["hub"], job["state"]) == ("crm", "marketing", "COMPLETED")
    assert not two.shop.sandbox.objects


def test_submit_to_an_instance_not_configured_starts_no_job(
    two: TwoInstances, contacts_csv: Path
) -> None:
    result = bulkhook(
        two.service, "submit", str(contacts_csv), "--object", "contact", "--instance", "erp"
    )
    assert result.returncode == 1
    assert "unknown_instance" in result.stderr and "Traceback" not in result.stderr
    assert two.service.http.get("/jobs").json()["jobs"] == []


def test_export_with_an_instance_queries_that_instances_upstream(
    two: TwoInstances, contacts_csv: Path, tmp_path: Path
) -> None:
    submitted(two.service, contacts_csv, instance="shop", object="contacts")
    target = tmp_path / "shop-contacts.csv"
    result = bulkhook(
        two.service, "export", "contacts", "--instance", "shop", "--wait", "-o", str(target)
    )
    assert result.returncode == 0, result.stderr
    assert "instance shop" in result.stdout.splitlines()[0]
    assert len(target.read_text().splitlines()) == 11  # the header and the 10 loaded
    [download] = two.service.http.get("/jobs", params={"direction": "download"}).json()["jobs"]
    assert download["instance"] == "shop"


def test_jobs_with_an_instance_lists_only_its_jobs_and_every_row_names_its_instance(
    two: TwoInstances, contacts_csv: Path
) -> None:
    shop_job = submitted(two.service, contacts_csv, instance="shop", object="contacts")
    crm_job = submitted(two.service, contacts_csv)
    everything = bulkhook(two.service, "jobs")
    assert everything.returncode == 0, everything.stderr
    header, rows = plain_rows(everything.stdout)
    column = header.index("instance")
    assert {(row[0], row[column]) for row in rows} == {
        (shop_job["id"], "shop"),
        (crm_job["id"], "crm"),
    }
    only = bulkhook(two.service, "jobs", "--instance", "shop")
    assert only.returncode == 0, only.stderr
    assert [row[0] for row in plain_rows(only.stdout)[1]] == [shop_job["id"]]
    as_json = json.loads(bulkhook(two.service, "jobs", "--instance", "crm", "--json").stdout)
    assert [job["id"] for job in as_json["jobs"]] == [crm_job["id"]]
    none = bulkhook(two.service, "jobs", "--instance", "erp")
    assert (none.returncode, none.stdout) == (0, "no jobs\n")
    bad = bulkhook(two.service, "jobs", "--instance", "Not A Name")
    assert bad.returncode == 1 and "bad_instance" in bad.stderr


def test_instances_lists_each_instance_with_its_jobs_and_never_a_secret(
    two: TwoInstances, contacts_csv: Path
) -> None:
    submitted(two.service, contacts_csv, instance="shop", object="contacts")
    result = bulkhook(two.service, "instances")
    assert result.returncode == 0, result.stderr
    header, rows = plain_rows(result.stdout)
    assert header == ["instance", "default", "hub", "base", "URL", "keys", "jobs"]
    assert rows == [
        ["crm", "yes", "marketing", two.crm.api_url, "1", "0"],
        ["shop", "no", "crm", two.shop.api_url, "1", "1"],
    ]
    as_json = json.loads(bulkhook(two.service, "instances", "--json").stdout)
    assert as_json == two.service.http.get("/instances").json()
    [_, shop] = as_json["instances"]
    assert shop["jobs"] == {"total": 1, "by_state": {"COMPLETED": 1}}


def test_instances_of_a_single_instance_service_is_its_embedded_default(
    start_service: StartService,
) -> None:
    service = start_service(None)
    result = bulkhook(service, "instances")
    assert result.returncode == 0, result.stderr
    assert plain_rows(result.stdout)[1] == [["default", "yes", "marketing", "embedded", "1", "0"]]


# The dashboard --------------------------------------------------------------------


def rows_of(page: str) -> dict[str, str]:
    """Each job row's id and the instance it shows."""
    return dict(re.findall(r'<tr id="job-([^"]+)".*?<td class="instance">([^<]*)</td>', page, re.S))


def test_the_dashboard_shows_each_jobs_instance_and_filters_by_it(
    two: TwoInstances, contacts_csv: Path
) -> None:
    shop_job = submitted(two.service, contacts_csv, instance="shop", object="contacts")
    crm_job = submitted(two.service, contacts_csv)
    page = two.service.http.get("/")
    assert page.status_code == 200
    assert rows_of(page.text) == {shop_job["id"]: "shop", crm_job["id"]: "crm"}
    assert "<th>Instance</th>" in page.text
    choices = re.search(r'<select name="instance">(.*?)</select>', page.text, re.S)
    assert choices is not None
    assert re.findall(r'<option value="([^"]*)"', choices.group(1)) == ["", "crm", "shop"]
    only = two.service.http.get("/", params={"instance": "shop"})
    assert rows_of(only.text) == {shop_job["id"]: "shop"}
    assert '<option value="shop" selected>' in only.text
    assert 'data-instance="shop"' in only.text  # live updates keep to the filter
    gone = two.service.http.get("/", params={"instance": "erp"})
    assert gone.status_code == 200 and rows_of(gone.text) == {}
    assert "No job matches." in gone.text
    assert '<option value="erp" selected>' in gone.text
    bad = two.service.http.get("/", params={"instance": "<script>"})
    assert bad.status_code == 200 and rows_of(bad.text) == {}
    assert "Choose an instance by its name." in bad.text and "<script>" not in bad.text
    detail = two.service.http.get(f"/ui/jobs/{shop_job['id']}")
    assert '<dt>Instance</dt><dd class="instance">shop</dd>' in detail.text
    for text in (page.text, detail.text):
        for secret in CONFIGURED_SECRETS:
            assert secret not in text


def test_the_failed_records_of_a_jobs_instance_are_shown_on_its_page(
    two: TwoInstances, tmp_path: Path
) -> None:
    failing = write_csv(tmp_path / "failing.csv", [["Name", "Email"], ["A", ""], ["B", "b@x.io"]])
    job = submitted(two.service, failing, instance="shop", object="contacts")
    assert job["records_failed_count"] == 1
    # Without the service's copy (as for a job that ended before copies were kept) the
    # page reads them from the upstream: shop's, where the job ran.
    eventually(lambda: job_now(two.service, job["id"])["failed_records"]["status"] == "copied")
    two.service.query(f"DELETE FROM failed_records WHERE job_id = '{job['id']}'")
    two.service.query(f"DELETE FROM failed_copies WHERE job_id = '{job['id']}'")
    fragment = two.service.http.get(f"/ui/jobs/{job['id']}/failed")
    assert fragment.status_code == 200, fragment.text
    assert '<p class="records-summary">1 failed record.' in fragment.text
    table = two.service.http.get(f"/ui/jobs/{job['id']}/failed.csv")
    assert table.status_code == 200, table.text
    assert len(table.text.splitlines()) == 2  # the header and shop's one failed record


def test_a_single_instance_dashboard_shows_the_default_instance_and_no_instance_filter(
    start_sandbox: StartSandbox, start_service: StartService, contacts_csv: Path
) -> None:
    service = start_service(start_sandbox())
    job = submitted(service, contacts_csv)
    page = service.http.get("/").text
    assert rows_of(page) == {job["id"]: "default"}
    assert 'name="instance"' not in page
    assert rows_of(service.http.get("/", params={"instance": "default"}).text) == {
        job["id"]: "default"
    }


# The API description --------------------------------------------------------------


def test_the_instance_answers_match_the_description(two: TwoInstances, contacts_csv: Path) -> None:
    job = submitted(two.service, contacts_csv, instance="shop", object="contacts")
    conforms("Job", job)
    http = two.service.http
    conforms("Instances", http.get("/instances").json())
    conforms("JobList", http.get("/jobs", params={"instance": "shop"}).json())
    objects = http.get("/objects", params={"instance": "shop"})
    assert objects.status_code == 200, objects.text
    conforms("Objects", objects.json())
    for answer, code in (
        (http.get("/jobs", params={"instance": "Not A Name"}), "bad_instance"),
        (http.post("/jobs", json={"object": "contact", "instance": "erp"}), "unknown_instance"),
    ):
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == code
        conforms("Error", answer.json())


def test_the_description_names_the_instance_everywhere_a_job_has_one() -> None:
    spec = openapi_spec()
    assert "instance" in spec["components"]["schemas"]["Job"]["properties"]
    assert "instance" in spec["components"]["schemas"]["JobSummary"]["required"]
    bodies = spec["paths"]["/jobs"]["post"]["requestBody"]["content"]
    for body in bodies.values():
        assert "instance" in body["schema"]["properties"]
    for path in ("/jobs", "/objects"):
        names = [param["name"] for param in spec["paths"][path]["get"]["parameters"]]
        assert "instance" in names, path
    listing = spec["paths"]["/instances"]["get"]
    assert listing["security"] == [{"bearer": []}]
    instance = spec["components"]["schemas"]["Instance"]["properties"]
    assert not {"signature_key", "element_token", "user_secret", "org_secret"} & set(instance)
