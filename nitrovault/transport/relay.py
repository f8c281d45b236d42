"""A bounded asyncio byte relay: every connection accepted on ``listen`` is spliced to ``target``.

The parent uses it as its public layer-4 front (TCP -> the enclave's vsock port, where TLS ends inside
the enclave) and to reach its host services; the enclave uses it to bridge vsock to its local servers
(PyPI grpcio has no vsock). It never interprets payload bytes; with the optional TLS handshake guard it
reads the 5-byte TLS *record headers* the client sends until its first application_data record, and
nothing else. socat could splice; we keep it in-process so that it is bounded, observable and runs
unchanged over ``LocalVsockMap`` in tests.

Each connection is a pair of :class:`asyncio.BufferedProtocol` ends that write straight into each other's
transport: no task, future or wake-up per chunk, since the relay is on the serving path (a small unary
gRPC call over TLS gains about 130 us at p50 through it on loopback; socat: about 65 us).

Invariants:

* **Backpressure, bounded memory.** Reads land in one shared ``buffer_size`` buffer and are copied into
  the other end's transport at once; that transport's write-buffer high-water mark is ``buffer_size``,
  and past it the reading end is paused until the buffer drains. A slow receiver therefore throttles the
  sender, and per-connection memory is at most about ``2 * buffer_size`` per direction, whatever the
  transfer size. :meth:`Relay.buffered_bytes` reports what the relay holds.
* **Half-close.** EOF from one side becomes ``write_eof()`` on the other; the opposite direction keeps
  flowing until it ends too. Only then are both sockets closed (after their buffers are flushed).
* **Idle timeout.** No byte read from either side for ``idle_timeout`` seconds closes both sides.
* **Admission, checked in this order, refused at once** (accepted and closed, never left hanging, and
  counted in ``stats.refused`` and ``stats.refused_by_reason``): relay closing (``closing``), more than
  ``max_connections`` in all (``max_connections``), more than ``max_connections_per_source`` from one
  source (``per_source_connections``), a source's token bucket empty (``per_source_rate``: it refills at
  ``connection_rate_per_source`` per second up to ``connection_burst_per_source``). A *source* is the
  peer IP for a TCP listener (IPv4-mapped addresses as IPv4, IPv6 by /64, since one host holds a whole
  /64), the peer CID for a vsock listener, and one single source for a unix listener. Per-source state
  is forgotten once a source has no connection and a full bucket, so it stays O(active sources).
* **TLS handshake guard** (when ``tls_handshake_timeout`` is set). Client -> target bytes are checked
  record header by record header before they are forwarded: the first byte must be a handshake record
  (22, else ``not_tls``); every header must carry a known content type (20-23), a 3.1-3.3 record version
  and a length within TLS's ciphertext limit, non-zero outside application data (else
  ``malformed_record``); the records before the first application_data record (23) may total at most
  ``max_handshake_bytes`` (else ``handshake_too_large``, decided on the header, before the body is
  read); and that application_data record must arrive within ``tls_handshake_timeout`` seconds of the
  accept (else ``handshake_timeout``). Any of these aborts both sides and is counted in
  ``stats.guard_closed`` and ``stats.refused_by_reason``. From the first application_data record on the
  relay only splices. Target -> client bytes are never inspected.
* **No payload in logs.** Log lines name the relay, the source and a reason, never bytes; refusals are
  logged at most once a second per reason (with a count of those not logged), so a flood cannot flood
  the log.
* **Unreachable target.** If the target cannot be connected within ``connect_timeout`` the client is
  closed at once (``stats.failed``). The client is not read from until the target is connected.
  With ``choose``, the target is picked per connection from the connections each chosen target holds
  now (the parent sends a client to the serving enclave with the fewest); ``None`` from it means none
  can take one, and the client is closed at once.
* **Drain.** :meth:`Relay.stop_accepting` closes the listening socket and lets the relayed connections
  run on; :meth:`Relay.wait_idle` waits (bounded) for them to end.
* **Front ends.** :meth:`Relay.adopt` splices a connection some front end already accepted and read from
  (the in-enclave CONNECT forwarder, :mod:`nitrovault.transport.connect`), with a :class:`Preface`: its
  ``greeting`` goes to the client as soon as the target is connected, before any target byte; the
  client bytes it already read (``early``) go to the target first; and an unreachable target gets
  ``unreachable`` written to the client before it is closed. The splice itself is the same.
* **Clean shutdown.** :meth:`Relay.close` stops accepting, aborts every active pair, waits until both
  sockets of each pair are closed and removes the unix socket file it bound.

Example::

    relay = Relay(TcpAddress("0.0.0.0", 443), VsockAddress(16, 5000), mapping=LocalVsockMap(run),
                  max_connections_per_source=64, connection_rate_per_source=50.0,
                  connection_burst_per_source=100, tls_handshake_timeout=10.0)
    await relay.start()
    ...
    await relay.close()
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from nitrovault.errors import ConfigError
from nitrovault.transport.address import DIRECT, Address, AddressMap, TcpAddress, UnixAddress, VsockAddress
from nitrovault.transport.admission import Refusal, TlsRecordGuard, TokenBucket, source_of
from nitrovault.transport.streams import Listener, _bind_unix
from nitrovault.transport.vsock import bind_vsock, connect_vsock

log = logging.getLogger(__name__)

DEFAULT_BUFFER_SIZE = 64 * 1024
DEFAULT_MAX_HANDSHAKE_BYTES = 64 * 1024
_BACKLOG = 128

_UP, _DOWN = 0, 1  # client -> target, target -> client


_AT_ACCEPT = frozenset(
    {Refusal.CLOSING, Refusal.MAX_CONNECTIONS, Refusal.PER_SOURCE_CONNECTIONS, Refusal.PER_SOURCE_RATE}
)


@dataclass(frozen=True)
class RelayStats:
    """A snapshot of a relay's counters."""

    active: int  #: connections being relayed now (including those still connecting to the target)
    total: int  #: connections admitted since start
    refused: int  #: connections closed at accept (closing, global or per-source cap, per-source rate)
    failed: int  #: connections closed because the target was unreachable
    idle_closed: int  #: pairs closed by the idle timeout
    bytes_up: int  #: bytes relayed client -> target
    bytes_down: int  #: bytes relayed target -> client
    guard_closed: int = 0  #: admitted connections closed by the TLS handshake guard
    #: every :class:`Refusal` (all present, zero or more): accept-time ones sum to ``refused``, the
    #: guard's (``not_tls``, ``malformed_record``, ``handshake_too_large``, ``handshake_timeout``) to
    #: ``guard_closed``
    refused_by_reason: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Preface:
    """What a front end adds around the splice of a connection it hands to :meth:`Relay.adopt`."""

    greeting: bytes = b""  #: written to the client once the target is connected, before any target byte
    early: bytes = b""  #: client bytes the front end read past its own request: sent to the target first
    unreachable: bytes = b""  #: written to the client (then closed) when the target cannot be reached


