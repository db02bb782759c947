"""The dashboard in a real headless Chromium (Debian's chromium and chromium-driver).

Each test saves screenshots to test-artifacts/. Without Chromium these tests skip,
saying why, except in CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.callbacks.signatures import sign

from .helpers import RunningSandbox, RunningService, start_two_instances, write_csv

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TOKEN = "browser-test-token"
OPTIONS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the browser tests need Chromium in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    path = tmp_path / "downloads"
    path.mkdir()
    return path


@pytest.fixture
def browser(downloads: Path) -> Iterator[Any]:
    """A fresh headless Chromium with its own profile; quit before the servers stop."""
    for binary in (CHROMIUM, CHROMEDRIVER):
        if not os.access(binary, os.X_OK):
            _unavailable(f"{binary} is missing (apt-get install chromium chromium-driver)")
    os.environ.setdefault("SE_AVOID_STATS", "true")
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:  # pragma: no cover - selenium is in the test extra
        _unavailable(f"selenium is not installed: {exc}")
        raise
    profile = tempfile.mkdtemp(prefix="bulkhook-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for option in OPTIONS:
        options.add_argument(option)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except WebDriverException as exc:
        shutil.rmtree(profile, ignore_errors=True)
        _unavailable(f"Chromium did not start: {exc.msg}")
        raise
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_until(condition: Callable[[], Any], what: str, within: float = 20.0) -> Any:
    deadline = time.monotonic() + within
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the element is not there yet, or was just replaced
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last error: {last!r})")


def text_of(driver: Any, selector: str) -> str:
    """The element's text, found again if a live update replaced it as it was read."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(50):
        try:
            return str(driver.find_element(By.CSS_SELECTOR, selector).text)
        except StaleElementReferenceException:
            time.sleep(0.1)
    raise AssertionError(f"{selector} was replaced again and again for 5 seconds")


def click(driver: Any, selector: str) -> None:
    """Click the element, found again if a live update replaced it before the click."""
    from selenium.webdriver.common.by import By

    wait_until(lambda: driver.find_element(By.CSS_SELECTOR, selector).click() or True, selector)


