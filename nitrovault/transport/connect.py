"""The in-enclave KMS forwarder: an HTTP ``CONNECT`` proxy on 127.0.0.1 that admits only listed hosts.

boto3 inside the enclave is given this forwarder as its HTTPS proxy and KMS's real endpoint
(``https://kms.<region>.amazonaws.com``). urllib3 then sends ``CONNECT kms.<region>.amazonaws.com:443
HTTP/1.1`` and runs TLS through the tunnel with that name as SNI and as the name the certificate must
carry. The forwarder checks the requested host and port against ``allowed``, connects ``target``
(vsock ``(3, 8000)``, where the parent's ``vsock-proxy`` relays raw TCP to KMS), answers ``200`` and
splices. So the enclave needs no DNS, no ``/etc/hosts`` and no resolver override, and the parent's
``vsock-proxy`` sees exactly the bytes it would see from any TLS client of KMS.

Security argument: this is routing only. Key release is protected by TLS, run end to end by boto3 and
verified against the CA bundle in the measured config (``kms_client_from_env(ca_bundle=...)``): the
parent, which owns the other end of the vsock, can drop or delay the bytes but not read or forge them,
whatever this module does. Its own rules only keep it from being a general-purpose proxy for code in
the enclave, and from being held open by a client that never sends a request:

* one request head per connection, at most ``max_head_bytes`` (431) within ``head_timeout_s`` of the
  accept (408); at most ``max_connections`` connections in all, heads and tunnels (503);
* ``CONNECT`` only (405), in authority form ``host:port``: no user info, no absolute URL, no stray
  bytes, HTTP/1.0 or 1.1 (400); the lower-cased host and the port exactly in ``allowed`` (403): an IP
  literal only if it is listed itself, no wildcard, no suffix match;
* ``200 Connection Established`` only once the target is connected; if it cannot be, ``502``;
* bytes the client sent after the head in the same read (urllib3 does not, but a pipelining client
  sends its ClientHello at once) go to the target first, never dropped;
* refusals answer an HTTP status and close; they are logged with the status and the reason (the
  method or the host:port at most, both already checked to be plain tokens), never with request bytes,
  and at most once a second per status.

After the head, a tunnel is an ordinary :class:`~nitrovault.transport.relay.Relay` splice (handed over
with :meth:`Relay.adopt <nitrovault.transport.relay.Relay.adopt>`): the same connect path over the
:class:`~nitrovault.transport.AddressMap` (real vsock or ``LocalVsockMap``), backpressure, half-close,
idle timeout and clean shutdown.

Hand-written: the maintained asyncio proxies (proxy.py, mitmproxy, pproxy) are whole HTTP proxy servers
with plug-ins, none restricts ``CONNECT`` to an exact allow list out of the box, and each would add an
unmeasured HTTP stack to the enclave image for what is one request line on top of the relay.

Example::

    forwarder = ConnectForwarder(TcpAddress("127.0.0.1", 0), VsockAddress(3, 8000),
                                 allowed=[("kms.us-east-1.amazonaws.com", 443)], mapping=DIRECT)
    await forwarder.start()
    kms = kms_client_from_env("us-east-1", "https://kms.us-east-1.amazonaws.com", ca_bundle=pem,
                              proxy=f"http://127.0.0.1:{forwarder.port}")
    ...
    await forwarder.close()
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from nitrovault.errors import ConfigError
from nitrovault.transport.address import Address, AddressMap, TcpAddress
from nitrovault.transport.relay import Preface, Relay

log = logging.getLogger(__name__)

_METHOD = re.compile(rb"[A-Z]{1,16}")
# authority form: a registered name (letters, digits, dots, hyphens) or a bracketed IPv6 literal, and a
# port without sign or leading zero. Anything else ("user@host", "http://host/", "%" escapes) is malformed.
_AUTHORITY = re.compile(rb"([A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):([1-9][0-9]{0,4})")
_FIELD_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VERSIONS = frozenset({b"HTTP/1.0", b"HTTP/1.1"})
_HOST = re.compile(r"[a-z0-9.-]{1,253}|[0-9a-f:.]{2,45}")

ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"
_PHRASES = {
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def status_response(status: int) -> bytes:
    """The whole HTTP/1.1 response the forwarder sends when it refuses (no body, then it closes)."""
    extra = "Allow: CONNECT\r\n" if status == 405 else ""
    return (
        f"HTTP/1.1 {status} {_PHRASES[status]}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    ).encode()


class HeadRefused(Exception):
    """A request head the forwarder will not tunnel: ``status`` to answer and a loggable ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def parse_connect_head(head: bytes) -> tuple[str, int]:
    """The ``(lower-cased host, port)`` of a ``CONNECT`` request head (pure; no allow-list check).

    ``head`` is everything before the blank line that ends it. Raises :class:`HeadRefused` with 405 for
    another method and 400 for anything malformed; its reason quotes nothing but a checked method token.
    """
    lines = head.split(b"\r\n")
    if any(b"\r" in line or b"\n" in line or not _printable(line) for line in lines):
        raise HeadRefused(400, "malformed request head (control or non-ASCII bytes)")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _METHOD.fullmatch(parts[0]) or parts[2] not in _VERSIONS:
        raise HeadRefused(400, "malformed request line")
    method, target, _ = parts
    if method != b"CONNECT":
        raise HeadRefused(405, f"method {method.decode()} is not CONNECT")
    match = _AUTHORITY.fullmatch(target)
    if match is None:
        raise HeadRefused(400, "CONNECT target is not host:port")
    for line in lines[1:]:
        name, colon, _ = line.partition(b":")
        if not colon or not _FIELD_NAME.fullmatch(name):  # also refuses obsolete line folding
            raise HeadRefused(400, "malformed header field")
    port = int(match.group(2))
    if port > 0xFFFF:
        raise HeadRefused(400, "CONNECT port out of range")
    host = match.group(1).decode("ascii").lower()
    if host.startswith("["):
        host = host[1:-1]
    return host, port


