"""A bounded asyncio byte relay: every connection accepted on ``listen`` is piped to ``target``.

The parent uses it to bridge its unix-socket gRPC front to the enclave's vsock port, and the enclave
uses it to bridge vsock back to its unix-socket gRPC server (PyPI grpcio has no vsock). It never
looks at the bytes. socat could do this; we keep it in-process so that it is bounded, observable and
runs unchanged over ``LocalVsockMap`` in tests.

Invariants:

* **Backpressure, bounded memory.** Each direction reads at most ``buffer_size`` bytes, writes them,
  and awaits ``drain()`` before reading again; the write-buffer high-water mark is ``buffer_size``
  and the stream read limit is ``buffer_size`` (asyncio pauses reading past about twice that). A slow
  receiver therefore throttles the sender, and per-connection memory is O(buffer_size), whatever the
  transfer size. :meth:`Relay.buffered_bytes` reports what the relay holds (chunks in hand plus
  transport write buffers).
* **Half-close.** EOF from one side becomes ``write_eof()`` on the other; the opposite direction keeps
  flowing until it ends too. Only then are both sockets closed.
* **Idle timeout.** No byte moving in either direction for ``idle_timeout`` seconds closes both sides.
* **Connection cap.** Over ``max_connections`` a new connection is accepted and closed at once, and
  counted in ``stats.refused``.
* **Unreachable target.** If the target cannot be connected within ``connect_timeout`` the client is
  closed at once (``stats.failed``).
* **Clean shutdown.** :meth:`Relay.close` stops accepting, aborts every active pair, waits for their
  tasks and removes the unix socket file it bound.

Example::

    relay = Relay(UnixAddress("/tmp/front.sock"), VsockAddress(16, 5000), mapping=LocalVsockMap(run))
    await relay.start()
    ...
    await relay.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from nitrovault.errors import ConfigError
from nitrovault.transport.address import DIRECT, Address, AddressMap
from nitrovault.transport.streams import Listener, open_connection, start_server

log = logging.getLogger(__name__)

DEFAULT_BUFFER_SIZE = 64 * 1024

_UP, _DOWN = 0, 1


@dataclass(frozen=True)
class RelayStats:
    """A snapshot of a relay's counters."""

    active: int  #: connections being relayed now (including those still connecting to the target)
    total: int  #: connections accepted under the cap since start
    refused: int  #: connections closed at once because the cap was reached (or the relay was closing)
    failed: int  #: connections closed because the target was unreachable
    idle_closed: int  #: pairs closed by the idle timeout
    bytes_up: int  #: bytes relayed client -> target
    bytes_down: int  #: bytes relayed target -> client


@dataclass(eq=False)  # identity-hashed: kept in a set while active
class _Pair:
    client: asyncio.StreamWriter
    target: asyncio.StreamWriter
    last_activity: float
    in_hand: list[int] = field(default_factory=lambda: [0, 0])

    def buffered(self) -> int:
        return (
            sum(self.in_hand)
            + self.client.transport.get_write_buffer_size()
            + self.target.transport.get_write_buffer_size()
        )


