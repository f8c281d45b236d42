"""What the relay decides about a connection without touching a payload byte (pure; no I/O).

* :class:`Refusal`: why a connection was refused at accept or closed by the handshake guard;
* :class:`TlsRecordGuard`: the client's TLS record *headers* up to its first application_data record;
* :class:`TokenBucket`: per-source connection rates, with time passed in;
* :func:`source_of`: which source a peer counts as (IP, IPv6 /64, vsock CID, or the one local source).

:class:`nitrovault.transport.relay.Relay` is the I/O shell that applies them. Written here because no
library parses TLS record framing without also terminating TLS, which the parent must never do.
"""

from __future__ import annotations

import enum
import ipaddress
from typing import Any

from nitrovault.transport.address import Address, TcpAddress, VsockAddress

__all__ = ["Refusal", "TlsRecordGuard", "TokenBucket", "source_of"]


class Refusal(enum.StrEnum):
    """Why a connection was refused at accept or closed by the TLS handshake guard."""

    CLOSING = "closing"
    MAX_CONNECTIONS = "max_connections"
    PER_SOURCE_CONNECTIONS = "per_source_connections"
    PER_SOURCE_RATE = "per_source_rate"
    NOT_TLS = "not_tls"
    MALFORMED_RECORD = "malformed_record"
    HANDSHAKE_TOO_LARGE = "handshake_too_large"
    HANDSHAKE_TIMEOUT = "handshake_timeout"



#: TLS content types a client may send (RFC 8446 §5.1; 24, heartbeat, is not accepted).
_CHANGE_CIPHER_SPEC, _ALERT, _HANDSHAKE, _APPLICATION_DATA = 20, 21, 22, 23
#: Largest record body: 2**14 + 2048 (TLS 1.2's TLSCiphertext, RFC 5246 §6.2.3; TLS 1.3 allows less).
_MAX_RECORD_BODY = (1 << 14) + 2048
_HEADER = 5


class TlsRecordGuard:
    """Checks the record headers of a TLS client's first flight; never looks at a record body.

    :meth:`feed` takes the client's bytes in order, in any chunking, and returns ``None`` (fine so far) or
    the :class:`Refusal` to close with. Once the first application_data record header has been seen,
    :attr:`done` is true and :meth:`feed` accepts everything without looking.

    >>> g = TlsRecordGuard(max_handshake_bytes=1024)
    >>> g.feed(b"\\x16\\x03\\x01\\x00\\x02hi"), g.done
    (None, False)
    >>> g.feed(b"\\x17\\x03\\x03\\x00\\x01x"), g.done
    (None, True)
    >>> TlsRecordGuard(1024).feed(b"GET / HTTP/1.1")
    <Refusal.NOT_TLS: 'not_tls'>
    """

    __slots__ = ("_first", "_header", "_max", "_seen", "_skip", "done")

    def __init__(self, max_handshake_bytes: int) -> None:
        self._max = max_handshake_bytes
        self._seen = 0  # record bytes (headers and declared bodies) before the first application_data
        self._header = bytearray()  # a record header split across chunks
        self._skip = 0  # body bytes of the current record still to pass unread
        self._first = True
        self.done = False

    def feed(self, data: bytes | bytearray | memoryview) -> Refusal | None:
        i, n = 0, len(data)
        while i < n and not self.done:
            if self._skip:
                step = min(self._skip, n - i)
                self._skip -= step
                i += step
                continue
            if self._first and not self._header and data[i] != _HANDSHAKE:
                return Refusal.NOT_TLS  # decided on the first byte: no need to wait for a whole header
            step = min(_HEADER - len(self._header), n - i)
            self._header += data[i : i + step]
            i += step
            if len(self._header) < _HEADER:
                return None
            verdict = self._record(bytes(self._header))
            self._header.clear()
            if verdict is not None:
                return verdict
        return None

    def _record(self, header: bytes) -> Refusal | None:
        kind, major, minor = header[0], header[1], header[2]
        length = int.from_bytes(header[3:5], "big")
        self._first = False
        if kind not in (_CHANGE_CIPHER_SPEC, _ALERT, _HANDSHAKE, _APPLICATION_DATA):
            return Refusal.MALFORMED_RECORD
        # legacy_record_version: 0x0301 (a first ClientHello may use it) to 0x0303 (RFC 8446 §5.1)
        if major != 3 or not 1 <= minor <= 3 or length > _MAX_RECORD_BODY:
            return Refusal.MALFORMED_RECORD
        if kind == _APPLICATION_DATA:
            self.done = True
            return None
        if length == 0:  # zero-length handshake, alert or change_cipher_spec records are forbidden
            return Refusal.MALFORMED_RECORD
        self._seen += _HEADER + length
        if self._seen > self._max:
            return Refusal.HANDSHAKE_TOO_LARGE
        self._skip = length
        return None


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` held; starts full. Time is passed in (``now``, seconds).

    >>> b = TokenBucket(rate=1.0, burst=2, now=0.0)
    >>> [b.take(0.0), b.take(0.0), b.take(0.0), b.take(1.0)]
    [True, True, False, True]
    """

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
            self._at = now

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def full(self, now: float) -> bool:
        self._refill(now)
        return self._tokens >= self.burst


def source_of(listen: Address, peer: Any) -> str:
    """The admission source of a peer: its IP (IPv6 by /64) on TCP, its CID on vsock, one for unix."""
    if isinstance(listen, TcpAddress) and isinstance(peer, tuple) and peer and isinstance(peer[0], str):
        try:
            ip = ipaddress.ip_address(peer[0].split("%", 1)[0])
        except ValueError:
            return peer[0]
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
        return str(ip)
    if isinstance(listen, VsockAddress) and isinstance(peer, tuple) and peer:
        return f"cid:{peer[0]}"
    return "local"
