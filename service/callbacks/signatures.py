"""Sign and verify the ``Elements-Webhook-Signature`` header of Open Connectors callbacks.

The header is ``<algo>=<base64 of HMAC(key, raw body)>`` where ``algo`` is ``sha256``
or the legacy ``sha1``. The prefix alone picks the algorithm; anything else is refused.
The MAC always covers the body exactly as received, so callers pass raw bytes.

Decisions worth knowing:

- Whitespace around the whole header value is ignored (HTTP treats it as not part of the
  field value); whitespace anywhere inside it makes the header malformed.
- The algorithm name is matched exactly (``sha256``, ``sha1``), the digest is strict
  base64 with padding, and its decoded length must match the algorithm. A digest
  without any prefix is called that, not an algorithm named after the digest.
- Several keys may be accepted at once (rotation, current first); the result names the
  index of the key that matched.

``verify`` never raises for any header string: every outcome is a ``Verdict``.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac

__all__ = [
    "ALGORITHMS",
    "HEADER",
    "Keyring",
    "Verdict",
    "Verification",
    "sign",
    "verify",
]

HEADER = "Elements-Webhook-Signature"

_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha256": hashes.SHA256(),
    "sha1": hashes.SHA1(),  # noqa: S303 - the legacy algorithm Open Connectors still sends
}
ALGORITHMS: tuple[str, ...] = tuple(_HASHES)
_DIGEST_SIZES = {name: algo.digest_size for name, algo in _HASHES.items()}
_WHITESPACE = " \t\r\n"


class Verdict(enum.Enum):
    VALID = "valid"
    MISSING = "missing"
    MALFORMED = "malformed"
    UNKNOWN_ALGORITHM = "unknown_algorithm"
    MISMATCH = "mismatch"
    NO_KEYS = "no_keys"


@dataclass(frozen=True, slots=True)
class Verification:
    verdict: Verdict
    reason: str
    algorithm: str | None = None
    key_index: int | None = None

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.VALID


def _key_bytes(key: str | bytes) -> bytes:
    return key if isinstance(key, bytes) else key.encode("utf-8")


def _mac(key: str | bytes, algorithm: str) -> hmac.HMAC:
    return hmac.HMAC(_key_bytes(key), _HASHES[algorithm])


def sign(key: str | bytes, body: bytes, algorithm: str = "sha256") -> str:
    """Return the header value the upstream would send for ``body``."""
    if algorithm not in _HASHES:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    mac = _mac(key, algorithm)
    mac.update(body)
    return f"{algorithm}={base64.b64encode(mac.finalize()).decode('ascii')}"


def _is_bare_digest(value: str) -> bool:
    """A digest pasted without its ``<algorithm>=``: base64 (padded or not) that decodes
    to a digest's length. Its own padding would otherwise read as the separator."""
    try:
        raw = base64.b64decode((value + "=" * (-len(value) % 4)).encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return False
    return len(raw) in _DIGEST_SIZES.values()


def _parse(header: str) -> tuple[str, bytes] | Verification:
    value = header.strip(_WHITESPACE)
    if not value:
        return Verification(Verdict.MISSING, "signature header is empty")
    algorithm, sep, encoded = value.partition("=")
    # Checked only once the header is wrong anyway: a valid one costs nothing more.
    if (not sep or algorithm not in _HASHES) and _is_bare_digest(value):
        return Verification(
            Verdict.MALFORMED,
            "the signature is missing the sha256= or sha1= prefix"
            " (expected '<algorithm>=<base64 digest>')",
        )
    if not sep:
        return Verification(Verdict.MALFORMED, "expected '<algorithm>=<base64 digest>'")
    if algorithm not in _HASHES:
        shown = algorithm if algorithm.isascii() and algorithm.isprintable() else "?"
        return Verification(
            Verdict.UNKNOWN_ALGORITHM,
            f"unknown algorithm {shown[:16]!r}; expected sha256 or sha1",
        )
    try:
        digest = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return Verification(Verdict.MALFORMED, "digest is not valid base64", algorithm)
    if len(digest) != _DIGEST_SIZES[algorithm]:
        return Verification(
            Verdict.MALFORMED,
            f"{algorithm} digest must be {_DIGEST_SIZES[algorithm]} bytes, got {len(digest)}",
            algorithm,
        )
    return algorithm, digest


class Keyring:
    """The accepted keys (rotation: current first), each keyed once for every check.

    Keying an HMAC costs more than MACing a callback's body: each check starts from a
    copy of the keyed one instead.
    """

    def __init__(self, keys: Sequence[str | bytes]) -> None:
        self.keys = tuple(keys)
        self._keyed = {name: tuple(_mac(key, name) for key in self.keys) for name in _HASHES}
        # A match's verdict is one of these few, built once instead of per callback.
        self._matches = {
            name: tuple(
                Verification(Verdict.VALID, "signature matches", name, index)
                for index in range(len(self.keys))
            )
            for name in _HASHES
        }

    def verify(self, header: str | None, body: bytes) -> Verification:
        """Check ``header`` against ``body`` under each key in turn, in constant time per key."""
        if header is None:
            return Verification(Verdict.MISSING, f"no {HEADER} header")
        parsed = _parse(header)
        if isinstance(parsed, Verification):
            return parsed
        algorithm, digest = parsed
        if not self.keys:
            return Verification(Verdict.NO_KEYS, "no signature key is configured", algorithm)
        for index, keyed in enumerate(self._keyed[algorithm]):
            mac = keyed.copy()
            mac.update(body)
            try:
                mac.verify(digest)
            except InvalidSignature:
                continue
            return self._matches[algorithm][index]
        return Verification(
            Verdict.MISMATCH, "signature does not match the body under any key", algorithm
        )


def verify(header: str | None, body: bytes, keys: Sequence[str | bytes]) -> Verification:
    """``Keyring(keys).verify(header, body)``, for a single check."""
    return Keyring(keys).verify(header, body)