def _printable(line: bytes) -> bool:
    return all(0x20 <= b < 0x7F or b == 0x09 for b in line)


@dataclass(frozen=True)
class ForwarderStats:
    """A snapshot of a forwarder's counters."""

    active: int  #: connections now, reading their head or tunnelled
    tunnels: int  #: CONNECT requests accepted (the target then connected, or 502)
    bytes_up: int  #: bytes tunnelled client -> target (pipelined bytes included)
    bytes_down: int  #: bytes tunnelled target -> client
    #: refusals by HTTP status (400, 403, 405, 408, 431, 502, 503; all present, zero or more)
    refused_by_status: Mapping[int, int] = field(default_factory=lambda: MappingProxyType({}))


class ConnectForwarder:
    """``CONNECT host:port`` tunnels to ``target`` for exactly the ``(host, port)`` pairs in ``allowed``.

    ``listen`` is a TCP address (127.0.0.1 in the enclave; port 0 picks one, see :attr:`port`). The
    tunnel's connect, idle and buffer behaviour is the relay's (``connect_timeout_s``, ``idle_timeout_s``).
    """

    def __init__(
        self,
        listen: TcpAddress,
        target: Address,
        *,
        allowed: Collection[tuple[str, int]],
        mapping: AddressMap,
        max_head_bytes: int = 8192,
        head_timeout_s: float = 5.0,
        max_connections: int = 64,
        connect_timeout_s: float = 5.0,
        idle_timeout_s: float = 300.0,
    ) -> None:
        if not isinstance(listen, TcpAddress):
            raise ConfigError("the CONNECT forwarder listens on TCP (127.0.0.1 in the enclave)")
        self.allowed = frozenset(_allowed_entry(entry) for entry in allowed)
        if not self.allowed:
            raise ConfigError("the CONNECT forwarder needs at least one allowed (host, port)")
        if not isinstance(max_head_bytes, int) or isinstance(max_head_bytes, bool) or max_head_bytes < 64:
            raise ConfigError("max_head_bytes must be an integer of at least 64")
        if not _positive(head_timeout_s):
            raise ConfigError("head_timeout_s must be positive")
        self.listen = listen
        self.target = target
        self.mapping = mapping
        self.max_head_bytes = max_head_bytes
        self.head_timeout_s = float(head_timeout_s)
        self.max_connections = max_connections
        # the splice engine: never bound, it only gets connections through adopt()
        self._relay = Relay(
            listen,
            target,
            mapping=mapping,
            max_connections=max_connections,
            idle_timeout=idle_timeout_s,
            connect_timeout=connect_timeout_s,
        )
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._heads: set[_Head] = set()
        self._closing = False
        self._refused = dict.fromkeys(sorted(_PHRASES), 0)
        del self._refused[502]  # counted by the relay (its ``failed``)
        self._log_at: dict[int, float] = {}
        self._log_quiet: dict[int, int] = {}

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on ``listen``. Raises ``OSError`` if it cannot bind (e.g. ``lo`` is still down)."""
        if self._server is not None:
            raise RuntimeError("forwarder already started")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Head(self), self.listen.host, self.listen.port, backlog=128
        )
        self._port = int(self._server.sockets[0].getsockname()[1])
        log.info(
            "KMS forwarder on %s:%d -> %s for %s",
            self.listen.host,
            self._port,
            self.target,
            ", ".join(f"{h}:{p}" for h, p in sorted(self.allowed)),
        )

    @property
    def port(self) -> int:
        """The TCP port bound (the one the OS chose when ``listen`` asked for port 0)."""
        if self._port is None:
            raise RuntimeError("forwarder not started")
        return self._port

    async def close(self) -> None:
        """Stop accepting, drop connections still sending their head, end every tunnel (idempotent)."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for head in list(self._heads):
            head.abort()
        await self._relay.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> ConnectForwarder:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def stats(self) -> ForwarderStats:
        relay = self._relay.stats
        refused = {**self._refused, 502: relay.failed}
        return ForwarderStats(
            active=len(self._heads) + relay.active,
            tunnels=relay.total,
            bytes_up=relay.bytes_up,
            bytes_down=relay.bytes_down,
            refused_by_status=MappingProxyType(dict(sorted(refused.items()))),
        )

    # -- per connection (called by _Head) ----------------------------------------------------------------

    def _accepting(self) -> int | None:
        """The status to refuse a new connection with, or None to read its head."""
        if self._closing or len(self._heads) + self._relay.stats.active >= self.max_connections:
            return 503
        return None

    def _head_done(self, head: _Head, transport: asyncio.Transport, request: bytes, early: bytes) -> None:
        try:
            host, port = parse_connect_head(request)
            if (host, port) not in self.allowed:
                raise HeadRefused(403, f"{host}:{port} is not an allowed CONNECT target")
        except HeadRefused as refused:
            self._refuse(transport, refused.status, refused.reason)
            return
        preface = Preface(greeting=ESTABLISHED, early=early, unreachable=status_response(502))
        self._relay.adopt(transport, preface)

    def _refuse(self, transport: asyncio.Transport, status: int, reason: str) -> None:
        self._refused[status] += 1
        now = asyncio.get_running_loop().time()
        if now - self._log_at.get(status, -math.inf) >= 1.0:
            self._log_at[status] = now
            log.warning(
                "KMS forwarder refused a connection: %d %s (%d more like it in the last second)",
                status,
                reason,
                self._log_quiet.pop(status, 0),
            )
        else:
            self._log_quiet[status] = self._log_quiet.get(status, 0) + 1
        if not transport.is_closing():
            transport.write(status_response(status))
            transport.close()  # flush the answer, then close


