"""`bulkhook verify` and `bulkhook sign`, run as real processes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import run_bulkhook

ROOT = Path(__file__).resolve().parent.parent
KEY = "cli-test-key"
BODY = b'{"id":"77","status":"COMPLETED"}\n'


def bulkhook(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """Bytes in and out: signatures are over exact bytes."""
    return run_bulkhook(*args, stdin=stdin, text=False, timeout=30, **(env or {}))


def reference(key: str, body: bytes, algo: str = "sha256") -> str:
    digest = hmac.new(key.encode(), body, getattr(hashlib, algo)).digest()
    return f"{algo}={base64.b64encode(digest).decode()}"


@pytest.fixture
def body_file(tmp_path: Path) -> Path:
    path = tmp_path / "body.json"
    path.write_bytes(BODY)
    return path


def test_verify_a_file_prints_valid_and_exits_0(body_file: Path) -> None:
    result = bulkhook("verify", "--key", KEY, "--signature", reference(KEY, BODY), str(body_file))
    assert result.returncode == 0
    assert result.stdout == b"valid\n"


def test_verify_reads_stdin_with_dash_or_no_file() -> None:
    header = reference(KEY, BODY)
    for extra in (["-"], []):
        result = bulkhook("verify", "--key", KEY, "--signature", header, *extra, stdin=BODY)
        assert (result.returncode, result.stdout) == (0, b"valid\n")


def test_verify_does_not_strip_the_trailing_newline() -> None:
    header = reference(KEY, BODY.rstrip(b"\n"))
    result = bulkhook("verify", "--key", KEY, "--signature", header, stdin=BODY)
    assert result.returncode == 1
    assert result.stdout.startswith(b"invalid: ")
    assert b"does not match" in result.stdout


def test_verify_hints_at_a_newline_the_sender_never_signed() -> None:
    # The sender signed the body; `echo` gave it a newline on the way to the command.
    header = reference(KEY, BODY.rstrip(b"\n"))
    result = bulkhook("verify", "--key", KEY, "--signature", header, stdin=BODY)
    assert result.returncode == 1
    assert result.stdout.startswith(b"invalid: ")
    assert b"matches the body without its trailing newline" in result.stderr
    assert b"printf" in result.stderr and b"echo" in result.stderr
    assert KEY.encode() not in result.stdout + result.stderr


def test_verify_says_a_trailing_newline_is_signed_too() -> None:
    header = reference("some-other-key", BODY)
    result = bulkhook("verify", "--key", KEY, "--signature", header, stdin=BODY)
    assert result.returncode == 1
    assert b"ends with a newline, which is signed" in result.stderr
    assert KEY.encode() not in result.stdout + result.stderr


def test_no_newline_hint_for_a_body_without_one() -> None:
    unterminated = BODY.rstrip(b"\n")
    header = reference("some-other-key", unterminated)
    result = bulkhook("verify", "--key", KEY, "--signature", header, stdin=unterminated)
    assert (result.returncode, result.stderr) == (1, b"")


@pytest.mark.parametrize("header", ["sha256=YWJj", "md5=abc"])
def test_no_newline_hint_for_a_malformed_header(header: str) -> None:
    result = bulkhook("verify", "--key", KEY, "--signature", header, stdin=BODY)
    assert (result.returncode, result.stderr) == (1, b"")


def test_verify_a_digest_without_its_prefix() -> None:
    bare = reference(KEY, BODY).split("=", 1)[1]
    result = bulkhook("verify", "--key", KEY, "--signature", bare, stdin=BODY)
    assert result.returncode == 1
    assert result.stdout.startswith(b"invalid: ")
    assert b"missing the sha256= or sha1= prefix" in result.stdout
    assert b"unknown algorithm" not in result.stdout


def test_verify_the_wrong_key_is_invalid(body_file: Path) -> None:
    header = reference("some-other-key", BODY)
    result = bulkhook("verify", "--key", KEY, "--signature", header, str(body_file))
    assert result.returncode == 1
    assert result.stdout.startswith(b"invalid")


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("md5=abc", b"unknown algorithm"),
        ("sha256=!!!", b"not valid base64"),
        ("sha256=YWJj", b"must be 32 bytes"),
        ("nonsense", b"expected"),
        ("", b"empty"),
    ],
)
def test_verify_explains_why_a_header_is_invalid(
    body_file: Path, header: str, reason: bytes
) -> None:
    result = bulkhook("verify", "--key", KEY, "--signature", header, str(body_file))
    assert result.returncode == 1
    assert result.stdout.startswith(b"invalid: ")
    assert reason in result.stdout


def test_verify_accepts_several_keys(body_file: Path) -> None:
    header = reference("old-key", BODY)
    result = bulkhook(
        "verify", "--key", "new-key", "--key", "old-key", "--signature", header, str(body_file)
    )
    assert (result.returncode, result.stdout) == (0, b"valid\n")


def test_verify_falls_back_to_oc_signature_keys(body_file: Path) -> None:
    header = reference("old-key", BODY)
    result = bulkhook(
        "verify",
        "--signature",
        header,
        str(body_file),
        env={"OC_SIGNATURE_KEYS": "new-key, old-key"},
    )
    assert (result.returncode, result.stdout) == (0, b"valid\n")


def test_verify_without_any_key_is_a_usage_error(body_file: Path) -> None:
    result = bulkhook("verify", "--signature", reference(KEY, BODY), str(body_file))
    assert result.returncode == 2
    assert b"no signature key" in result.stderr
    assert result.stdout == b""


def test_verify_an_unreadable_file_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    result = bulkhook("verify", "--key", KEY, "--signature", "sha256=x", str(missing))
    assert result.returncode == 2
    assert b"cannot read" in result.stderr
    assert b"Traceback" not in result.stderr


def test_verify_without_signature_is_a_usage_error(body_file: Path) -> None:
    result = bulkhook("verify", "--key", KEY, str(body_file))
    assert result.returncode == 2
    assert b"--signature" in result.stderr


@pytest.mark.parametrize("algo", ["sha256", "sha1"])
def test_sign_prints_the_header_value(body_file: Path, algo: str) -> None:
    result = bulkhook("sign", "--key", KEY, "--algo", algo, str(body_file))
    assert result.returncode == 0
    assert result.stdout.decode().strip() == reference(KEY, BODY, algo)


def test_sign_reads_raw_stdin() -> None:
    result = bulkhook("sign", "--key", KEY, "-", stdin=BODY)
    assert result.stdout.decode().strip() == reference(KEY, BODY)
    assert result.stdout.decode().strip() != reference(KEY, BODY.rstrip(b"\n"))


def test_sign_then_verify_round_trip(body_file: Path) -> None:
    header = bulkhook("sign", "--key", KEY, str(body_file)).stdout.decode().strip()
    result = bulkhook("verify", "--key", KEY, "--signature", header, str(body_file))
    assert result.stdout == b"valid\n"


def test_sign_rejects_unknown_algorithms(body_file: Path) -> None:
    result = bulkhook("sign", "--key", KEY, "--algo", "md5", str(body_file))
    assert result.returncode == 2


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("bulkhook")
    assert script.exists()
    result = subprocess.run(
        [str(script), "sign", "--key", KEY, "-"],
        input=BODY,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.stdout.decode().strip() == reference(KEY, BODY)


def test_version_prints_the_one_version_the_package_has() -> None:
    import importlib.metadata
    import tomllib

    import service

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "service.__version__"}

    result = bulkhook("--version")
    assert result.returncode == 0
    assert result.stdout == f"bulkhook {service.__version__}\n".encode()
    # The installed metadata reads the same attribute: there is no second version string.
    assert importlib.metadata.version("bulkhook") == service.__version__
    script = Path(sys.executable).with_name("bulkhook")
    installed = subprocess.run(
        [str(script), "--version"], capture_output=True, timeout=30, check=False
    )
    assert installed.stdout == result.stdout


NOT_UTF8 = "\udcff"  # what a byte that is not UTF-8 (0xff) becomes in argv and the environment


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["verify", "--key", f"k{NOT_UTF8}y", "--signature", "sha256=x"], {}),
        (["verify", "--signature", "sha256=x"], {"OC_SIGNATURE_KEYS": f"k{NOT_UTF8}y"}),
        (["sign", "--key", f"k{NOT_UTF8}y"], {}),
        (["sign"], {"OC_SIGNATURE_KEYS": f"k{NOT_UTF8}y"}),
    ],
)
def test_a_key_that_is_not_utf8_is_a_usage_error_and_never_printed(
    body_file: Path, args: list[str], env: dict[str, str]
) -> None:
    result = bulkhook(*args, str(body_file), env=env)
    assert (result.returncode, result.stdout) == (2, b"")
    assert b"is not valid UTF-8 text" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert b"k\xffy" not in result.stderr and b"k\\udcffy" not in result.stderr


@pytest.mark.parametrize("empty", ["", " "])
def test_an_empty_key_to_verify_is_a_usage_error_even_with_oc_signature_keys(
    body_file: Path, empty: str
) -> None:
    header = reference(empty, BODY)  # what an empty key would "verify"
    for env in ({}, {"OC_SIGNATURE_KEYS": KEY}):
        result = bulkhook("verify", "--key", empty, "--signature", header, str(body_file), env=env)
        assert (result.returncode, result.stdout) == (2, b"")
        assert result.stderr == b"bulkhook verify: error: --key is empty\n"


@pytest.mark.parametrize("empty", ["", " "])
def test_an_empty_key_to_sign_is_a_usage_error_even_with_oc_signature_keys(
    body_file: Path, empty: str
) -> None:
    for env in ({}, {"OC_SIGNATURE_KEYS": KEY}):
        result = bulkhook("sign", "--key", empty, str(body_file), env=env)
        assert (result.returncode, result.stdout) == (2, b"")
        assert result.stderr == b"bulkhook sign: error: --key is empty\n"
