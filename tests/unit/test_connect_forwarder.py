"""The in-enclave CONNECT forwarder: its pure head parser, then the forwarder over loopback TCP with the
target behind the local vsock map (a unix socket), as in the enclave.

Deterministic: no fixed sleeps and no polling. Tests wait for answers or EOF (admission order is shown by a
503 to the next connection, since the listener accepts in order), a tiny
``head_timeout_s`` only makes the 408 happen, and every wait is bounded by :func:`run`'s timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from nitrovault.errors import ConfigError
from nitrovault.local.vsock import LocalVsockMap
from nitrovault.transport import (
    ConnectForwarder,
    Listener,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    start_server,
)
from nitrovault.transport.connect import HeadRefused, parse_connect_head
from nitrovault.transport.relay import Preface

KMS = "kms.us-east-1.amazonaws.com"
TARGET = VsockAddress(3, 8000)
ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"


def run(coro: Coroutine[Any, Any, Any], timeout: float = 20.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def connect_head(target: str = f"{KMS}:443", extra: str = "") -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{extra}\r\n".encode()


# -- the pure parser -------------------------------------------------------------------------------------


def test_parses_authority_form_and_lower_cases_the_host() -> None:
    assert parse_connect_head(b"CONNECT KMS.us-East-1.AmazonAWS.com:443 HTTP/1.1\r\nHost: x") == (KMS, 443)
    assert parse_connect_head(b"CONNECT [::1]:8443 HTTP/1.0") == ("::1", 8443)
    assert parse_connect_head(b"CONNECT 10.0.0.1:443 HTTP/1.1") == ("10.0.0.1", 443)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x", 405, id="get_origin_form"),
        pytest.param(f"GET https://{KMS}/ HTTP/1.1".encode(), 405, id="get_absolute_form"),
        pytest.param(f"POST {KMS}:443 HTTP/1.1".encode(), 405, id="post"),
        pytest.param(f"CONNECT https://{KMS}:443 HTTP/1.1".encode(), 400, id="connect_absolute_url"),
        pytest.param(f"CONNECT {KMS}:443/ HTTP/1.1".encode(), 400, id="connect_with_path"),
        pytest.param(f"CONNECT user:pw@{KMS}:443 HTTP/1.1".encode(), 400, id="userinfo"),
        pytest.param(f"CONNECT {KMS} HTTP/1.1".encode(), 400, id="no_port"),
        pytest.param(f"CONNECT {KMS}:0443 HTTP/1.1".encode(), 400, id="leading_zero_port"),
        pytest.param(f"CONNECT {KMS}:70000 HTTP/1.1".encode(), 400, id="port_out_of_range"),
        pytest.param(f"CONNECT {KMS}:+443 HTTP/1.1".encode(), 400, id="signed_port"),
        pytest.param(f"CONNECT {KMS}%2f:443 HTTP/1.1".encode(), 400, id="percent_escape"),
        pytest.param(b"CONNECT ::1:443 HTTP/1.1", 400, id="unbracketed_ipv6"),
        pytest.param(f"CONNECT {KMS}:443 HTTP/2.0".encode(), 400, id="http2_version"),
        pytest.param(f"CONNECT {KMS}:443".encode(), 400, id="no_version"),
        pytest.param(f"CONNECT  {KMS}:443 HTTP/1.1".encode(), 400, id="double_space"),
        pytest.param(f"connect {KMS}:443 HTTP/1.1".encode(), 400, id="lower_case_method"),
        pytest.param(f"CONNECT {KMS}:443 HTTP/1.1\r\nHost {KMS}".encode(), 400, id="header_without_colon"),
        pytest.param(f"CONNECT {KMS}:443 HTTP/1.1\r\nA: b\r\n  folded".encode(), 400, id="obs_fold"),
        pytest.param(f"CONNECT {KMS}:443 HTTP/1.1\nHost: x".encode(), 400, id="bare_lf"),
        pytest.param(f"CONNECT {KMS}:443 HTTP/1.1\r\nX: \x00".encode(), 400, id="nul_byte"),
        pytest.param("CONNECT k\u00e9ms.amazonaws.com:443 HTTP/1.1".encode(), 400, id="non_ascii_host"),
        pytest.param(b"\x16\x03\x01\x00\xc8\x01", 400, id="tls_instead_of_http"),
        pytest.param(b"", 400, id="empty"),
    ],
)
def test_refuses_anything_but_connect_authority_form(head: bytes, status: int) -> None:
    with pytest.raises(HeadRefused) as refused:
        parse_connect_head(head)
    assert refused.value.status == status


# -- the forwarder over sockets ------------------------------------------------------------------------


@pytest.fixture
def d() -> Iterator[Path]:
    """A short private folder (tmp_path can exceed the 107-byte unix socket path limit)."""
    path = tempfile.mkdtemp(dir="/tmp", prefix="nvcf")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


class Target:
    """The parent's vsock-proxy stand-in: keeps what it received, answers ``reply`` after the client's EOF."""

    def __init__(self, reply: bytes = b"") -> None:
        self.received: list[bytearray] = []
        self.reply = reply
        self.ended = asyncio.Event()

    async def __call__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got = bytearray()
        self.received.append(got)
        try:
            if self.reply:  # a half-close test: read to EOF first, then answer and close
                got += await r.read()
                w.write(self.reply)
                await w.drain()
            else:  # echo
                while data := await r.read(65536):
                    got += data
                    w.write(data)
                    await w.drain()
        finally:
            w.close()
            self.ended.set()


@contextlib.asynccontextmanager
async def stack(d: Path, target: Target | None = None, **kw: Any) -> AsyncIterator[ConnectForwarder]:
    mapping = LocalVsockMap(d)
    listener: Listener | None = None
    if target is not None:
        listener = await start_server(TARGET, target, mapping)
    kw.setdefault("allowed", [(KMS, 443)])
    forwarder = ConnectForwarder(TcpAddress("127.0.0.1", 0), TARGET, mapping=mapping, **kw)
    await forwarder.start()
    try:
        yield forwarder
    finally:
        await forwarder.close()
        if listener is not None:
            await listener.close()


async def dial(forwarder: ConnectForwarder) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", forwarder.port)


async def answer(forwarder: ConnectForwarder, data: bytes) -> bytes:
    """Send ``data`` and return everything the forwarder answers until it closes."""
    r, w = await dial(forwarder)
    w.write(data)
    try:
        return await r.read()
    finally:
        w.close()


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response
    assert response.endswith(b"\r\n\r\n"), response  # a complete head, no body
    return int(response[9:12])


def test_tunnels_an_allowed_connect_both_ways(d: Path) -> None:
    async def main() -> None:
        target = Target()
        async with stack(d, target) as fwd:
            r, w = await dial(fwd)
            w.write(connect_head())
            assert await r.readexactly(len(ESTABLISHED)) == ESTABLISHED
            for chunk in (b"\x16\x03\x01hello", bytes(range(256)) * 512):
                w.write(chunk)
                assert await r.readexactly(len(chunk)) == chunk
            w.close()
            await target.ended.wait()
            assert bytes(target.received[0]) == b"\x16\x03\x01hello" + bytes(range(256)) * 512
            assert fwd.stats.tunnels == 1
            assert fwd.stats.bytes_up == fwd.stats.bytes_down == 5 + 3 + 256 * 512

    run(main())


def test_bytes_pipelined_after_the_head_are_forwarded_first(d: Path) -> None:
    async def main() -> None:
        target = Target()
        async with stack(d, target) as fwd:
            handed: list[bytes] = []
            adopt = fwd._relay.adopt

            def spy(transport: asyncio.Transport, preface: Preface) -> None:
                handed.append(preface.early)
                adopt(transport, preface)

            setattr(fwd._relay, "adopt", spy)  # noqa: B010 (mypy: a bound method is not assignable)
            r, w = await dial(fwd)
            hello = b"\x16\x03\x01\x00\x05CHELO"
            w.write(connect_head() + hello)  # one small write on loopback: one read holds both
            assert await r.readexactly(len(ESTABLISHED)) == ESTABLISHED
            assert await r.readexactly(len(hello)) == hello  # echoed by the target: it got them
            w.write(b"more")
            assert await r.readexactly(4) == b"more"
            assert bytes(target.received[0]) == hello + b"more"
            assert handed == [hello]  # read with the head, and handed to the splice as early bytes
            w.close()

    run(main())


def test_half_close_reaches_the_target_and_its_answer_still_comes_back(d: Path) -> None:
    async def main() -> None:
        target = Target(reply=b"after your EOF")
        async with stack(d, target) as fwd:
            r, w = await dial(fwd)
            w.write(connect_head() + b"request")
            assert await r.readexactly(len(ESTABLISHED)) == ESTABLISHED
            w.write_eof()  # the target's read() returns only on this EOF
            assert await r.read() == b"after your EOF"  # ... and then the target's EOF
            assert bytes(target.received[0]) == b"request"
            w.close()

    run(main())


@pytest.mark.parametrize(
    "target",
    [
        pytest.param(f"{KMS}:444", id="wrong_port"),
        pytest.param("kms.eu-west-1.amazonaws.com:443", id="other_region"),
        pytest.param(f"{KMS}.:443", id="trailing_dot"),
        pytest.param(f"x.{KMS}:443", id="subdomain"),
        pytest.param("169.254.169.254:80", id="imds_ip_literal"),
        pytest.param("[::1]:443", id="ipv6_literal"),
    ],
)
def test_a_host_or_port_not_allowed_gets_403(d: Path, target: str) -> None:
    async def main() -> None:
        upstream = Target()
        async with stack(d, upstream) as fwd:
            assert status_of(await answer(fwd, connect_head(target))) == 403
            assert fwd.stats.refused_by_status[403] == 1
            assert fwd.stats.tunnels == 0
        assert upstream.received == []  # the target was never dialled

    run(main())


def test_host_match_is_case_insensitive_and_ip_literals_work_only_when_listed(d: Path) -> None:
    async def main() -> None:
        async with stack(d, Target(), allowed=[(KMS.upper(), 443), ("10.0.0.1", 443)]) as fwd:
            for target in (f"{KMS.upper()}:443", f"{KMS}:443", "10.0.0.1:443"):
                r, w = await dial(fwd)
                w.write(connect_head(target))
                assert await r.readexactly(len(ESTABLISHED)) == ESTABLISHED
                w.close()

    run(main())


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 405, id="get"),
        pytest.param(f"CONNECT https://{KMS}:443 HTTP/1.1\r\n\r\n".encode(), 400, id="absolute_url"),
        pytest.param(f"CONNECT a@{KMS}:443 HTTP/1.1\r\n\r\n".encode(), 400, id="userinfo"),
        pytest.param(b"\x16\x03\x01\x00\x10 not http\r\n\r\n", 400, id="garbage"),
    ],
)
def test_malformed_or_other_methods_are_answered_and_closed(
    d: Path, request_bytes: bytes, status: int
) -> None:
    async def main() -> None:
        async with stack(d, Target()) as fwd:
            response = await answer(fwd, request_bytes)
            assert status_of(response) == status
            if status == 405:
                assert b"\r\nAllow: CONNECT\r\n" in response

    run(main())


def test_an_oversized_head_gets_431(d: Path) -> None:
    async def main() -> None:
        async with stack(d, Target(), max_head_bytes=1024) as fwd:
            # no end in sight: refused as soon as more than max_head_bytes arrived
            assert status_of(await answer(fwd, connect_head()[:-2] + b"X-Pad: " + b"a" * 2000)) == 431
            # complete, but the head itself is too long (its end arrives in the same read)
            assert status_of(await answer(fwd, connect_head(extra="X-Pad: " + "a" * 1100 + "\r\n"))) == 431
            # exactly at the limit is fine
            head = connect_head()
            exact = connect_head(extra="X-Pad: " + "a" * (1024 - len(head) - 9) + "\r\n")
            assert len(exact) == 1024
            r, w = await dial(fwd)
            w.write(exact)
            assert await r.readexactly(len(ESTABLISHED)) == ESTABLISHED
            w.close()
            assert fwd.stats.refused_by_status[431] == 2

    run(main())


def test_a_head_that_does_not_complete_in_time_gets_408(d: Path) -> None:
    async def main() -> None:
        async with stack(d, Target(), head_timeout_s=0.05) as fwd:
            r, w = await dial(fwd)
            w.write(connect_head()[:20])  # a slow client: part of the line, then nothing
            assert status_of(await r.read()) == 408  # bounded by run()'s timeout, not by a sleep
            w.close()
            assert fwd.stats.refused_by_status[408] == 1
            assert fwd.stats.active == 0

    run(main())


def test_an_unreachable_target_gets_502_and_no_200(d: Path) -> None:
    async def main() -> None:
        async with stack(d, None) as fwd:  # nothing listens at the target's socket
            response = await answer(fwd, connect_head() + b"\x16\x03\x01hello")
            assert status_of(response) == 502
            assert b" 200 " not in response
            assert fwd.stats.refused_by_status[502] == 1

    run(main())


def test_connections_past_max_connections_get_503(d: Path) -> None:
    async def main() -> None:
        async with stack(d, Target(), max_connections=1) as fwd:
            r1, w1 = await dial(fwd)  # holds the only slot while it sends no head
            # the listener accepts in connection order, so the first holds the slot when the second comes
            assert status_of(await answer(fwd, connect_head())) == 503
            assert fwd.stats.active == 1
            w1.write(connect_head())  # the first one is still served
            assert await r1.readexactly(len(ESTABLISHED)) == ESTABLISHED
            w1.close()

    run(main())


def test_a_client_that_leaves_before_its_head_ends_gets_nothing(d: Path) -> None:
    async def main() -> None:
        async with stack(d, Target()) as fwd:
            r, w = await dial(fwd)
            w.write(b"CONNECT kms")
            w.write_eof()
            assert await r.read() == b""  # the forwarder left the head phase before it closed
            w.close()
            assert fwd.stats.active == 0
            assert sum(fwd.stats.refused_by_status.values()) == 0

    run(main())


def test_close_ends_heads_and_tunnels(d: Path) -> None:
    async def main() -> None:
        target = Target()
        async with stack(d, target, max_connections=2) as fwd:
            r1, w1 = await dial(fwd)
            w1.write(connect_head())
            assert await r1.readexactly(len(ESTABLISHED)) == ESTABLISHED
            r2, w2 = await dial(fwd)
            # a third is refused only once the second is in its head phase (accepts come in order)
            assert status_of(await answer(fwd, connect_head())) == 503
            assert fwd.stats.active == 2
            await fwd.close()
            for r in (r1, r2):
                with contextlib.suppress(ConnectionError):
                    assert await r.read() == b""
            await target.ended.wait()
            assert fwd.stats.active == 0
            for w in (w1, w2):
                w.close()

    run(main())


def test_refusals_are_logged_without_request_bytes(d: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with stack(d, Target()) as fwd:
            await answer(fwd, b"GET /secret-path HTTP/1.1\r\nAuthorization: Bearer tok3n\r\n\r\n")
            await answer(fwd, connect_head("evil.example:443", "Proxy-Authorization: Basic c2VjcmV0\r\n"))
            await answer(fwd, b"CONNECT user:hunter2@evil.example:443 HTTP/1.1\r\n\r\n")

    with caplog.at_level(logging.WARNING, logger="nitrovault.transport.connect"):
        run(main())
    text = caplog.text
    assert "405" in text and "GET" in text
    assert "403" in text and "evil.example:443" in text
    assert "400" in text
    for secret in ("secret-path", "tok3n", "c2VjcmV0", "hunter2", "Authorization"):
        assert secret not in text


@pytest.mark.parametrize(
    "kw",
    [
        {"allowed": []},
        {"allowed": [(KMS, 0)]},
        {"allowed": [(KMS, "443")]},
        {"allowed": [("kms/evil", 443)]},
        {"allowed": [("", 443)]},
        {"allowed": [KMS]},
        {"max_head_bytes": 10},
        {"head_timeout_s": 0},
        {"max_connections": 0},
    ],
)
def test_bad_configuration_is_refused(kw: dict[str, Any]) -> None:
    kw.setdefault("allowed", [(KMS, 443)])
    with pytest.raises(ConfigError):
        ConnectForwarder(
            TcpAddress("127.0.0.1", 0), TARGET, mapping=LocalVsockMap("/tmp/nv-unused", create=False), **kw
        )


def test_listens_on_tcp_only() -> None:
    with pytest.raises(ConfigError):
        ConnectForwarder(
            UnixAddress("/tmp/nv.sock"),  # type: ignore[arg-type]
            TARGET,
            allowed=[(KMS, 443)],
            mapping=LocalVsockMap("/tmp/nv-unused", create=False),
        )
