"""The random spread of retry and poll waits, so that many clients do not retry as one.

Drawn from the operating system's generator rather than the ``random`` module's shared
one: a wait neither depends on nor moves state that a test framework seeds or another
library draws from, and there is nothing here to seed or to keep.
"""

from __future__ import annotations

import random

__all__ = ["spread"]

_SOURCE = random.SystemRandom()


def spread(low: float, high: float) -> float:
    """A factor between ``low`` and ``high`` to multiply a wait by."""
    return _SOURCE.uniform(low, high)
