"""Address parsing, validation, round-tripping, and the address maps (pure)."""

from __future__ import annotations

import dataclasses
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nitrovault.errors import ConfigError
from nitrovault.local.vsock import LocalVsockMap
from nitrovault.transport import (
    DIRECT,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    parse_address,
)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("vsock:16:5000", VsockAddress(16, 5000)),
        ("vsock:3:8000", VsockAddress(3, 8000)),
        ("vsock:4294967295:4294967295", VsockAddress(0xFFFFFFFF, 0xFFFFFFFF)),
        ("unix:/tmp/x.sock", UnixAddress("/tmp/x.sock")),
        ("unix:rel/x.sock", UnixAddress("rel/x.sock")),
        ("unix:/tmp/a:b.sock", UnixAddress("/tmp/a:b.sock")),
        ("tcp:127.0.0.1:80", TcpAddress("127.0.0.1", 80)),
        ("tcp:localhost:0", TcpAddress("localhost", 0)),
        ("tcp:[::1]:443", TcpAddress("::1", 443)),
    ],
)
def test_parse_and_round_trip(spec: str, expected: object) -> None:
    parsed = parse_address(spec)
    assert parsed == expected
    assert str(parsed) == spec
    assert parse_address(str(parsed)) == parsed


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "16:5000",  # no scheme
        "http://x",  # unknown scheme
        "vsock:16",  # missing port
        "vsock:16:",  # empty port
        "vsock::5000",  # empty cid
        "vsock:-1:5000",  # negative
        "vsock:4294967296:5000",  # cid too large
        "vsock:16:4294967296",  # port too large
        "vsock:16:+5",  # not plain digits
        "vsock:16:5_000",
        "vsock:16:\uff15",  # non-ASCII digit
        "unix:",  # empty path
        "unix:/tmp/" + "x" * 120,  # longer than sun_path
        "unix:/tmp/a\x00b",
        "tcp:127.0.0.1",  # missing port
        "tcp:127.0.0.1:65536",  # port too large
        "tcp::80",  # empty host
        "tcp:::1:80",  # IPv6 without brackets
        "tcp:127.0.0.1:http",
    ],
)
def test_parse_rejects(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_address(spec)


def test_constructors_validate() -> None:
    with pytest.raises(ConfigError):
        VsockAddress(True, 5)  # bool is not a CID
    with pytest.raises(ConfigError):
        VsockAddress(16, -1)
    with pytest.raises(ConfigError):
        TcpAddress("h", 70000)
    with pytest.raises(ConfigError):
        UnixAddress("")


def test_addresses_are_frozen_values() -> None:
    a = VsockAddress(16, 5000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.port = 1  # type: ignore[misc]
    assert {a, VsockAddress(16, 5000)} == {a}


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
def test_vsock_round_trip_property(cid: int, port: int) -> None:
    a = VsockAddress(cid, port)
    assert parse_address(str(a)) == a


@given(st.integers(0, 0xFFFF))
def test_tcp_round_trip_property(port: int) -> None:
    for host in ("127.0.0.1", "::1", "example.internal"):
        a = TcpAddress(host, port)
        assert parse_address(str(a)) == a


def test_direct_map_is_identity() -> None:
    for a in (VsockAddress(16, 5000), UnixAddress("/tmp/x"), TcpAddress("127.0.0.1", 1)):
        assert DIRECT.resolve(a) is a


def test_local_vsock_map(tmp_path: os.PathLike[str]) -> None:
    run = os.path.join(str(tmp_path), "r")
    m = LocalVsockMap(run)
    assert m.resolve(VsockAddress(16, 5000)) == UnixAddress(os.path.join(run, "vsock", "16_5000.sock"))
    assert m.resolve(VsockAddress(3, 8000)) != m.resolve(VsockAddress(3, 8001))
    unix = UnixAddress("/tmp/other.sock")
    assert m.resolve(unix) is unix
    tcp = TcpAddress("127.0.0.1", 9)
    assert m.resolve(tcp) is tcp
    st_mode = os.stat(os.path.join(run, "vsock")).st_mode & 0o777
    assert st_mode == 0o700


def test_local_vsock_map_rejects_too_long_run_dir() -> None:
    with pytest.raises(ConfigError):
        LocalVsockMap("/tmp/" + "d" * 90, create=False)
