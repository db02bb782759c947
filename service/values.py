"""Checks for values that come from outside, applied where they enter. Pure: no I/O.

Callback bodies, upstream answers, form fields, query strings and path segments are
all untrusted text. What reaches a store must be valid UTF-8 without NUL (PostgreSQL
refuses NUL in text; neither store can encode a lone surrogate), numbers must fit a
64-bit column, and a name that becomes a segment of an upstream URL must not be able
to climb out of it (``..``) or add one (``/``).
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = [
    "MAX_COUNT",
    "MAX_MESSAGE",
    "count",
    "is_clean",
    "job_id_ok",
    "json_text",
    "message",
    "name_problem",
    "safe_text",
    "text",
    "upstream_id",
]

# Larger than any bulk job's record count, far below a 64-bit column's limit.
MAX_COUNT = 10**12
# An upstream job id given as a JSON number must be a whole number below this: it
# fits a 64-bit integer on any platform that parsed it, so nothing upstream rounded it.
_MAX_NUMERIC_ID = 10**18
_MAX_ID_TEXT = 200
# The most characters kept of an upstream's message: a real one is a sentence; more
# would be kept in every row and timeline entry it reaches and shown on every page.
MAX_MESSAGE = 2000

_DIGITS = re.compile(r"[0-9]{1,13}")
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Characters that would change an upstream URL's structure (even percent-encoded,
# some proxies decode them again) or that no object or hub name needs.
_NAME_FORBIDDEN = frozenset("/\\?#%")


def count(value: Any) -> int | None:
    """A record count: a whole number from 0 to ``MAX_COUNT``, else None (ignored).

    Accepts JSON integers, integral floats (``10.0``) and ASCII decimal strings; a
    bool, a negative, ``1e20``, ``"²"`` or a 5,000-digit number are not counts.
    """
    # A plain int first: what nearly every body sends (``type`` rules out a bool).
    if type(value) is int:
        return value if 0 <= value <= MAX_COUNT else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= MAX_COUNT else None
    if isinstance(value, float):
        if value.is_integer() and 0 <= value <= MAX_COUNT:
            return int(value)
        return None
    if isinstance(value, str):
        stripped = value.strip()
        if _DIGITS.fullmatch(stripped):
            number = int(stripped)
            return number if number <= MAX_COUNT else None
    return None


def is_clean(value: str) -> bool:
    """Whether ``value`` can be stored as text: no NUL, no lone surrogate."""
    if "\x00" in value:
        return False
    if value.isascii():
        # No surrogate in ASCII: skip encoding a copy just to find one (callbacks).
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def safe_text(value: str, limit: int | None = None) -> str:
    """``value`` made storable: NUL and lone surrogates become U+FFFD; cut to ``limit``.

    For text that is only shown (a note, an upstream message), where dropping it
    would lose more than replacing a few characters.
    """
    if limit is not None:
        value = value[:limit]
    if is_clean(value):
        return value
    return _SURROGATE.sub("\ufffd", value.replace("\x00", "\ufffd"))


def text(value: Any, limit: int = 200) -> str | None:
    """An identifier or status from a JSON body: a string or an integer, stripped, at
    most ``limit`` characters; None when absent, empty or not storable."""
    if type(value) is str:
        # The common case first, without the checks a number needs (callbacks).
        result = value.strip()
    elif isinstance(value, str) or (
        isinstance(value, int) and not isinstance(value, bool) and -(10**18) < value < 10**18
    ):
        result = str(value).strip()
    else:
        # Anything else: a bool, a float, a list, an object, a huge number.
        return None
    if not result or len(result) > limit or not is_clean(result):
        return None
    return result


def upstream_id(value: Any) -> str | None:
    """An upstream job id, kept exactly as given: a JSON string as it is, a JSON integer
    in its decimal digits (``1234`` is ``"1234"``); None when it cannot be an id.

    Open Connectors answers ids as strings or as numbers, so the id is opaque text. A
    bool, a float (``1234.0`` may be a rounded id), a negative or huge number, and text
    that is empty, padded with whitespace, unprintable or longer than 200 characters
    are not ids: the answer that carries one is malformed, not guessed at.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value) if 0 <= value < _MAX_NUMERIC_ID else None
    if isinstance(value, str):
        ok = 0 < len(value) <= _MAX_ID_TEXT and value == value.strip()
        return value if ok and value.isprintable() and is_clean(value) else None
    return None


def message(value: Any, limit: int = MAX_MESSAGE) -> tuple[str | None, str]:
    """An upstream's message (a failed job's ``error``) made storable, and a note
    saying what was done to it ("" when nothing was).

    Text is stripped, cut to ``limit`` characters with the cut said in the text itself
    (so whoever reads it knows there was more), and NUL and lone surrogates become
    U+FFFD. An object is read for its ``message`` string. Anything else (a number, a
    list, true) is not a message: ignored, with a note. Absent or blank: (None, "").
    """
    if isinstance(value, dict):
        value = value.get("message")
        if not isinstance(value, str):
            return None, "error ignored: an object without a message string"
    if value is None:
        return None, ""
    if not isinstance(value, str):
        kind = "a list" if isinstance(value, list) else "true or false"
        if isinstance(value, int | float) and not isinstance(value, bool):
            kind = "a number"
        return None, f"error ignored: {kind} is not text"
    kept = value.strip()
    if not kept:
        return None, ""
    notes: list[str] = []
    suffix = ""
    if len(kept) > limit:
        suffix = f"… (cut from {len(kept):,} characters)"
        notes.append(f"error cut to {limit:,} of {len(kept):,} characters")
        kept = kept[: limit - len(suffix)].rstrip()
    if not is_clean(kept):
        kept = safe_text(kept)
        notes.append("NUL or lone surrogates in the error replaced by U+FFFD")
    return kept + suffix, "; ".join(notes)


def job_id_ok(value: str) -> bool:
    """Whether ``value`` can be one of this service's job ids (letters, digits, ``_``,
    ``-``; at most 64): anything else is answered 404 before any store is asked."""
    return _JOB_ID.fullmatch(value) is not None


def name_problem(value: str) -> str | None:
    """Why ``value`` cannot be an object or hub name in an upstream URL; None if it can."""
    if not value:
        return "it is empty"
    if len(value) > 200:
        return "it is longer than 200 characters"
    if not value.isprintable() or not is_clean(value):
        return "it contains control characters"
    if any(ch in _NAME_FORBIDDEN for ch in value):
        return "it contains one of / \\ ? # %"
    if value.strip(".") == "":
        return "it is only dots"
    if value != value.strip():
        return "it starts or ends with whitespace"
    return None


def json_text(value: Any) -> str:
    """``value`` as JSON text a store can keep: UTF-8, no NUL (JSON escapes control
    characters), and a lone surrogate written as its ``\\u`` escape rather than as a
    character no encoding has. Raises ``ValueError`` or ``RecursionError`` for what
    is not JSON or nests too deeply."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text if is_clean(text) else json.dumps(value, separators=(",", ":"), allow_nan=False)
