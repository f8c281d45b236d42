"""How ``Generate`` turns the text a generation releases into stream messages.

The generation runs on a model worker thread and releases text piece by piece (often one token each);
the stream's messages are written by the event loop. Every message costs a quota charge, a transcript
entry and a TLS record through two relays, and every wake-up of the event loop from the worker thread
costs a hand-over of the GIL in the middle of the model's forward pass. So pieces are gathered on the
worker's side (:class:`ReleasedText`, a lock and a list: no event-loop call per token) and the loop takes
them at most once per interval (:func:`messages`):

* the first piece is sent as soon as it is released;
* after a message, whatever is released in the next ``interval_s`` is sent as one message when the
  interval is over; if nothing came, the next piece is sent as soon as it arrives;
* the end of the generation flushes at once (no waiting out the interval), and ends the messages.

The worker wakes the loop only when the loop is waiting for text (at most once per message); the loop
sleeps through an interval on a timer, woken early only by the end. Text and token counts are never
reordered, dropped or duplicated: what :meth:`ReleasedText.push` got, in order, is what the messages
carry, joined.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator


class ReleasedText:
    """Text released by a generation thread, taken by the event loop (``loop`` is that loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._text: list[str] = []
        self._tokens = 0
        self._waiter: asyncio.Future[None] | None = None
        self._end: asyncio.Future[None] = loop.create_future()

    def push(self, text: str, tokens: int) -> None:
        """Release ``text`` (accounting for ``tokens`` generated tokens); any thread."""
        with self._lock:
            self._text.append(text)
            self._tokens += tokens
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._loop.call_soon_threadsafe(_wake, waiter)

    def end(self) -> None:
        """The generation is over (no push after this); on the event loop's thread."""
        _wake(self._end)
        with self._lock:
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            _wake(waiter)

    def _take(self) -> tuple[str, int] | None:
        """What was released since the last take, or None when nothing was (the caller's lock)."""
        if not self._text and not self._tokens:
            return None
        taken = "".join(self._text), self._tokens
        self._text, self._tokens = [], 0
        return taken

    async def take(self) -> tuple[str, int] | None:
        """The text released since the last take, waiting for some; None once the generation ended and
        everything was taken."""
        while True:
            with self._lock:
                taken = self._take()
                if taken is not None or self._end.done():  # end() and take() run on the loop's thread
                    return taken
                self._waiter = waiter = self._loop.create_future()
            await waiter

    async def ended_within(self, seconds: float) -> None:
        """Return after ``seconds``, or sooner if the generation ends."""
        if seconds > 0 and not self._end.done():
            await asyncio.wait({self._end}, timeout=seconds)  # never cancels the end future


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def messages(released: ReleasedText, interval_s: float) -> AsyncIterator[tuple[str, int]]:
    """``(text, tokens)`` per stream message (module docstring) until the generation ended."""
    loop = asyncio.get_running_loop()
    sent_at = -math.inf
    while True:
        await released.ended_within(sent_at + interval_s - loop.time())
        taken = await released.take()
        if taken is None:
            return
        yield taken
        sent_at = loop.time()
