"""What a sandbox instance simulates: its keys, its timing and the faults it injects."""

from __future__ import annotations

from dataclasses import dataclass, field

from service.callbacks.signatures import ALGORITHMS

__all__ = ["DEFAULT_HUBS", "WHOLE_FILE_ERROR", "SandboxOptions"]

# What the platform says when a file of people has no column to tell them apart by.
WHOLE_FILE_ERROR = "All prospects require either 'email' or 'id'"

DEFAULT_HUBS: dict[str, tuple[str, ...]] = {
    "marketing": ("activities", "contact", "campaign", "list", "account"),
    "crm": ("accounts", "contacts", "leads", "opportunities"),
}


def _fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {value}")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class SandboxOptions:
    """Every knob of the simulator, plus a few that make tests deterministic.

    ``signature_key`` unset means the instance has no signature key, so callbacks carry
    no ``Elements-Webhook-Signature`` header, as a real instance without one.
    """

    signature_key: str | None = None
    signature_algo: str = "sha256"
    job_seconds: float = 2.0
    drop_callbacks: float = 0.0
    duplicate_callbacks: float = 0.0
    callback_delay: float = 0.0
    wrong_key: bool = False
    fail_rate: float = 0.0
    # Fraction of jobs that fail as a whole (``ABORTED``, with ``fail_whole_message`` as
    # their ``error``) whatever their file holds.
    fail_whole: float = 0.0
    fail_whole_message: str = WHOLE_FILE_ERROR
    # Seconds announced in Retry-After on injected 429s.
    retry_after: float = 1.0
    # Redelivery of a callback that was not answered 2xx: attempt n waits base * 4**n.
    callback_retries: int = 9
    callback_retry_base: float = 1.0
    # Answer COMPLETE / CANCELED instead of COMPLETED / CANCELLED, as some endpoints do.
    legacy_status_names: bool = False
    # The instance-wide callback URL (event.notification.callback.url).
    callback_url: str | None = None
    # When set, the exact Authorization header value required; otherwise any
    # well-formed "User …, Organization …, Element …" header is accepted.
    authorization: str | None = None
    # Seconds a job's status and failed records are kept after it ends, as the real
    # platform keeps them three days; then both answer 404 as for a job never made.
    retention: float = 3 * 86400.0
    # Records of the object ``generated`` every hub answers bulk queries for (0: no
    # such object); each is computed from its index, so any number costs no memory.
    generated_records: int = 0
    # The most records one object holds from its uploads (and rows one upload keeps for
    # it): the sandbox holds them in memory, so a load test's files cannot exhaust it.
    max_records: int = 100_000
    hubs: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_HUBS))
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.signature_algo not in ALGORITHMS:
            raise ValueError(f"signature_algo must be one of {ALGORITHMS}")
        for name in ("drop_callbacks", "duplicate_callbacks", "fail_rate", "fail_whole"):
            _fraction(name, getattr(self, name))
        for name in (
            "job_seconds",
            "callback_delay",
            "retry_after",
            "callback_retry_base",
            "retention",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("generated_records", "max_records"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a whole number from 0, got {value!r}")
        if self.callback_retries < 0:
            raise ValueError("callback_retries must not be negative")
        message = self.fail_whole_message
        # Any text a JSON answer can carry (NUL included); a lone surrogate has no UTF-8.
        if not isinstance(message, str) or not message or not _encodable(message):
            raise ValueError("fail_whole_message must be non-empty text without lone surrogates")