def screenshot(driver: Any, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def no_console_errors(driver: Any) -> None:
    """No script error and no failed load, except the login form's deliberate 401s."""
    errors = [
        entry
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and "401 (Unauthorized)" not in entry["message"]
    ]
    assert not errors, errors


@pytest.fixture
def bad_csv(tmp_path: Path) -> Path:
    return write_csv(
        tmp_path / "contacts-bad.csv",
        [
            ["FirstName", "LastName", "Email"],
            ["Ada", "Lovelace", "ada@example.com"],
            ["Bad", "Address", "not-an-email"],
            ["Grace", "Hopper", "grace@example.com"],
        ],
    )


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_a_job_completes_live_and_its_page_shows_the_callback_and_failed_records(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    browser: Any,
    bad_csv: Path,
    downloads: Path,
) -> None:

    service = start_service(start_sandbox(job_seconds=3.0))
    browser.get(service.url + "/")
    wait_until(lambda: text_of(browser, "#live") == "live", "the live indicator")
    browser.execute_script("window.notReloaded = true")

    job = service.submit(bad_csv).json()
    row = f"#job-{job['id']}"
    wait_until(lambda: text_of(browser, f"{row} .badge") in {"CREATED", "RUNNING"}, "the new row")
    screenshot(browser, "dashboard-running")
    wait_until(lambda: text_of(browser, f"{row} .badge") == "COMPLETED", "COMPLETED", 20)
    assert browser.execute_script("return window.notReloaded") is True  # no reload
    assert text_of(browser, f"{row} td.failed") == "1"
    assert text_of(browser, f"{row} .source") == "callback"
    wait_until(lambda: "accepted" in text_of(browser, "#callbacks tbody"), "the callbacks panel")
    screenshot(browser, "dashboard-completed")

    # A forged callback shows up in the callbacks panel, live, refused and bodiless.
    body = json.dumps({"status": "ERROR", "note": "forged"}).encode()
    refused = httpx.post(
        f"{service.url}/callbacks/jobs/{job['id']}",
        content=body,
        headers={"Elements-Webhook-Signature": sign("wrong-key", body)},
    )
    assert refused.status_code == 401
    wait_until(lambda: "bad signature" in text_of(browser, "#callbacks tbody"), "the refusal")
    assert "forged" not in text_of(browser, "#callbacks")
    screenshot(browser, "dashboard-callbacks")

    click(browser, f"{row} a")
    wait_until(lambda: job["id"] in browser.current_url, "the job page")
    timeline = wait_until(lambda: text_of(browser, "table.timeline"), "the timeline")
    assert "callback" in timeline and "verified" in timeline
    assert "refused: bad signature" in timeline
    assert "upstream says COMPLETED" in timeline
    wait_until(lambda: "not-an-email" in text_of(browser, "#failed-body"), "the failed records")
    screenshot(browser, "job-page")

    click(browser, "#csv")
    csv_file = downloads / f"bulkhook-{job['id']}-failed.csv"
    wait_until(csv_file.exists, "the CSV download")
    lines = wait_until(lambda: csv_file.read_text().splitlines(), "the CSV's content")
    assert lines[0] == "lineNumber,errorMessage,FirstName,LastName,Email"
    assert lines[1:] == ["3,Email is not a valid email address,Bad,Address,not-an-email"]
    no_console_errors(browser)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_with_tokens_the_dashboard_refuses_until_you_log_in(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    browser: Any,
    contacts_csv: Path,
) -> None:
    from selenium.webdriver.common.by import By

    service = start_service(start_sandbox(), api_tokens=(TOKEN,))
    job = service.submit(contacts_csv, headers={"Authorization": f"Bearer {TOKEN}"}).json()
    browser.get(f"{service.url}/ui/jobs/{job['id']}")
    wait_until(lambda: browser.find_element(By.NAME, "token"), "the login form")
    assert "Timeline" not in browser.page_source
    assert browser.find_elements(By.ID, "jobs") == []
    screenshot(browser, "login")

    browser.find_element(By.NAME, "token").send_keys("not-the-token")
    click(browser, "form.login button")
    wait_until(lambda: "not valid" in text_of(browser, ".problem"), "the refusal")
    assert "not-the-token" not in browser.page_source

    browser.find_element(By.NAME, "token").send_keys(TOKEN)
    click(browser, "form.login button")
    wait_until(lambda: "Timeline" in browser.page_source, "the job page after logging in")
    assert TOKEN not in browser.page_source
    [cookie] = browser.get_cookies()
    assert cookie["name"] == "bulkhook_token"
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert browser.execute_script("return document.cookie") == ""  # out of scripts' reach
    wait_until(lambda: text_of(browser, "#live") == "live", "the live stream with the cookie")

    browser.get(service.url + "/")
    wait_until(lambda: text_of(browser, f"#job-{job['id']} .badge") == "COMPLETED", "the job")
    screenshot(browser, "dashboard-logged-in")
    click(browser, "form.logout button")
    wait_until(lambda: browser.find_elements(By.NAME, "token"), "the login form again")
    no_console_errors(browser)


def test_the_api_docs_render_offline(
    start_service: Callable[..., RunningService], browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    service = start_service(None)
    browser.get(service.url + "/docs")
    operations = wait_until(
        lambda: browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"),
        "Swagger UI to list the operations",
    )
    paths = {element.text.replace("\u200b", "") for element in operations}
    assert {"/jobs", "/callbacks/jobs/{job_id}", "/objects"} <= paths
    screenshot(browser, "api-docs")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert [e for e in errors if "favicon.ico" not in e["message"]] == []


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_the_failed_records_page_through_without_leaving_the_job_page(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    browser: Any,
    tmp_path: Path,
) -> None:

    rows = [["Name", "Email"]] + [[f"person{i}", ""] for i in range(150)]
    service = start_service(start_sandbox())
    job = service.submit(write_csv(tmp_path / "many.csv", rows)).json()
    service.wait_for(job["id"], {"COMPLETED"})
    browser.get(f"{service.url}/ui/jobs/{job['id']}")
    summary = wait_until(lambda: text_of(browser, ".records-summary"), "the failed records")
    assert "150 failed records: records 1 to 100 shown" in summary
    assert "person0" in text_of(browser, "table.records")
    browser.execute_script("window.notReloaded = true")
    click(browser, "a[rel=next]")
    wait_until(lambda: "records 101 to 150" in text_of(browser, ".records-summary"), "page 2")
    assert "person149" in text_of(browser, "table.records")
    assert "person0" not in text_of(browser, "table.records")
    assert browser.execute_script("return window.notReloaded") is True  # still the job page
    assert "Timeline" in browser.page_source
    screenshot(browser, "failed-records-page-2")
    click(browser, "a[rel=prev]")
    wait_until(lambda: "records 1 to 100" in text_of(browser, ".records-summary"), "page 1")
    no_console_errors(browser)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_a_job_failing_whole_shows_the_upstream_error_on_its_page_as_text(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    browser: Any,
    contacts_csv: Path,
) -> None:
    from selenium.webdriver.common.by import By

    message = "Refused: <b>not bold</b> & 'quoted'"
    upstream = start_sandbox(job_seconds=3.0, fail_whole=1.0, fail_whole_message=message)
    service = start_service(upstream)
    job = service.submit(contacts_csv).json()
    browser.get(f"{service.url}/ui/jobs/{job['id']}")
    browser.execute_script("window.notReloaded = true")
    wait_until(lambda: text_of(browser, "#state") == "ABORTED", "ABORTED", 20)
    shown = wait_until(lambda: text_of(browser, "dd.upstream-error"), "the upstream error")
    assert shown == message
    assert browser.find_elements(By.CSS_SELECTOR, "dd.upstream-error b") == []
    assert text_of(browser, "dt.upstream-error") == "Upstream error"
    assert browser.execute_script("return window.notReloaded") is True
    screenshot(browser, "job-aborted")
    no_console_errors(browser)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_a_download_shows_its_result_live_and_the_button_saves_the_file(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    browser: Any,
    contacts_csv: Path,
    downloads: Path,
) -> None:
    from selenium.webdriver.common.by import By

    service = start_service(start_sandbox(job_seconds=2.0), api_tokens=(TOKEN,))
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    upload = service.submit(contacts_csv, headers=bearer).json()
    deadline = time.monotonic() + 15
    while service.http.get(f"/jobs/{upload['id']}", headers=bearer).json()["state"] != "COMPLETED":
        assert time.monotonic() < deadline, "the upload did not complete"
        time.sleep(0.05)
    job = service.download("contact", headers=bearer).json()

    browser.get(f"{service.url}/ui/jobs/{job['id']}")
    browser.find_element(By.NAME, "token").send_keys(TOKEN)
    click(browser, "form.login button")
    wait_until(lambda: text_of(browser, "dd.direction") == "download", "the job page")
    browser.execute_script("window.notReloaded = true")
    assert text_of(browser, "dd.query") == "select * from contact"
    wait_until(lambda: text_of(browser, "#result-status") == "stored", "the stored result", 30)
    assert browser.execute_script("return window.notReloaded") is True  # arrived live
    assert text_of(browser, "#state") == "COMPLETED"
    assert text_of(browser, "dd.result-records") == "10"
    result = service.http.get(f"/jobs/{job['id']}", headers=bearer).json()["result"]
    assert text_of(browser, "dd.sha256") == result["sha256"]
    screenshot(browser, "download-job-page")

    click(browser, "#download")
    saved = downloads / f"contact-{job['id']}.csv"
    wait_until(saved.exists, "the downloaded file")
    data = wait_until(
        lambda: saved.read_bytes() if saved.stat().st_size == result["bytes"] else None,
        "the whole file",
    )
    assert hashlib.sha256(data).hexdigest() == result["sha256"]
    assert data.decode().splitlines()[0].startswith("C_EmailAddress,")
    no_console_errors(browser)


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_the_jobs_table_filtered_by_instance_adds_only_that_instances_jobs_live(
    start_sandbox: Callable[..., RunningSandbox],
    start_service: Callable[..., RunningService],
    browser: Any,
    contacts_csv: Path,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    two = start_two_instances(start_sandbox, start_service, sandbox={"job_seconds": 1.0})
    browser.get(two.service.url + "/")
    Select(browser.find_element(By.NAME, "instance")).select_by_value("shop")
    click(browser, "form.filters button[type=submit]")
    wait_until(lambda: "instance=shop" in browser.current_url, "the filtered page")
    wait_until(lambda: text_of(browser, "#live") == "live", "the live indicator")

    crm_job = two.service.submit(contacts_csv).json()
    shop_job = two.service.submit(contacts_csv, instance="shop", object="contacts").json()
    row = f"#job-{shop_job['id']}"
    wait_until(lambda: text_of(browser, f"{row} td.instance") == "shop", "shop's new job")
    wait_until(lambda: text_of(browser, f"{row} .badge") == "COMPLETED", "COMPLETED", 20)
    # crm's job changed before shop's and since: the stream sent it, the table kept out.
    assert two.service.wait_for(crm_job["id"], {"COMPLETED"})
    assert browser.find_elements(By.ID, f"job-{crm_job['id']}") == []
    screenshot(browser, "dashboard-instance-filter")
    no_console_errors(browser)
