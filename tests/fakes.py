"""The test suite's one home for fake time and for waiting on conditions.

* :class:`FakeClock`: a :data:`nitrovault.clock.Clock` (aware datetimes) that only moves when a test moves
  it (or by a fixed ``tick`` per reading).
* :class:`FakeMonotonic`: a monotonic ``float`` clock plus the matching ``async sleep`` (for code that takes
  ``clock=time.monotonic, sleep=asyncio.sleep``); sleeping advances it at once.
* :func:`run_async`: run an ``async def`` test in a fresh event loop (no pytest plugin needed).
* :func:`wait_until` / :func:`until`: wait for a condition, never for a fixed time; bounded by a generous
  timeout that fails with what was awaited.

Imported as ``from fakes import ...`` (``tests/`` is on ``sys.path`` the way ``stores.py`` is).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

__all__ = ["START", "WAIT_S", "FakeClock", "FakeMonotonic", "run_async", "until", "wait_until"]

#: where a :class:`FakeClock` starts unless told otherwise
START = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)

#: how long a wait for a condition may take before the test fails (generous: a loaded one-CPU box)
WAIT_S = 30.0


def _delta(by: float | timedelta) -> timedelta:
    return by if isinstance(by, timedelta) else timedelta(seconds=by)


class FakeClock:
    """A settable clock of aware datetimes (UTC unless started in another zone).

    ``clock()`` reads it, ``clock.advance(seconds or timedelta)`` moves it (backwards too, for clock-step
    tests), ``clock.now = at`` sets it. With ``tick``, every reading returns the current time and then moves
    the clock on by ``tick`` (for code that needs distinct, increasing timestamps).
    """

    def __init__(self, now: datetime = START, *, tick: float | timedelta = 0) -> None:
        self.now = now
        self.tick = _delta(tick)

    @property
    def now(self) -> datetime:
        return self._now

    @now.setter
    def now(self, at: datetime) -> None:
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError(f"a FakeClock keeps aware datetimes, not {at!r}")
        self._now = at

    def __call__(self) -> datetime:
        at = self._now
        self._now = at + self.tick
        return at

    def advance(self, by: float | timedelta) -> datetime:
        """Move the clock by ``by`` (seconds or a timedelta); returns the new time."""
        self.now = self._now + _delta(by)
        return self._now

    def __repr__(self) -> str:
        return f"FakeClock({self._now.isoformat()})"


class FakeMonotonic:
    """A monotonic clock in float seconds and its ``sleep``: ``await clock.sleep(s)`` records ``s`` in
    :attr:`slept`, advances the clock by ``s`` and only yields to the loop (no real time passes)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def run_async(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (no pytest plugin needed)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


def wait_until(predicate: Callable[[], object], *, what: str, timeout: float = WAIT_S,
               interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that; fail the test with ``what``
    after ``timeout`` seconds. The interval only paces the polling: nothing depends on its length."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


async def until(condition: Callable[[], object], *, what: str, timeout: float = WAIT_S) -> None:
    """The event-loop form of :func:`wait_until`: poll ``condition`` (a plain or an ``async`` callable)
    between turns of the loop until it is truthy; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.005)
