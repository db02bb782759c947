"""Settings: parsing, the .env file, validation messages, secrecy and the bind check."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import ConfigError, Settings, redact
from service.upstream.client import Credentials

FULL_ENV = {
    "OC_BASE_URL": "https://api.openconnectors.example.com/elements/api-v2",
    "OC_USER_SECRET": "user-secret-1",
    "OC_ORG_SECRET": "org-secret-2",
    "OC_ELEMENT_TOKEN": "element-token-3",
    "OC_HUB": "crm",
    "OC_SIGNATURE_KEYS": "key-new,key-old",
    "BULKHOOK_PUBLIC_URL": "https://bulkhook.example.com/",
    "BULKHOOK_DATABASE_URL": "postgresql://bulk@db.example.com/bulkhook",
    "BULKHOOK_API_TOKENS": "token-a,token-b",
    "BULKHOOK_ALLOW_OPEN_API": "yes",
    "BULKHOOK_CALLBACK_GRACE": "30",
    "BULKHOOK_POLL_INTERVAL": "2.5",
    "BULKHOOK_POLL_MAX_INTERVAL": "120",
    "BULKHOOK_POLL_RATE": "0.5",
    "BULKHOOK_JOB_TIMEOUT": "3600",
    "BULKHOOK_MAX_CALLBACK_BYTES": "4096",
    "BULKHOOK_MAX_UPLOAD_BYTES": "1000000",
    "BULKHOOK_SPOOL_DIR": "/var/tmp/bulkhook-spool",
    "BULKHOOK_RESULTS_DIR": "/srv/bulkhook/results",
    "BULKHOOK_MAX_FAILED_RECORDS": "2500",
    "BULKHOOK_LOG_FORMAT": "TEXT",
    "BULKHOOK_LOG_LEVEL": "Debug",
}


def load(env: dict[str, str], tmp_path: Path) -> Settings:
    return Settings.from_env(env, env_file=tmp_path / "missing.env")


def test_defaults_with_empty_environment(tmp_path: Path) -> None:
    settings = load({}, tmp_path)
    assert settings == Settings()
    assert settings.oc_base_url is None
    assert settings.embedded
    assert settings.oc_hub == "marketing"
    assert settings.signature_keys == ()
    assert settings.api_tokens == ()
    assert settings.public_url is None
    assert settings.database_url == "sqlite:///./bulkhook.db"
    assert settings.allow_open_api is False
    assert settings.callback_grace == 60.0
    assert settings.poll_interval == 15.0
    assert settings.poll_max_interval == 300.0
    assert settings.poll_rate == 10.0
    assert settings.job_timeout == 259200.0
    assert settings.max_callback_bytes == 1024 * 1024
    assert settings.max_upload_bytes == 2 * 1024**3
    assert settings.max_failed_records == 10_000
    assert settings.log_format == "auto"
    assert settings.log_level == "info"
    assert settings.credentials().header() is None


def test_every_variable_is_parsed(tmp_path: Path) -> None:
    settings = load(FULL_ENV, tmp_path)
    assert settings.oc_base_url == "https://api.openconnectors.example.com/elements/api-v2"
    assert not settings.embedded
    assert settings.oc_user_secret == "user-secret-1"
    assert settings.oc_org_secret == "org-secret-2"
    assert settings.oc_element_token == "element-token-3"
    assert settings.oc_hub == "crm"
    assert settings.signature_keys == ("key-new", "key-old")
    assert settings.public_url == "https://bulkhook.example.com"
    assert settings.database_url == "postgresql://bulk@db.example.com/bulkhook"
    assert settings.api_tokens == ("token-a", "token-b")
    assert settings.allow_open_api is True
    assert settings.callback_grace == 30.0
    assert settings.poll_interval == 2.5
    assert settings.poll_max_interval == 120.0
    assert settings.poll_rate == 0.5
    assert settings.job_timeout == 3600.0
    assert settings.max_failed_records == 2500
    assert settings.max_callback_bytes == 4096
    assert settings.max_upload_bytes == 1_000_000
    assert settings.spool_dir == "/var/tmp/bulkhook-spool"
    assert settings.results_dir == "/srv/bulkhook/results"
    assert settings.log_format == "text"
    assert settings.log_level == "debug"
    assert isinstance(settings.callback_grace, float)
    assert isinstance(settings.max_upload_bytes, int)


def test_env_file_fills_in_and_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / "bulkhook.env"
    env_file.write_text(
        "# comment\n"
        "OC_HUB=documents\n"
        "BULKHOOK_POLL_INTERVAL=5\n"
        "BULKHOOK_API_TOKENS=from-file\n"
        'OC_USER_SECRET="pa${HOME}$word"\n'
        "BULKHOOK_JOB_TIMEOUT=7200\n",
        encoding="utf-8",
    )
    env = {"OC_HUB": "crm", "BULKHOOK_JOB_TIMEOUT": ""}  # empty counts as unset
    settings = Settings.from_env(env, env_file=env_file)
    assert settings.oc_hub == "crm"
    assert settings.poll_interval == 5.0
    assert settings.api_tokens == ("from-file",)
    assert settings.oc_user_secret == "pa${HOME}$word"  # read literally, no ${VAR} expansion
    assert settings.job_timeout == 7200.0


def test_default_env_file_is_read_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("OC_HUB=erp\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert Settings.from_env({}).oc_hub == "erp"
    assert Settings.from_env({}, env_file=None).oc_hub == "marketing"


def test_from_env_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OC_HUB", "payments")
    assert Settings.from_env(env_file=tmp_path / "missing.env").oc_hub == "payments"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a", ("a",)),
        (" a , b ", ("a", "b")),
        ("a,,b,", ("a", "b")),
        (" , ,current, ,previous,", ("current", "previous")),
        (",", ()),
    ],
)
def test_comma_separated_lists_drop_blanks(
    raw: str, expected: tuple[str, ...], tmp_path: Path
) -> None:
    settings = load({"OC_SIGNATURE_KEYS": raw, "BULKHOOK_API_TOKENS": raw}, tmp_path)
    assert settings.signature_keys == expected
    assert settings.api_tokens == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("true", True), ("YES", True), ("0", False), ("False", False), ("no", False)],
)
def test_boolean_spellings(raw: str, expected: bool, tmp_path: Path) -> None:
    assert load({"BULKHOOK_ALLOW_OPEN_API": raw}, tmp_path).allow_open_api is expected


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("OC_BASE_URL", "ftp://api.example.com"),
        ("OC_BASE_URL", "api.example.com/v2"),
        ("OC_BASE_URL", "https://"),
        ("OC_BASE_URL", "http://[::1"),
        ("OC_BASE_URL", "http://host:99999"),
        ("BULKHOOK_PUBLIC_URL", "localhost:8000"),
        ("BULKHOOK_PUBLIC_URL", "https://bulkhook.example.com/?x=1"),
        ("OC_HUB", "crm/contacts"),
        ("BULKHOOK_DATABASE_URL", "mysql://db/bulkhook"),
        ("BULKHOOK_DATABASE_URL", "sqlite://relative.db"),
        ("BULKHOOK_DATABASE_URL", "sqlite:///"),
        ("BULKHOOK_DATABASE_URL", "sqlite:///:memory:"),
        ("BULKHOOK_CALLBACK_GRACE", "abc"),
        ("BULKHOOK_CALLBACK_GRACE", "0"),
        ("BULKHOOK_POLL_INTERVAL", "-5"),
        ("BULKHOOK_POLL_MAX_INTERVAL", "inf"),
        ("BULKHOOK_JOB_TIMEOUT", "nan"),
        ("BULKHOOK_JOB_TIMEOUT", "72h"),
        ("BULKHOOK_POLL_RATE", "0"),
        ("BULKHOOK_POLL_RATE", "fast"),
        ("BULKHOOK_MAX_CALLBACK_BYTES", "1.5"),
        ("BULKHOOK_MAX_CALLBACK_BYTES", "0"),
        ("BULKHOOK_MAX_CALLBACK_BYTES", "-1"),
        ("BULKHOOK_MAX_UPLOAD_BYTES", "2GB"),
        ("BULKHOOK_MAX_UPLOAD_BYTES", "1e9"),
        ("BULKHOOK_MAX_FAILED_RECORDS", "0"),
        ("BULKHOOK_MAX_FAILED_RECORDS", "-5"),
        ("BULKHOOK_MAX_FAILED_RECORDS", "1000001"),
        ("BULKHOOK_MAX_FAILED_RECORDS", "10k"),
        ("BULKHOOK_ALLOW_OPEN_API", "maybe"),
        ("BULKHOOK_LOG_FORMAT", "xml"),
        ("BULKHOOK_LOG_LEVEL", "verbose"),
        ("BULKHOOK_LOG_LEVEL", "10"),
    ],
)
def test_bad_value_names_the_variable(var: str, raw: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load({var: raw}, tmp_path)
    message = str(caught.value)
    assert message.startswith(var)
    assert "\n" not in message


def test_bad_non_secret_value_is_echoed_and_truncated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"BULKHOOK_POLL_INTERVAL .*'abc'"):
        load({"BULKHOOK_POLL_INTERVAL": "abc"}, tmp_path)
    with pytest.raises(ConfigError) as caught:
        load({"OC_HUB": "a/" + "x" * 500}, tmp_path)
    assert len(str(caught.value)) < 150


def test_in_memory_sqlite_is_refused_because_state_must_survive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="restart"):
        load({"BULKHOOK_DATABASE_URL": "sqlite:///:memory:"}, tmp_path)


def test_poll_interval_above_maximum_names_both(tmp_path: Path) -> None:
    env = {"BULKHOOK_POLL_INTERVAL": "600", "BULKHOOK_POLL_MAX_INTERVAL": "300"}
    with pytest.raises(ConfigError) as caught:
        load(env, tmp_path)
    assert "BULKHOOK_POLL_INTERVAL" in str(caught.value)
    assert "BULKHOOK_POLL_MAX_INTERVAL" in str(caught.value)
    assert load({"BULKHOOK_POLL_INTERVAL": "300"}, tmp_path).poll_interval == 300.0


@pytest.mark.parametrize(
    ("changes", "var"),
    [
        ({"poll_interval": -1.0}, "BULKHOOK_POLL_INTERVAL"),
        ({"poll_rate": 0}, "BULKHOOK_POLL_RATE"),
        ({"callback_grace": True}, "BULKHOOK_CALLBACK_GRACE"),
        ({"max_upload_bytes": 1.5}, "BULKHOOK_MAX_UPLOAD_BYTES"),
        ({"max_callback_bytes": True}, "BULKHOOK_MAX_CALLBACK_BYTES"),
        ({"max_failed_records": 2.5}, "BULKHOOK_MAX_FAILED_RECORDS"),
        ({"allow_open_api": "yes"}, "BULKHOOK_ALLOW_OPEN_API"),
        ({"oc_hub": ""}, "OC_HUB"),
        ({"oc_hub": ".."}, "OC_HUB"),
        ({"spool_dir": "/tmp/a\x00b"}, "BULKHOOK_SPOOL_DIR"),
        ({"results_dir": "/tmp/a\x00b"}, "BULKHOOK_RESULTS_DIR"),
        ({"results_dir": ""}, "BULKHOOK_RESULTS_DIR"),
        ({"results_dir": None}, "BULKHOOK_RESULTS_DIR"),
        ({"oc_hub": "a/b"}, "OC_HUB"),
        ({"oc_hub": "mar\x00keting"}, "OC_HUB"),
        ({"oc_base_url": "https://api.example.com"}, "OC_USER_SECRET"),
        ({"public_url": "bulkhook.example.com"}, "BULKHOOK_PUBLIC_URL"),
        ({"api_tokens": "one-token"}, "BULKHOOK_API_TOKENS"),
        ({"signature_keys": ("",)}, "OC_SIGNATURE_KEYS"),
        ({"database_url": "sqlite:///:memory:"}, "BULKHOOK_DATABASE_URL"),
    ],
)
def test_direct_construction_and_replace_are_validated(
    changes: dict[str, object], var: str
) -> None:
    with pytest.raises(ConfigError, match=var):
        Settings(**changes)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=var):
        Settings().replace(**changes)


def test_replace_keeps_other_values_and_normalises() -> None:
    base = Settings(oc_hub="crm", api_tokens=("t",))
    changed = base.replace(public_url="http://127.0.0.1:8000/", poll_rate=2)
    assert changed.oc_hub == "crm"
    assert changed.api_tokens == ("t",)
    assert changed.public_url == "http://127.0.0.1:8000"
    assert changed.poll_rate == 2.0
    assert base.public_url is None


SECRET = "s3cr3t-Value-9f8e7d"


@pytest.mark.parametrize(
    "var",
    [
        "OC_USER_SECRET",
        "OC_ORG_SECRET",
        "OC_ELEMENT_TOKEN",
        "OC_SIGNATURE_KEYS",
        "BULKHOOK_API_TOKENS",
    ],
)
def test_secrets_never_in_repr(var: str, tmp_path: Path) -> None:
    settings = load({var: SECRET}, tmp_path)
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("OC_USER_SECRET", f"{SECRET} trailing-part"),
        ("OC_ORG_SECRET", f"{SECRET}\x00"),
        ("OC_ELEMENT_TOKEN", f"{SECRET},{SECRET}"),
        ("OC_SIGNATURE_KEYS", f"good-key,{SECRET} x"),
        ("BULKHOOK_API_TOKENS", f"{SECRET}\tx,other"),
    ],
)
def test_bad_secret_is_reported_without_echoing_it(var: str, raw: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load({var: raw}, tmp_path)
    message = str(caught.value)
    assert message.startswith(var)
    assert SECRET not in message
    assert "good-key" not in message


def test_database_password_is_hidden(tmp_path: Path) -> None:
    settings = load({"BULKHOOK_DATABASE_URL": f"postgresql://bulk:{SECRET}@db/bulkhook"}, tmp_path)
    assert SECRET not in repr(settings)
    assert "db/bulkhook" in repr(settings)
    with pytest.raises(ConfigError) as caught:
        load({"BULKHOOK_DATABASE_URL": f"mysql://bulk:{SECRET}@db/bulkhook"}, tmp_path)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LocalHost"]
)
def test_loopback_bind_needs_no_tokens(host: str) -> None:
    Settings().check_bind(host)


@pytest.mark.parametrize(
    "host",
    ["0.0.0.0", "10.1.2.3", "::", "192.168.1.5", "example.com", ""],  # noqa: S104
)
def test_open_bind_without_tokens_is_refused(host: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings().check_bind(host)
    message = str(caught.value)
    assert "BULKHOOK_API_TOKENS" in message
    assert "BULKHOOK_ALLOW_OPEN_API=1" in message
    assert "\n" not in message


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])  # noqa: S104
def test_open_bind_with_tokens_or_explicit_consent_is_allowed(host: str) -> None:
    Settings(api_tokens=("t",)).check_bind(host)
    Settings(allow_open_api=True).check_bind(host)


def test_sqlite_path() -> None:
    assert Settings().sqlite_path == "./bulkhook.db"
    assert Settings(database_url="sqlite:////var/lib/bulkhook/jobs.db").sqlite_path == (
        "/var/lib/bulkhook/jobs.db"
    )
    assert Settings(database_url="sqlite:///data/jobs.db").sqlite_path == "data/jobs.db"
    assert Settings(database_url="postgresql://db/bulkhook").sqlite_path is None
    assert Settings(database_url="postgres://db/bulkhook").sqlite_path is None


def test_credentials(tmp_path: Path) -> None:
    settings = load(FULL_ENV, tmp_path)
    credentials = settings.credentials()
    assert credentials == Credentials("user-secret-1", "org-secret-2", "element-token-3")
    assert credentials.header() == (
        "User user-secret-1, Organization org-secret-2, Element element-token-3"
    )
    assert Settings(oc_user_secret="u").credentials() == Credentials(user_secret="u")


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://bh:S3cret@db:5432/bulkhook", "postgresql://***@db:5432/bulkhook"),
        ("postgresql://bh:p@ss/w0rd@db/bulkhook", "postgresql://***@db/bulkhook"),
        ('failed: "postgresql://u:S3cret@db/x" refused', 'failed: "postgresql://***@db/x" refused'),
        ("https://user:S3cret@api.example.com/v2", "https://***@api.example.com/v2"),
        ("sqlite:///./bulkhook.db", "sqlite:///./bulkhook.db"),
        ("https://api.example.com/v2", "https://api.example.com/v2"),
    ],
)
def test_redact_hides_every_url_password(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_a_placeholder_from_the_example_file_is_refused_without_showing_it(
    tmp_path: Path,
) -> None:
    env = {**FULL_ENV, "OC_ORG_SECRET": "org-REPLACE_ME-part"}
    with pytest.raises(ConfigError) as raised:
        load(env, tmp_path)
    assert "OC_ORG_SECRET" in str(raised.value)
    assert "org-" not in str(raised.value)


@pytest.mark.parametrize("missing", ["OC_USER_SECRET", "OC_ORG_SECRET", "OC_ELEMENT_TOKEN"])
def test_an_upstream_url_needs_every_credential(tmp_path: Path, missing: str) -> None:
    env = {k: v for k, v in FULL_ENV.items() if k != missing}
    with pytest.raises(ConfigError, match=missing):
        load(env, tmp_path)
    assert load({k: v for k, v in env.items() if k != "OC_BASE_URL"}, tmp_path).embedded