def _abort(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()


class Relay:
    """Relay connections from ``listen`` to ``target``; see the module docstring for the guarantees."""

    def __init__(
        self,
        listen: Address,
        target: Address,
        *,
        mapping: AddressMap = DIRECT,
        max_connections: int = 256,
        idle_timeout: float = 300.0,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
        connect_timeout: float = 5.0,
        unix_mode: int = 0o600,
    ) -> None:
        if max_connections < 1:
            raise ConfigError("max_connections must be at least 1")
        if idle_timeout <= 0 or connect_timeout <= 0:
            raise ConfigError("idle_timeout and connect_timeout must be positive")
        if buffer_size < 1024:
            raise ConfigError("buffer_size must be at least 1024 bytes")
        self.listen = listen
        self.target = target
        self._mapping = mapping
        self._max = max_connections
        self._idle = idle_timeout
        self._bufsize = buffer_size
        self._connect_timeout = connect_timeout
        self._unix_mode = unix_mode
        self._listener: Listener | None = None
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._pairs: set[_Pair] = set()
        self._active = 0
        self._total = 0
        self._refused = 0
        self._failed = 0
        self._idle_closed = 0
        self._bytes = [0, 0]

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind ``listen`` and start accepting. Raises ``OSError``/:class:`ConfigError` if it cannot."""
        if self._listener is not None:
            raise RuntimeError("relay already started")
        self._listener = await start_server(
            self.listen, self._on_client, self._mapping, limit=self._bufsize, unix_mode=self._unix_mode
        )
        log.info("relay %s -> %s listening on %s", self.listen, self.target, self._listener.bound)

    @property
    def bound(self) -> Address:
        """The address actually bound (after mapping; a tcp port 0 is filled in)."""
        if self._listener is None:
            raise RuntimeError("relay not started")
        return self._listener.bound

    async def close(self) -> None:
        """Stop accepting, abort every active pair, wait for them, and remove the unix socket file."""
        self._closing = True
        if self._listener is not None:
            self._listener.stop_accepting()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            await self._listener.close()
        log.info("relay %s -> %s closed", self.listen, self.target)

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- observation -----------------------------------------------------------------------------------

    @property
    def stats(self) -> RelayStats:
        return RelayStats(
            active=self._active,
            total=self._total,
            refused=self._refused,
            failed=self._failed,
            idle_closed=self._idle_closed,
            bytes_up=self._bytes[_UP],
            bytes_down=self._bytes[_DOWN],
        )

    def buffered_bytes(self) -> int:
        """Bytes the relay holds right now: chunks read but not yet drained, plus write buffers.

        The stream readers' own buffers are bounded separately by asyncio (``limit=buffer_size``).
        """
        return sum(pair.buffered() for pair in self._pairs)

    # -- per connection --------------------------------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing or self._active >= self._max:
            self._refused += 1
            log.warning(
                "relay %s: refusing connection (%d active, cap %d)", self.listen, self._active, self._max
            )
            _abort(writer)
            return
        task = asyncio.current_task()
        if task is None:  # asyncio always runs this callback in a task
            raise RuntimeError("relay handler must run in a task")
        self._tasks.add(task)
        self._active += 1
        self._total += 1
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # close() cancels us; asyncio's stream callback would log a cancelled handler as an error.
            if not self._closing:
                raise
        except Exception:  # a relay must outlive any one connection; the error carries no payload bytes
            log.exception("relay %s: connection handler failed", self.listen)
        finally:
            self._active -= 1
            self._tasks.discard(task)

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            t_reader, t_writer = await asyncio.wait_for(
                open_connection(self.target, self._mapping, limit=self._bufsize), self._connect_timeout
            )
        except (OSError, TimeoutError, ConfigError) as exc:
            self._failed += 1
            log.warning("relay %s: target %s unreachable (%s)", self.listen, self.target, type(exc).__name__)
            _abort(c_writer)
            return
        except BaseException:
            _abort(c_writer)
            raise
        for w in (c_writer, t_writer):
            w.transport.set_write_buffer_limits(high=self._bufsize)
        loop = asyncio.get_running_loop()
        pair = _Pair(client=c_writer, target=t_writer, last_activity=loop.time())
        self._pairs.add(pair)
        up = asyncio.create_task(self._pump(pair, c_reader, t_writer, _UP))
        down = asyncio.create_task(self._pump(pair, t_reader, c_writer, _DOWN))
        idle = asyncio.create_task(self._watch_idle(pair))
        pending: set[asyncio.Task[None]] = {up, down, idle}
        clean = False
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if idle in done:
                    self._idle_closed += 1
                    log.info("relay %s: closing idle connection", self.listen)
                    break
                if any(not t.cancelled() and t.exception() is not None for t in done):
                    break  # a socket error on either side ends both directions
                if up.done() and down.done():
                    clean = True
                    break
        finally:
            self._pairs.discard(pair)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for w in (c_writer, t_writer):
                if clean:
                    w.close()
                else:
                    _abort(w)
            for w in (c_writer, t_writer):
                with contextlib.suppress(Exception):
                    await w.wait_closed()

    async def _pump(
        self, pair: _Pair, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: int
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await reader.read(self._bufsize)
            if not data:
                break
            pair.last_activity = loop.time()
            pair.in_hand[direction] = len(data)
            writer.write(data)
            await writer.drain()  # backpressure: a slow receiver stops us reading more
            pair.in_hand[direction] = 0
            self._bytes[direction] += len(data)
            pair.last_activity = loop.time()
        # Half-close: pass the EOF on, keep the other direction flowing.
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()

    async def _watch_idle(self, pair: _Pair) -> None:
        loop = asyncio.get_running_loop()
        while True:
            remaining = pair.last_activity + self._idle - loop.time()
            if remaining <= 0:
                return
            await asyncio.sleep(remaining)


def run_relay(
    listen: Address,
    target: Address,
    *,
    mapping: AddressMap = DIRECT,
    on_ready: Callable[[Address], None] | None = None,
    max_connections: int = 256,
    idle_timeout: float = 300.0,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    connect_timeout: float = 5.0,
) -> None:
    """Run a relay until SIGINT or SIGTERM, then shut it down cleanly (blocking; for ``python -m``).

    ``on_ready`` is called with the bound address once the relay accepts connections.
    """

    async def main() -> None:
        relay = Relay(
            listen,
            target,
            mapping=mapping,
            max_connections=max_connections,
            idle_timeout=idle_timeout,
            buffer_size=buffer_size,
            connect_timeout=connect_timeout,
        )
        await relay.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            if on_ready is not None:
                on_ready(relay.bound)
            await stop.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await relay.close()

    asyncio.run(main())
