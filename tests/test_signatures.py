"""Elements-Webhook-Signature: sha256/sha1 HMAC over the raw body, base64, key rotation."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.callbacks.signatures import Keyring, Verdict, sign, verify

KEY = "instance-signature-key"
BODY = b'{"id":"1234","status":"COMPLETED","recordsCount":10,"recordsFailedCount":1}'


def reference(key: str | bytes, body: bytes, algo: str) -> str:
    """The header value computed independently with the standard library."""
    raw_key = key.encode() if isinstance(key, str) else key
    digest = hmac.new(raw_key, body, getattr(hashlib, algo)).digest()
    return f"{algo}={base64.b64encode(digest).decode()}"


@pytest.mark.parametrize("algo", ["sha256", "sha1"])
def test_sign_matches_the_standard_library(algo: str) -> None:
    assert sign(KEY, BODY, algo) == reference(KEY, BODY, algo)


@pytest.mark.parametrize("algo", ["sha256", "sha1"])
def test_a_header_computed_elsewhere_verifies(algo: str) -> None:
    result = verify(reference(KEY, BODY, algo), BODY, [KEY])
    assert result.verdict is Verdict.VALID
    assert result.ok
    assert result.algorithm == algo
    assert result.key_index == 0


def test_fixed_vector() -> None:
    # HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog"), RFC 4231 style.
    body = b"The quick brown fox jumps over the lazy dog"
    expected = "sha256=97yD9DBThCSxMpjmqm+xQ+9NWaFJRhdZl0edvC0aPNg="
    assert sign("key", body) == expected
    assert verify(expected, body, ["key"]).ok


@pytest.mark.parametrize("algo", ["sha256", "sha1"])
def test_a_tampered_byte_fails(algo: str) -> None:
    header = reference(KEY, BODY, algo)
    tampered = BODY.replace(b"10", b"11")
    assert verify(header, tampered, [KEY]).verdict is Verdict.MISMATCH


def test_a_trailing_newline_is_a_different_body() -> None:
    header = sign(KEY, BODY)
    assert verify(header, BODY + b"\n", [KEY]).verdict is Verdict.MISMATCH
    assert verify(sign(KEY, BODY + b"\n"), BODY, [KEY]).verdict is Verdict.MISMATCH


def test_re_serialized_json_does_not_verify() -> None:
    header = sign(KEY, BODY)
    spaced = BODY.replace(b",", b", ")
    assert verify(header, spaced, [KEY]).verdict is Verdict.MISMATCH


def test_the_wrong_key_fails() -> None:
    assert verify(sign("another-key", BODY), BODY, [KEY]).verdict is Verdict.MISMATCH


def test_the_prefix_alone_picks_the_algorithm() -> None:
    sha1_digest = reference(KEY, BODY, "sha1").split("=", 1)[1]
    # A sha1 digest announced as sha256 has the wrong length for sha256.
    assert verify(f"sha256={sha1_digest}", BODY, [KEY]).verdict is Verdict.MALFORMED
    sha256_digest = reference(KEY, BODY, "sha256").split("=", 1)[1]
    assert verify(f"sha1={sha256_digest}", BODY, [KEY]).verdict is Verdict.MALFORMED


@pytest.mark.parametrize(
    "header",
    ["md5=abc", "sha512=" + "A" * 88, "SHA256=" + "A" * 43 + "=", "hmac-sha256=x", "=abc"],
)
def test_unknown_algorithms_are_refused(header: str) -> None:
    assert verify(header, BODY, [KEY]).verdict is Verdict.UNKNOWN_ALGORITHM


@pytest.mark.parametrize("algo", ["sha256", "sha1"])
@pytest.mark.parametrize("padding", [True, False])
def test_a_digest_without_its_prefix_is_called_that(algo: str, padding: bool) -> None:
    digest = reference(KEY, BODY, algo).split("=", 1)[1]
    bare = digest if padding else digest.rstrip("=")
    result = verify(bare, BODY, [KEY])
    assert result.verdict is Verdict.MALFORMED
    assert "missing the sha256= or sha1= prefix" in result.reason
    assert "unknown algorithm" not in result.reason
    assert bare.rstrip("=")[:8] not in result.reason


@pytest.mark.parametrize("header", [None, "", "   ", "\t"])
def test_a_missing_or_empty_header(header: str | None) -> None:
    assert verify(header, BODY, [KEY]).verdict is Verdict.MISSING


@pytest.mark.parametrize(
    "header",
    [
        "sha256",
        "sha256 abc",
        "sha256=",
        "sha256=not base64!",
        "sha256=%%%%",
        "sha256=YWJj",  # valid base64, 3 bytes
        "sha256=" + base64.b64encode(b"x" * 31).decode(),
        "sha256=" + base64.b64encode(b"x" * 33).decode(),
        "sha256=" + base64.b64encode(b"x" * 32).decode().rstrip("="),
        "sha256=" + base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(),
        "sha256=é",
        "sha256=" + base64.b64encode(b"x" * 32).decode() + " junk",
        "sha256=abc,sha256=def",
    ],
)
def test_malformed_headers(header: str) -> None:
    result = verify(header, BODY, [KEY])
    assert result.verdict is Verdict.MALFORMED
    assert not result.ok


def test_whitespace_around_the_value_is_tolerated() -> None:
    assert verify(f"  {sign(KEY, BODY)}\t", BODY, [KEY]).ok


def test_whitespace_inside_the_value_is_not() -> None:
    algo, digest = sign(KEY, BODY).split("=", 1)
    assert verify(f"{algo}= {digest}", BODY, [KEY]).verdict is Verdict.MALFORMED
    assert verify(f"{algo} ={digest}", BODY, [KEY]).verdict is Verdict.UNKNOWN_ALGORITHM


def test_key_rotation_accepts_current_and_previous_keys() -> None:
    keys = ["current-key", "previous-key"]
    assert verify(sign("current-key", BODY), BODY, keys).key_index == 0
    assert verify(sign("previous-key", BODY), BODY, keys).key_index == 1
    assert verify(sign("retired-key", BODY), BODY, keys).verdict is Verdict.MISMATCH


def test_no_configured_key_never_verifies() -> None:
    assert verify(sign(KEY, BODY), BODY, []).verdict is Verdict.NO_KEYS


def test_bytes_and_text_keys_are_the_same_key() -> None:
    assert verify(sign(KEY.encode(), BODY), BODY, [KEY]).ok


def test_sign_refuses_unknown_algorithms() -> None:
    with pytest.raises(ValueError, match="unknown algorithm"):
        sign(KEY, BODY, "md5")


keys = st.one_of(st.text(min_size=1, max_size=64), st.binary(min_size=1, max_size=64))
algorithms = st.sampled_from(["sha256", "sha1"])


@given(key=keys, body=st.binary(max_size=2048), algo=algorithms)
def test_sign_then_verify_always_holds(key: str | bytes, body: bytes, algo: str) -> None:
    assert verify(sign(key, body, algo), body, [key]).ok


@given(body=st.binary(min_size=1, max_size=512), data=st.data(), algo=algorithms)
def test_any_single_byte_change_of_the_body_fails(
    body: bytes, data: st.DataObject, algo: str
) -> None:
    header = sign(KEY, body, algo)
    index = data.draw(st.integers(0, len(body) - 1))
    delta = data.draw(st.integers(1, 255))
    changed = bytearray(body)
    changed[index] = (changed[index] + delta) % 256
    assert verify(header, bytes(changed), [KEY]).verdict is Verdict.MISMATCH


@given(body=st.binary(max_size=512), data=st.data(), algo=algorithms)
def test_any_single_byte_change_of_the_signature_fails(
    body: bytes, data: st.DataObject, algo: str
) -> None:
    prefix, encoded = sign(KEY, body, algo).split("=", 1)
    digest = bytearray(base64.b64decode(encoded))
    index = data.draw(st.integers(0, len(digest) - 1))
    digest[index] ^= data.draw(st.integers(1, 255))
    header = f"{prefix}={base64.b64encode(bytes(digest)).decode()}"
    assert verify(header, body, [KEY]).verdict is Verdict.MISMATCH


@given(header=st.text(max_size=200), body=st.binary(max_size=64))
def test_no_header_string_raises(header: str, body: bytes) -> None:
    result = verify(header, body, [KEY])
    assert isinstance(result.verdict, Verdict)
    assert result.reason


def test_a_keyring_gives_the_same_verdicts_however_often_it_is_used() -> None:
    keyring = Keyring(["current-key", "previous-key"])
    forged = sign("someone-else", BODY)
    for _ in range(3):
        assert keyring.verify(sign("previous-key", BODY), BODY).key_index == 1
        assert keyring.verify(forged, BODY).verdict is Verdict.MISMATCH
        assert keyring.verify(sign("current-key", BODY, "sha1"), BODY).key_index == 0
        assert keyring.verify(sign("current-key", BODY), BODY + b" ").verdict is Verdict.MISMATCH


def test_a_keyring_does_not_show_its_keys() -> None:
    keyring = Keyring(["very-secret-key"])
    assert "very-secret-key" not in repr(keyring)
