"""How ``Generate`` turns released text into messages (``enclave_app.streams``): the first piece at once,
later ones gathered on the worker's side until ``batching.stream_interval_ms`` has passed since the
previous message, the end of the generation flushing at once. Driven piece by piece from a real thread;
no clock decides an assertion and nothing sleeps (where an interval matters it is so long that only the
end can flush)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from fakes import WAIT_S

from enclave_app.streams import ReleasedText, messages

FOREVER = 1e9
Message = tuple[str, int]


async def _next(stream: AsyncIterator[Message]) -> Message:
    return await asyncio.wait_for(anext(stream), WAIT_S)  # a hang fails the test instead


async def _push_from_a_thread(released: ReleasedText, text: str, tokens: int) -> None:
    worker = threading.Thread(target=released.push, args=(text, tokens))
    worker.start()
    await asyncio.to_thread(worker.join)


def test_the_first_piece_goes_at_once_and_the_rest_waits_for_the_interval_or_the_end() -> None:
    async def scenario() -> list[Message]:
        released = ReleasedText(asyncio.get_running_loop())
        stream = messages(released, FOREVER)
        first = asyncio.ensure_future(_next(stream))  # waiting for text before any was released
        await _push_from_a_thread(released, "The", 1)
        out = [await first]
        second = asyncio.ensure_future(_next(stream))
        for text, tokens in ((" enclave", 2), (" attests", 1)):
            # each push wakes the loop before the thread's join does: a stream sending pieces at once
            # (interval 0) would take " enclave" alone here
            await _push_from_a_thread(released, text, tokens)
        released.end()  # flushed without waiting out the interval
        out.append(await second)
        assert [m async for m in stream] == []
        return out

    assert asyncio.run(scenario()) == [("The", 1), (" enclave attests", 3)]


def test_interval_zero_sends_each_piece_released_after_the_last_message() -> None:
    async def scenario() -> list[Message]:
        released = ReleasedText(asyncio.get_running_loop())
        stream = messages(released, 0.0)
        out = []
        for piece in (("a", 1), ("b", 1), ("", 2)):
            await _push_from_a_thread(released, *piece)
            out.append(await _next(stream))
        released.end()
        assert [m async for m in stream] == []
        return out

    assert asyncio.run(scenario()) == [("a", 1), ("b", 1), ("", 2)]  # tokens without text still count


def test_what_was_released_before_a_take_is_one_message_and_an_empty_generation_sends_none() -> None:
    async def scenario() -> tuple[list[Message], list[Message]]:
        released = ReleasedText(asyncio.get_running_loop())
        for piece in (("x", 1), ("y", 1)):
            released.push(*piece)
        released.end()
        empty = ReleasedText(asyncio.get_running_loop())
        empty.end()
        return [m async for m in messages(released, 0.0)], [m async for m in messages(empty, FOREVER)]

    assert asyncio.run(scenario()) == ([("xy", 2)], [])


def test_many_pieces_from_a_thread_arrive_whole_and_in_order() -> None:
    words = [f"w{i} " for i in range(2000)]

    async def scenario() -> list[Message]:
        released = ReleasedText(asyncio.get_running_loop())

        def produce() -> None:
            for word in words:
                released.push(word, 1)

        producer = threading.Thread(target=produce)
        producer.start()
        got: list[Message] = []
        stream = messages(released, 0.0)
        consumer = asyncio.ensure_future(_collect(stream, got))
        await asyncio.to_thread(producer.join)
        released.end()
        await asyncio.wait_for(consumer, WAIT_S)
        return got

    got = asyncio.run(scenario())
    assert "".join(t for t, _ in got) == "".join(words)
    assert sum(n for _, n in got) == len(words)


async def _collect(stream: AsyncIterator[Message], into: list[Message]) -> None:
    async for message in stream:
        into.append(message)
