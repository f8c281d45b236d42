"""The relay's pure admission parts (``nitrovault.transport.admission``): record-header guard, token bucket,
sources. The relay's I/O around them is tested in ``tests/integration/test_relay.py``."""

from __future__ import annotations

import doctest
import itertools

from hypothesis import given
from hypothesis import strategies as st

from nitrovault.transport import TcpAddress, UnixAddress, VsockAddress, admission
from nitrovault.transport.admission import Refusal, TlsRecordGuard, source_of

HELLO = b"\x16\x03\x01\x00\x05hello"
APP = b"\x17\x03\x03\x00\x03abc"


def test_doctests() -> None:
    assert doctest.testmod(admission).failed == 0


def verdict(stream: bytes, cuts: list[int], limit: int = 1024) -> tuple[Refusal | None, bool]:
    guard = TlsRecordGuard(limit)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for a, b in itertools.pairwise(points):
        found = guard.feed(stream[a:b])
        if found is not None:
            return found, guard.done
    return None, guard.done


@given(st.lists(st.integers(min_value=0, max_value=64), max_size=12))
def test_the_verdict_does_not_depend_on_how_the_bytes_are_chunked(cuts: list[int]) -> None:
    assert verdict(HELLO + APP + b"anything at all", cuts) == (None, True)
    assert verdict(b"\x16\x03\x01\x04\x01" + b"x" * 1025, cuts)[0] == Refusal.HANDSHAKE_TOO_LARGE
    assert verdict(b"\x16\x03\x09\x00\x01x", cuts)[0] == Refusal.MALFORMED_RECORD
    assert verdict(HELLO + b"\x18\x03\x03\x00\x01x", cuts)[0] == Refusal.MALFORMED_RECORD  # heartbeat
    assert verdict(b"PRI * HTTP/2.0\r\n", cuts)[0] == Refusal.NOT_TLS


def test_sources() -> None:
    tcp = TcpAddress("127.0.0.1", 443)
    assert source_of(tcp, ("10.0.0.7", 5555)) == "10.0.0.7"
    assert source_of(tcp, ("::ffff:10.0.0.7", 5555, 0, 0)) == "10.0.0.7"
    assert source_of(tcp, ("2001:db8::1", 1, 0, 0)) == source_of(tcp, ("2001:db8::ffff", 2, 0, 0))
    assert source_of(VsockAddress(3, 8000), (16, 1234)) == "cid:16"
    assert source_of(UnixAddress("/x"), "") == "local"