# -- the I/O shell ------------------------------------------------------------------------------------------


class _Source:
    __slots__ = ("active", "bucket")

    def __init__(self, bucket: TokenBucket | None) -> None:
        self.active = 0
        self.bucket = bucket


class _End(asyncio.BufferedProtocol):
    """One socket of a pair; everything it sees is handed to the pair."""

    def __init__(self, relay: Relay, side: int) -> None:
        self.relay = relay
        self.side = side  # the direction this end reads: _UP for the client, _DOWN for the target
        self.pair: _Pair | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.side == _UP:
            self.relay._admit(self, transport)
        elif self.pair is not None:
            self.pair.target_made(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.relay._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.pair is not None:
            self.pair.received(self.side, self.relay._read_buffer[:nbytes])

    def eof_received(self) -> bool:
        if self.pair is not None:
            self.pair.eof(self.side)
        return True  # keep our write side open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pair is not None:
            self.pair.lost(self.side, exc)

    def pause_writing(self) -> None:
        if self.pair is not None:
            self.pair.flow(self.side, reading=False)

    def resume_writing(self) -> None:
        if self.pair is not None:
            self.pair.flow(self.side, reading=True)


class _Pair:
    """A client and its target connection; all the per-connection state and its transitions."""

    def __init__(
        self, relay: Relay, client: asyncio.Transport, source: str, slot: _Source, preface: Preface | None
    ) -> None:
        self.relay = relay
        self.preface = preface
        self.loop = asyncio.get_running_loop()
        self.ends: list[asyncio.Transport | None] = [client, None]
        self.source = source
        self.slot = slot
        self.guard = TlsRecordGuard(relay._max_hs_bytes) if relay._hs_timeout is not None else None
        self.eofs = [False, False]
        self.lost_ends = [False, False]
        self.closing = False
        self.finished = False
        self.last_activity = self.loop.time()
        self.connector: asyncio.Task[None] | None = None
        #: the target ``choose`` picked for this pair (``None`` without a chooser)
        self.target: Address | None = None
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.idle_timer = self.loop.call_later(relay._idle, self._check_idle)
        self.hs_timer = (
            self.loop.call_later(relay._hs_timeout, self._handshake_timeout)
            if relay._hs_timeout is not None
            else None
        )

    # -- events --------------------------------------------------------------------------------------------

    def target_made(self, transport: asyncio.Transport) -> None:
        self.ends[_DOWN] = transport
        if self.closing:  # the client left while we were connecting
            transport.abort()
            return
        transport.set_write_buffer_limits(high=self.relay._bufsize)
        # connection_made comes before the target's first byte can be read: the greeting goes first
        if self.preface is not None:
            client = self.ends[_UP]
            assert client is not None
            if self.preface.greeting:
                client.write(self.preface.greeting)
            if self.preface.early:
                self.received(_UP, memoryview(self.preface.early))

    def connected(self) -> None:
        client = self.ends[_UP]
        assert client is not None
        if not self.closing:
            client.resume_reading()

    def received(self, side: int, data: memoryview) -> None:
        self.last_activity = self.loop.time()
        if side == _UP and self.guard is not None and not self.guard.done:
            verdict = self.guard.feed(data)
            if verdict is not None:
                self.relay._guard_refusal(self, verdict)
                self.abort()
                return
            if self.guard.done and self.hs_timer is not None:
                self.hs_timer.cancel()
        other = self.ends[1 - side]
        if other is None or other.is_closing():
            return
        # bytes(): the shared read buffer is reused by the next read; the transport may keep a reference
        other.write(bytes(data))
        self.relay._bytes[side] += len(data)

    def eof(self, side: int) -> None:
        self.eofs[side] = True
        other = self.ends[1 - side]
        if other is None or other.is_closing():
            return
        if all(self.eofs):
            self.close()
        elif other.can_write_eof():
            other.write_eof()
        else:
            self.close()

    def flow(self, writer_side: int, *, reading: bool) -> None:
        # the end whose write buffer crossed a mark gets its data from the *other* end
        source = self.ends[1 - writer_side]
        if source is None or source.is_closing():
            return
        if reading:
            source.resume_reading()
        else:
            source.pause_reading()

    def lost(self, side: int, exc: Exception | None) -> None:
        self.lost_ends[side] = True
        other = self.ends[1 - side]
        if other is not None and not other.is_closing():
            if exc is None and all(self.eofs):
                other.close()  # flush what is left, then close
            else:
                other.abort()
        if self.connector is not None and not self.connector.done():
            self.connector.cancel()
        self.closing = True
        self.maybe_finish()

    # -- transitions ---------------------------------------------------------------------------------------

    def close(self) -> None:
        """Both directions ended: flush and close both sockets."""
        self.closing = True
        for end in self.ends:
            if end is not None and not end.is_closing():
                end.close()

    def unreachable(self) -> None:
        """The target could not be connected: say so if the front end has words for it, then close."""
        client = self.ends[_UP]
        if (
            self.preface is None
            or not self.preface.unreachable
            or client is None
            or client.is_closing()
            or self.ends[_DOWN] is not None
        ):  # greeted already (connected, then timed out): abort
            self.abort()
            return
        self.closing = True
        client.write(self.preface.unreachable)
        client.close()  # flush, then close; connection_lost finishes the pair

    def abort(self) -> None:
        self.closing = True
        if self.connector is not None and not self.connector.done():
            self.connector.cancel()
        for end in self.ends:
            if end is not None:
                end.abort()

    def maybe_finish(self) -> None:
        if self.finished or not self.lost_ends[_UP]:
            return
        if self.connector is not None and not self.connector.done():
            return  # its cancellation calls us again
        if self.ends[_DOWN] is not None and not self.lost_ends[_DOWN]:
            return
        self.finished = True
        self.idle_timer.cancel()
        if self.hs_timer is not None:
            self.hs_timer.cancel()
        self.relay._release(self)
        if not self.done.done():
            self.done.set_result(None)

    def _check_idle(self) -> None:
        if self.finished:
            return
        remaining = self.last_activity + self.relay._idle - self.loop.time()
        if remaining > 0:
            self.idle_timer = self.loop.call_later(remaining, self._check_idle)
            return
        self.relay._idle_closed += 1
        log.info("relay %s: closing idle connection from %s", self.relay.listen, self.source)
        self.abort()

    def _handshake_timeout(self) -> None:
        if self.finished or self.guard is None or self.guard.done:
            return
        self.relay._guard_refusal(self, Refusal.HANDSHAKE_TIMEOUT)
        self.abort()

    def buffered(self) -> int:
        return sum(end.get_write_buffer_size() for end in self.ends if end is not None)


class Relay:
    """Relay connections from ``listen`` to ``target``; see the module docstring for the guarantees.

    ``None`` turns a per-source limit or the handshake guard off; ``connection_burst_per_source``
    defaults to ``ceil(connection_rate_per_source)``.
    """

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
        max_connections_per_source: int | None = None,
        connection_rate_per_source: float | None = None,
        connection_burst_per_source: int | None = None,
        tls_handshake_timeout: float | None = None,
        max_handshake_bytes: int = DEFAULT_MAX_HANDSHAKE_BYTES,
        choose: Callable[[Mapping[Address, int]], Address | None] | None = None,
    ) -> None:
        if not _positive_int(max_connections):
            raise ConfigError("max_connections must be at least 1")
        if not (_positive(idle_timeout) and _positive(connect_timeout)):
            raise ConfigError("idle_timeout and connect_timeout must be positive")
        if not isinstance(buffer_size, int) or buffer_size < 1024:
            raise ConfigError("buffer_size must be at least 1024 bytes")
        if max_connections_per_source is not None and not _positive_int(max_connections_per_source):
            raise ConfigError("max_connections_per_source must be a positive integer")
        if connection_rate_per_source is not None and not _positive(connection_rate_per_source):
            raise ConfigError("connection_rate_per_source must be positive (connections per second)")
        if connection_burst_per_source is not None:
            if connection_rate_per_source is None:
                raise ConfigError("connection_burst_per_source needs connection_rate_per_source")
            if not _positive_int(connection_burst_per_source):
                raise ConfigError("connection_burst_per_source must be a positive integer")
        if tls_handshake_timeout is not None and not _positive(tls_handshake_timeout):
            raise ConfigError("tls_handshake_timeout must be positive")
        if not isinstance(max_handshake_bytes, int) or max_handshake_bytes < 1024:
            raise ConfigError("max_handshake_bytes must be at least 1024 bytes")
        self.listen = listen
        self.target = target
        self._choose = choose
        self._mapping = mapping
        self._max = max_connections
        self._idle = float(idle_timeout)
        self._bufsize = buffer_size
        self._connect_timeout = float(connect_timeout)
        self._unix_mode = unix_mode
        self._per_source = max_connections_per_source
        self._rate = connection_rate_per_source
        self._burst: int = (
            connection_burst_per_source
            if connection_burst_per_source is not None
            else max(1, math.ceil(connection_rate_per_source or 1))
        )
        self._hs_timeout = tls_handshake_timeout
        self._max_hs_bytes = max_handshake_bytes
        # one read buffer for every connection: each read is copied out before the next one starts
        self._read_buffer = memoryview(bytearray(buffer_size))
        self._listener: Listener | None = None
        self._where: Address = listen
        self._closing = False
        self._pairs: set[_Pair] = set()
        #: pairs by the target ``choose`` picked for them (what a least-connections choice reads)
        self._by_target: dict[Address, int] = {}
        self._sources: dict[str, _Source] = {}
        self._sweep_at = max(1024, 2 * max_connections)
        self._total = 0
        self._failed = 0
        self._idle_closed = 0
        self._bytes = [0, 0]
        self._reasons = dict.fromkeys(Refusal, 0)
        self._log_at: dict[Refusal, float] = {}
        self._log_quiet: dict[Refusal, int] = {}

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind ``listen`` and start accepting. Raises ``OSError``/:class:`ConfigError` if it cannot."""
        if self._listener is not None:
            raise RuntimeError("relay already started")
        loop = asyncio.get_running_loop()
        where = self._where = self._mapping.resolve(self.listen)

        def factory() -> _End:
            return _End(self, _UP)

        if isinstance(where, UnixAddress):
            # the streams layer's unix bind (stale file removed, mode set before listen()), under a
            # protocol server, which its public start_server() (stream callbacks) does not build
            sock, identity = _bind_unix(where.path, self._unix_mode)
            try:
                server = await loop.create_unix_server(factory, sock=sock, backlog=_BACKLOG)
            except BaseException:
                sock.close()
                raise
            self._listener = Listener(server, self.listen, where, identity)
        elif isinstance(where, TcpAddress):
            server = await loop.create_server(factory, where.host, where.port, backlog=_BACKLOG)
            port = server.sockets[0].getsockname()[1]
            self._listener = Listener(server, self.listen, TcpAddress(where.host, port))
        else:
            vsock = bind_vsock(where)
            try:
                server = await loop.create_server(factory, sock=vsock, backlog=_BACKLOG)
            except BaseException:
                vsock.close()
                raise
            cid, port = vsock.getsockname()
            self._listener = Listener(server, self.listen, VsockAddress(cid, port))
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
        pairs = list(self._pairs)
        for pair in pairs:
            pair.abort()
        await asyncio.gather(*(p.done for p in pairs), return_exceptions=True)
        if self._listener is not None:
            await self._listener.close()
        log.info("relay %s -> %s closed", self.listen, self.target)

    def stop_accepting(self) -> None:
        """Drain: close the listening socket (new connections are refused by the kernel, a load balancer
        sees the port shut); connections being relayed go on until they end or :meth:`close`."""
        self._closing = True
        if self._listener is not None:
            self._listener.stop_accepting()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no connection is relayed any more, at most ``timeout`` seconds; ``True`` if none is."""
        pairs = list(self._pairs)
        if pairs:
            await asyncio.wait([p.done for p in pairs], timeout=timeout)
        return not self._pairs

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- observation -----------------------------------------------------------------------------------

    @property
    def stats(self) -> RelayStats:
        reasons = {str(k): v for k, v in self._reasons.items()}
        return RelayStats(
            active=len(self._pairs),
            total=self._total,
            refused=sum(v for k, v in self._reasons.items() if k in _AT_ACCEPT),
            failed=self._failed,
            idle_closed=self._idle_closed,
            bytes_up=self._bytes[_UP],
            bytes_down=self._bytes[_DOWN],
            guard_closed=sum(v for k, v in self._reasons.items() if k not in _AT_ACCEPT),
            refused_by_reason=MappingProxyType(reasons),
        )

    def buffered_bytes(self) -> int:
        """Bytes the relay holds right now: what its transports have yet to write (reads are copied
        into them at once, so nothing else is held)."""
        return sum(pair.buffered() for pair in self._pairs)

    # -- admission -------------------------------------------------------------------------------------

    def adopt(self, client: asyncio.Transport, preface: Preface) -> None:
        """Splice ``client``, a connection a front end accepted (its reading paused), to the target.

        Admission is the same as for a connection the relay accepted itself (a refusal aborts ``client``).
        """
        end = _End(self, _UP)
        end.transport = client
        client.set_protocol(end)
        self._admit(end, client, preface)

    def _admit(self, end: _End, client: asyncio.Transport, preface: Preface | None = None) -> None:
        source = source_of(self._where, client.get_extra_info("peername"))
        now = asyncio.get_running_loop().time()
        reason = self._admission(source, now)
        if reason is not None:
            self._count_refusal(reason, source)
            client.abort()
            return
        slot = self._sources.get(source)
        if slot is None:
            if len(self._sources) >= self._sweep_at:
                self._sweep(now)
            bucket = TokenBucket(self._rate, self._burst, now) if self._rate is not None else None
            slot = self._sources[source] = _Source(bucket)
            if bucket is not None:
                bucket.take(now)
        slot.active += 1
        self._total += 1
        client.set_write_buffer_limits(high=self._bufsize)
        client.pause_reading()  # until the target is connected
        pair = _Pair(self, client, source, slot, preface)
        end.pair = pair
        self._pairs.add(pair)
        pair.connector = asyncio.get_running_loop().create_task(self._connect(pair))

    def _admission(self, source: str, now: float) -> Refusal | None:
        if self._closing:
            return Refusal.CLOSING
        if len(self._pairs) >= self._max:
            return Refusal.MAX_CONNECTIONS
        slot = self._sources.get(source)
        if slot is None:
            return None  # a new source: a full bucket and no connection
        if self._per_source is not None and slot.active >= self._per_source:
            return Refusal.PER_SOURCE_CONNECTIONS
        if slot.bucket is not None and not slot.bucket.take(now):
            return Refusal.PER_SOURCE_RATE
        return None

    def _release(self, pair: _Pair) -> None:
        self._pairs.discard(pair)
        if pair.target is not None:
            left = self._by_target[pair.target] - 1
            if left:
                self._by_target[pair.target] = left
            else:
                del self._by_target[pair.target]
        pair.slot.active -= 1
        if pair.slot.active == 0 and pair.slot.bucket is None:
            self._sources.pop(pair.source, None)

    def _sweep(self, now: float) -> None:
        """Forget sources with no connection and a full bucket (they would start the same way again).

        Run when the table reaches a threshold that then doubles past what is left: O(1) amortised."""
        for key, slot in list(self._sources.items()):
            if slot.active == 0 and (slot.bucket is None or slot.bucket.full(now)):
                del self._sources[key]
        self._sweep_at = max(1024, 2 * self._max, 2 * len(self._sources))

    def _count_refusal(self, reason: Refusal, source: str) -> None:
        self._reasons[reason] += 1
        now = asyncio.get_running_loop().time()
        if now - self._log_at.get(reason, -math.inf) < 1.0:
            self._log_quiet[reason] = self._log_quiet.get(reason, 0) + 1
            return
        self._log_at[reason] = now
        quiet = self._log_quiet.pop(reason, 0)
        log.warning(
            "relay %s: closed a connection from %s: %s (%d active, %d more like it in the last second)",
            self.listen,
            source,
            reason,
            len(self._pairs),
            quiet,
        )

    def _guard_refusal(self, pair: _Pair, reason: Refusal) -> None:
        if not pair.closing:
            self._count_refusal(reason, pair.source)

    # -- connecting to the target ----------------------------------------------------------------------

    async def _connect(self, pair: _Pair) -> None:
        try:
            await asyncio.wait_for(self._open_target(pair), self._connect_timeout)
        except (OSError, TimeoutError, ConfigError) as exc:
            if not pair.closing:
                self._failed += 1
                log.warning(
                    "relay %s: target %s unreachable (%s)", self.listen, self.target, type(exc).__name__
                )
            pair.unreachable()
        except asyncio.CancelledError:
            pair.abort()  # the client went away, or the relay is closing
        else:
            pair.connected()
        finally:
            pair.maybe_finish()

    async def _open_target(self, pair: _Pair) -> None:
        loop = asyncio.get_running_loop()
        end = _End(self, _DOWN)
        end.pair = pair
        target = self.target if self._choose is None else self._choose(self._by_target)
        if target is None:  # no target can take it (every enclave is down): closed at once
            raise ConnectionRefusedError("no target available")
        pair.target = target
        self._by_target[target] = self._by_target.get(target, 0) + 1
        where = self._mapping.resolve(target)
        if isinstance(where, UnixAddress):
            await loop.create_unix_connection(lambda: end, where.path)
        elif isinstance(where, TcpAddress):
            await loop.create_connection(lambda: end, where.host, where.port)
        else:
            sock = await connect_vsock(where)
            try:
                await loop.create_connection(lambda: end, sock=sock)
            except BaseException:
                sock.close()
                raise


def _positive(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value > 0


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


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
