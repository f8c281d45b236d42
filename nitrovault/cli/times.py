"""``--at``: the one parser of a point in time on the command line.

Accepted: ISO 8601 with a UTC offset (``2024-09-07T14:37:39.545Z``, ``2025-06-01T10:00:00+02:00``) or
``@EPOCH`` seconds (``@1725719859.5``, as ``date -d @...`` takes it). A time without an offset is refused
rather than guessed: attestation documents, receipts and audit records carry UTC, and reading a local
time as UTC (or the reverse) would verify against the wrong instant without a word.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

import typer

__all__ = ["AT_FORMAT", "parse_at"]

#: what ``--at`` takes, for option help texts
AT_FORMAT = "ISO 8601 with a UTC offset, or @EPOCH seconds"

_HINT = "give ISO 8601 with an offset (2025-01-01T00:00:00Z, ...+02:00) or @EPOCH seconds"


def parse_at(value: str) -> datetime:
    """``value`` as an aware datetime, or a ``typer.BadParameter`` naming ``--at``."""
    if value.startswith("@"):
        try:
            seconds = float(value[1:])
            if not math.isfinite(seconds):
                raise ValueError(value)
            return datetime.fromtimestamp(seconds, UTC)
        except (ValueError, OverflowError, OSError):
            raise typer.BadParameter(f"not a number of seconds since the epoch: {value!r}",
                                     param_hint="--at") from None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"not an ISO 8601 time: {value!r}; {_HINT}", param_hint="--at") from None
    if at.tzinfo is None:
        raise typer.BadParameter(f"no UTC offset in {value!r}; {_HINT}", param_hint="--at")
    return at