class _Head(asyncio.Protocol):
    """A connection until its request head is complete; then the relay takes the transport over."""

    def __init__(self, forwarder: ConnectForwarder) -> None:
        self.forwarder = forwarder
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        status = self.forwarder._accepting()
        if status is not None:
            transport.pause_reading()
            self.forwarder._refuse(transport, status, "forwarder closing or at max_connections")
            return
        self.forwarder._heads.add(self)
        self.timer = asyncio.get_running_loop().call_later(self.forwarder.head_timeout_s, self._timeout)

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self not in self.forwarder._heads:
            return
        start = max(0, len(self.buffer) - 3)
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n", start)
        limit = self.forwarder.max_head_bytes
        if end < 0 and len(self.buffer) <= limit:
            return  # not complete yet
        transport = self.transport
        self._detach()
        if end < 0 or end + 4 > limit:
            self.forwarder._refuse(transport, 431, f"request head over {limit} bytes")
            return
        request, early = bytes(self.buffer[:end]), bytes(self.buffer[end + 4 :])
        self.buffer.clear()
        self.forwarder._head_done(self, transport, request, early)

    def eof_received(self) -> bool:
        self._detach()
        return False  # closed before a whole head: nothing to answer, close

    def connection_lost(self, exc: Exception | None) -> None:
        self._detach()

    def _timeout(self) -> None:
        if self.transport is not None and self in self.forwarder._heads:
            transport = self.transport
            self._detach()
            seconds = self.forwarder.head_timeout_s
            self.forwarder._refuse(transport, 408, f"no complete request head within {seconds}s")

    def abort(self) -> None:
        transport = self.transport
        self._detach()
        if transport is not None:
            transport.abort()

    def _detach(self) -> None:
        """Stop reading (what follows belongs to the tunnel or is ignored) and leave the head phase."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self.forwarder._heads.discard(self)


def _allowed_entry(entry: tuple[str, int]) -> tuple[str, int]:
    try:
        host, port = entry
    except (TypeError, ValueError):
        raise ConfigError(f"an allowed CONNECT target must be a (host, port) pair, got {entry!r}") from None
    if not isinstance(host, str) or not _HOST.fullmatch(host.lower()):
        raise ConfigError(f"allowed CONNECT host must be a host name or IP literal, got {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 0xFFFF:
        raise ConfigError(f"allowed CONNECT port must be in 1..65535, got {port!r}")
    return host.lower(), port


def _positive(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value > 0


__all__ = ["ConnectForwarder", "ForwarderStats", "HeadRefused", "parse_connect_head"]
