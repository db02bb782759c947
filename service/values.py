"""Checks for values that come from outside, applied where they enter. Pure: no I/O.

Callback bodies, upstream answers, form fields, query strings and path segments are
all untrusted text. What reaches a store must be valid UTF-8 without NUL (PostgreSQL
refuses NUL in text; neither store can encode a lone surrogate), numbers must fit a
64-bit column, and a name that becomes a segment of an upstream URL must not be able
to climb out of it (``..``) or add one (``/``).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "MAX_COUNT",
    "count",
    "is_clean",
    "job_id_ok",
    "name_problem",
    "safe_text",
    "text",
]

# Larger than any bulk job's record count, far below a 64-bit column's limit.
MAX_COUNT = 10**12

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
