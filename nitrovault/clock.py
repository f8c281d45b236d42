"""Time as a parameter: the one clock type and the one system clock.

Everything that decides by time (token lifetimes, quota windows, privacy-budget days, receipts,
certificates) takes a :data:`Clock` so that tests drive time instead of waiting for it; production code
passes nothing and gets :func:`utc_now`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

__all__ = ["Clock", "utc_now"]

#: A source of aware UTC datetimes.
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The system clock, as an aware UTC datetime."""
    return datetime.now(UTC)
