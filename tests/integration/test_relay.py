"""The bounded relay over real sockets: unix, TCP from several loopback source addresses, the local vsock
map, and real TLS 1.3 sessions (Python's ssl and gRPC) through the handshake guard.

Deterministic: no test sleeps for a fixed time or asserts an elapsed time below a bound. Tests wait for
conditions (:func:`until`, reads), small configured timeouts only make things happen, and every wait is
bounded by :func:`run`'s overall timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from fakes import until

from nitrovault.errors import ConfigError
from nitrovault.local.vsock import LocalVsockMap
from nitrovault.transport import (
    Listener,
    Refusal,
    Relay,
    TcpAddress,
    TlsRecordGuard,
    TokenBucket,
    UnixAddress,
    VsockAddress,
    open_connection,
    source_of,
    start_server,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
MiB = 1024 * 1024


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
    """Run a test's ``main()``: the overall bound, longer than any one :func:`fakes.until` (which fails with
    what it awaited)."""
    return asyncio.run(asyncio.wait_for(coro, timeout))




# -- test peers ----------------------------------------------------------------------------------------


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    finally:
        w.close()


@contextlib.asynccontextmanager
async def serving(addr: Any, handler: Handler, mapping: Any = None) -> AsyncIterator[Listener]:
    if mapping is None:
        listener = await start_server(addr, handler)
    else:
        listener = await start_server(addr, handler, mapping)
    try:
        yield listener
    finally:
        await listener.close()


@contextlib.asynccontextmanager
async def relaying(listen: Any, target: Any, **kw: Any) -> AsyncIterator[Relay]:
    relay = Relay(listen, target, **kw)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.close()


async def read_all(r: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(r.read(), timeout)


async def eof_or_reset(r: asyncio.StreamReader, timeout: float) -> bool:
    """True when the peer closed (EOF or reset) within ``timeout``."""
    try:
        data = await asyncio.wait_for(r.read(), timeout)
    except ConnectionError:
        return True
    return data == b""


def close(w: asyncio.StreamWriter) -> None:
    w.transport.abort()


def record(kind: int, body: bytes, version: bytes = b"\x03\x03") -> bytes:
    """A TLS record: content type, legacy version, 2-byte length, body (the guard never reads a body)."""
    return bytes([kind]) + version + len(body).to_bytes(2, "big") + body


HELLO = record(22, b"\x01" + bytes(200), b"\x03\x01")  # a ClientHello-shaped handshake record
CCS = record(20, b"\x01")
APP = record(23, b"opaque ciphertext")


async def connect_from(relay: Relay, source_ip: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to the relay from ``source_ip`` (any 127.0.0.0/8 address on Linux loopback)."""
    bound = relay.bound
    assert isinstance(bound, TcpAddress)
    return await asyncio.open_connection(bound.host, bound.port, local_addr=(source_ip, 0))


async def served(r: asyncio.StreamReader, w: asyncio.StreamWriter, data: bytes = b"x") -> bool:
    """True when ``data`` comes back through an echo target (the connection is relayed)."""
    w.write(data)
    try:
        return await asyncio.wait_for(r.readexactly(len(data)), 10) == data
    except (asyncio.IncompleteReadError, ConnectionError):
        return False


class Recorder:
    """An echo target that keeps every byte it received, one buffer per connection."""

    def __init__(self) -> None:
        self.conns: list[bytearray] = []
        self.ended = 0

    async def __call__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got = bytearray()
        self.conns.append(got)
        try:
            while data := await r.read(65536):
                got += data
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            self.ended += 1
            w.close()


# -- basics ------------------------------------------------------------------------------------------


def test_echo_round_trip_and_socket_mode(d: Path) -> None:
    async def main() -> None:
        async with serving(UnixAddress(f"{d}/e.sock"), echo), relaying(
            UnixAddress(f"{d}/r.sock"), UnixAddress(f"{d}/e.sock")
        ) as relay:
            assert relay.bound == UnixAddress(f"{d}/r.sock")
            assert os.stat(f"{d}/r.sock").st_mode & 0o777 == 0o600
            r, w = await open_connection(relay.bound)
            w.write(b"hello relay")
            await w.drain()
            assert await asyncio.wait_for(r.readexactly(11), 5) == b"hello relay"
            w.write_eof()
            assert await read_all(r) == b""
            close(w)
            s = relay.stats
            assert (s.total, s.refused, s.failed, s.bytes_up, s.bytes_down) == (1, 0, 0, 11, 11)

    run(main())


def test_tcp_listen_round_trip(d: Path) -> None:
    async def main() -> None:
        async with serving(UnixAddress(f"{d}/e.sock"), echo), relaying(
            TcpAddress("127.0.0.1", 0), UnixAddress(f"{d}/e.sock")
        ) as relay:
            assert isinstance(relay.bound, TcpAddress) and relay.bound.port != 0
            r, w = await open_connection(relay.bound)
            w.write(b"ping")
            assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
            close(w)

    run(main())


def test_large_transfer_integrity_both_directions(d: Path) -> None:
    payload = os.urandom(64 * MiB)
    want = hashlib.sha256(payload).hexdigest().encode()

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        h = hashlib.sha256()
        while data := await r.read(1 << 20):
            h.update(data)
        w.write(h.hexdigest().encode())
        await w.drain()
        w.close()

    async def source(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        view = memoryview(payload)
        for i in range(0, len(payload), 1 << 20):
            w.write(view[i : i + (1 << 20)])
            await w.drain()
        w.close()

    async def main() -> None:
        async with serving(UnixAddress(f"{d}/s.sock"), sink), serving(
            UnixAddress(f"{d}/o.sock"), source
        ), relaying(UnixAddress(f"{d}/r1.sock"), UnixAddress(f"{d}/s.sock")) as up, relaying(
            UnixAddress(f"{d}/r2.sock"), UnixAddress(f"{d}/o.sock")
        ) as down:
            # client -> target
            r, w = await open_connection(up.bound)
            view = memoryview(payload)
            for i in range(0, len(payload), 1 << 20):
                w.write(view[i : i + (1 << 20)])
                await w.drain()
            w.write_eof()
            assert await read_all(r, 30) == want
            close(w)
            assert up.stats.bytes_up == len(payload)
            # target -> client
            r, w = await open_connection(down.bound)
            h = hashlib.sha256()
            while data := await asyncio.wait_for(r.read(1 << 20), 30):
                h.update(data)
            assert h.hexdigest().encode() == want
            close(w)

    run(main(), timeout=60)


def test_backpressure_bounds_memory_and_throttles_sender(d: Path) -> None:
    """A target that stops reading: the sender's drain blocks and the relay holds O(buffer_size)."""
    bufsize = 64 * 1024
    go = asyncio.Event
    received = hashlib.sha256()
    state: dict[str, Any] = {}

    async def stalled(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await state["go"].wait()
        while data := await r.read(1 << 20):
            received.update(data)
        w.close()

    async def main() -> None:
        state["go"] = go()
        async with serving(UnixAddress(f"{d}/t.sock"), stalled), relaying(
            UnixAddress(f"{d}/r.sock"), UnixAddress(f"{d}/t.sock"), buffer_size=bufsize
        ) as relay:
            r, w = await open_connection(relay.bound)
            chunk = os.urandom(bufsize)
            sent = hashlib.sha256()
            total = 0
            peak = 0
            blocked = False
            while total < 64 * MiB:
                w.write(chunk)
                try:
                    await asyncio.wait_for(w.drain(), 0.5)
                except TimeoutError:
                    blocked = True
                    sent.update(chunk)
                    total += len(chunk)
                    break
                sent.update(chunk)
                total += len(chunk)
                peak = max(peak, relay.buffered_bytes())
            peak = max(peak, relay.buffered_bytes())
            assert blocked, "the sender was never throttled"
            # kernel socket buffers on both sides plus the relay's own: far below what we tried to send
            assert total < 8 * MiB, total
            assert peak <= 4 * bufsize, peak
            assert relay.stats.bytes_up < 8 * MiB
            # once the receiver reads, everything arrives intact
            state["go"].set()
            await asyncio.wait_for(w.drain(), 10)
            w.write_eof()
            assert await read_all(r, 10) == b""
            assert received.hexdigest() == sent.hexdigest()
            close(w)

    run(main())


# -- half-close ---------------------------------------------------------------------------------------


def test_half_close_client_to_target(d: Path) -> None:
    """The client's EOF reaches the target, whose reply still flows back afterwards."""

    async def count_then_reply(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read()  # until the client's EOF
        w.write(b"got %d" % len(data))
        await w.drain()
        w.close()

    async def main() -> None:
        async with serving(UnixAddress(f"{d}/t.sock"), count_then_reply), relaying(
            UnixAddress(f"{d}/r.sock"), UnixAddress(f"{d}/t.sock")
        ) as relay:
            r, w = await open_connection(relay.bound)
            w.write(b"x" * 1000)
            w.write_eof()
            assert await read_all(r) == b"got 1000"
            close(w)

    run(main())


def test_half_close_target_to_client(d: Path) -> None:
    """The target's EOF reaches the client, and the client can still send to the target afterwards."""
    late: list[bytes] = []

    async def greet_then_listen(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"hello")
        await w.drain()
        w.write_eof()
        late.append(await r.read())  # until the client's EOF
        w.close()

    async def main() -> None:
        async with serving(UnixAddress(f"{d}/t.sock"), greet_then_listen), relaying(
            UnixAddress(f"{d}/r.sock"), UnixAddress(f"{d}/t.sock")
        ) as relay:
            r, w = await open_connection(relay.bound)
            assert await read_all(r) == b"hello"  # EOF seen by the client
            w.write(b"after your eof")
            await w.drain()
            w.write_eof()
            await until(lambda: bool(late), what="the data sent after the EOF")
            assert late == [b"after your eof"]
            close(w)

    run(main())


# -- timeouts, caps, failures ------------------------------------------------------------------------------


def test_idle_timeout_closes_both_sides(d: Path) -> None:
    target_saw_eof: list[bool] = []

    async def hold(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        target_saw_eof.append(await eof_or_reset(r, 5))
        w.close()

    async def main() -> None:
        async with serving(UnixAddress(f"{d}/t.sock"), hold), relaying(
            UnixAddress(f"{d}/r.sock"), UnixAddress(f"{d}/t.sock"), idle_timeout=0.3
        ) as relay:
            r, w = await open_connection(relay.bound)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            assert await eof_or_reset(r, 10)
            assert loop.time() - t0 >= 0.29  # not before the timeout (a lower bound only)
            close(w)
            await until(lambda: bool(target_saw_eof), what="the target to see the EOF")
            assert target_saw_eof == [True]
            assert relay.stats.idle_closed == 1

    run(main())


def test_activity_keeps_connection_open(d: Path) -> None:
    """Negative of the idle test: back-to-back traffic for three idle timeouts keeps the pair alive."""

    async def main() -> None:
        async with serving(UnixAddress(f"{d}/e.sock"), echo), relaying(
            UnixAddress(f"{d}/r.sock"), UnixAddress(f"{d}/e.sock"), idle_timeout=0.3
        ) as relay:
            r, w = await open_connection(relay.bound)
            loop = asyncio.get_running_loop()
            end = loop.time() + 0.9
            while loop.time() < end:  # each round trip is far shorter than the idle timeout
                w.write(b"k")
                assert await asyncio.wait_for(r.readexactly(1), 5) == b"k"
            assert relay.stats.idle_closed == 0
            close(w)

    run(main())


def test_connection_cap_refuses_extra(d: Path) -> None:
    async def main() -> None:
        async with serving(UnixAddress(f"{d}/e.sock"), echo), relaying(
            UnixAddress(f"{d}/r.sock"), UnixAddress(f"{d}/e.sock"), max_connections=1
        ) as relay:
            r1, w1 = await open_connection(relay.bound)
            w1.write(b"1")
            assert await asyncio.wait_for(r1.readexactly(1), 5) == b"1"
            r2, w2 = await open_connection(relay.bound)
            assert await eof_or_reset(r2, 2)
            assert relay.stats.refused == 1
            # the first connection is unaffected
            w1.write(b"2")
            assert await asyncio.wait_for(r1.readexactly(1), 5) == b"2"
            close(w1)
            close(w2)
            # a slot frees up once the first pair is gone
            await until(lambda: relay.stats.active == 0, what="no active pairs")
            r3, w3 = await open_connection(relay.bound)
            w3.write(b"3")
            assert await asyncio.wait_for(r3.readexactly(1), 5) == b"3"
            assert relay.stats.refused == 1 and relay.stats.total == 2
            assert relay.stats.refused_by_reason["max_connections"] == 1
            close(w3)

    run(main())


def test_target_down_closes_client_at_once(d: Path) -> None:
    """A refused target connect closes the client at once: long before the (60 s) connect timeout."""
    held = socket.socket()  # bound, never listening: connects to it are refused
    held.bind(("127.0.0.1", 0))
    dead_tcp = TcpAddress("127.0.0.1", held.getsockname()[1])

    async def main() -> None:
        for target in (UnixAddress(f"{d}/nobody.sock"), dead_tcp):
            async with relaying(
                TcpAddress("127.0.0.1", 0), target, connect_timeout=60, tls_handshake_timeout=60
            ) as relay:
                assert isinstance(relay.bound, TcpAddress)
                for _ in range(3):
                    r, w = await open_connection(relay.bound)
                    w.write(HELLO)
                    assert await eof_or_reset(r, 10)
                    close(w)
                assert relay.stats.failed == 3
                assert relay.stats.active == 0

    try:
        run(main())
    finally:
        held.close()


def test_clean_shutdown_closes_pairs_and_removes_socket(d: Path) -> None:
    async def main() -> None:
        async with serving(UnixAddress(f"{d}/e.sock"), echo):
            relay = Relay(UnixAddress(f"{d}/r.sock"), UnixAddress(f"{d}/e.sock"))
            await relay.start()
            conns = [await open_connection(relay.bound) for _ in range(3)]
            for r, w in conns:
                w.write(b"x")
                assert await asyncio.wait_for(r.readexactly(1), 5) == b"x"
            assert relay.stats.active == 3
            await asyncio.wait_for(relay.close(), 5)
            assert relay.stats.active == 0
            assert not os.path.exists(f"{d}/r.sock")
            for r, w in conns:
                assert await eof_or_reset(r, 2)
                close(w)
            with pytest.raises(OSError):
                await open_connection(UnixAddress(f"{d}/r.sock"))

    run(main())


# -- unix socket files ------------------------------------------------------------------------------------


def test_stale_socket_file_is_replaced(d: Path) -> None:
    path = f"{d}/r.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays; nobody listens
    assert os.path.exists(path)

    async def main() -> None:
        async with serving(UnixAddress(f"{d}/e.sock"), echo), relaying(
            UnixAddress(path), UnixAddress(f"{d}/e.sock")
        ) as relay:
            r, w = await open_connection(relay.bound)
            w.write(b"ok")
            assert await asyncio.wait_for(r.readexactly(2), 5) == b"ok"
            close(w)

    run(main())


def test_live_socket_is_not_stolen(d: Path) -> None:
    async def main() -> None:
        async with serving(UnixAddress(f"{d}/e.sock"), echo):
            relay = Relay(UnixAddress(f"{d}/e.sock"), UnixAddress(f"{d}/x.sock"))
            with pytest.raises(OSError) as info:
                await relay.start()
            assert info.value.errno == errno.EADDRINUSE
            # the live server still answers
            r, w = await open_connection(UnixAddress(f"{d}/e.sock"))
            w.write(b"a")
            assert await asyncio.wait_for(r.readexactly(1), 5) == b"a"
            close(w)

    run(main())


def test_regular_file_is_not_removed(d: Path) -> None:
    path = d / "r.sock"
    path.write_text("not a socket")

    async def main() -> None:
        with pytest.raises(ConfigError):
            await Relay(UnixAddress(str(path)), UnixAddress(f"{d}/x.sock")).start()

    run(main())
    assert path.read_text() == "not a socket"


@pytest.mark.parametrize(
    "kw",
    [
        {"max_connections": 0},
        {"idle_timeout": 0},
        {"connect_timeout": -1},
        {"buffer_size": 10},
        {"max_connections_per_source": 0},
        {"max_connections_per_source": True},
        {"connection_rate_per_source": 0.0},
        {"connection_rate_per_source": float("inf")},
        {"connection_burst_per_source": 5},  # a burst without a rate
        {"connection_rate_per_source": 1.0, "connection_burst_per_source": 0},
        {"tls_handshake_timeout": 0},
        {"tls_handshake_timeout": 1.0, "max_handshake_bytes": 100},
    ],
)
def test_bad_parameters_rejected(kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Relay(UnixAddress("/tmp/a"), UnixAddress("/tmp/b"), **kw)


# -- the local vsock map ------------------------------------------------------------------------------


def test_vsock_through_local_map(d: Path) -> None:
    """parent front (unix) -> relay -> "vsock" 16:5000 -> relay -> enclave server (unix), as in the design."""
    vmap = LocalVsockMap(d / "run")

    async def main() -> None:
        async with serving(UnixAddress(f"{d}/grpc.sock"), echo), relaying(
            VsockAddress(16, 5000), UnixAddress(f"{d}/grpc.sock"), mapping=vmap
        ) as enclave, relaying(
            UnixAddress(f"{d}/front.sock"), VsockAddress(16, 5000), mapping=vmap
        ) as parent:
            assert enclave.bound == UnixAddress(f"{d}/run/vsock/16_5000.sock")
            assert os.path.exists(f"{d}/run/vsock/16_5000.sock")
            r, w = await open_connection(parent.bound)
            w.write(b"through vsock")
            assert await asyncio.wait_for(r.readexactly(13), 5) == b"through vsock"
            close(w)
            # a vsock address can be dialled directly through the same map
            r, w = await open_connection(VsockAddress(16, 5000), vmap)
            w.write(b"direct")
            assert await asyncio.wait_for(r.readexactly(6), 5) == b"direct"
            close(w)
            assert enclave.stats.total == 2 and parent.stats.total == 1

    run(main())


# -- the python -m entry -------------------------------------------------------------------------------


def test_module_entry_relays_and_stops_on_sigterm(d: Path) -> None:
    vmap = LocalVsockMap(d / "run")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nitrovault.local.vsock", f"unix:{d}/front.sock", "vsock:16:5000",
         "--run-dir", str(d / "run"), "--idle-timeout", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded by pytest-timeout; the process prints at once
        assert line.strip() == f"listening on unix:{d}/front.sock"

        async def main() -> None:
            async with serving(VsockAddress(16, 5000), echo, vmap):
                r, w = await open_connection(UnixAddress(f"{d}/front.sock"))
                w.write(b"via -m")
                assert await asyncio.wait_for(r.readexactly(6), 5) == b"via -m"
                close(w)

        run(main())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not os.path.exists(f"{d}/front.sock")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_module_entry_rejects_bad_address() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "nitrovault.transport", "vsock:99999999999:1", "unix:/tmp/x.sock"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "vsock cid" in out.stderr


# -- gRPC through the relays (the design's request path, locally) ---------------------------------------


def test_grpc_info_through_parent_and_enclave_relays(d: Path) -> None:
    """client -> front.sock -> relay -> vsock(16:5000) -> relay -> grpc.sock (gRPC server), HTTP/2 intact."""
    from concurrent import futures

    import grpc

    from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2, inference_pb2_grpc

    class Servicer(inference_pb2_grpc.InferenceServicer):
        def Info(self, request: Any, context: Any) -> Any:
            return inference_pb2.InfoResponse(model_id="demo", sealed_digest="cd" * 32)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    inference_pb2_grpc.add_InferenceServicer_to_server(Servicer(), server)
    assert server.add_insecure_port(f"unix:{d}/grpc.sock") != 0
    server.start()
    vmap = LocalVsockMap(d / "run")

    async def main() -> None:
        async with relaying(VsockAddress(16, 5000), UnixAddress(f"{d}/grpc.sock"), mapping=vmap), relaying(
            UnixAddress(f"{d}/front.sock"), VsockAddress(16, 5000), mapping=vmap
        ) as front:
            async with grpc.aio.insecure_channel(f"unix:{d}/front.sock") as channel:
                stub = inference_pb2_grpc.InferenceStub(channel)
                for _ in range(3):  # several calls multiplexed on one relayed connection
                    info = await stub.Info(inference_pb2.InfoRequest(), timeout=10)
                    assert info.model_id == "demo" and info.sealed_digest == "cd" * 32
            assert front.stats.total >= 1 and front.stats.failed == 0

    try:
        run(main())
    finally:
        server.stop(grace=None).wait(5)


# -- per-source admission -----------------------------------------------------------------------------------


def test_per_source_cap_refuses_only_that_source(d: Path) -> None:
    async def main() -> None:
        async with serving(UnixAddress(f"{d}/e.sock"), echo), relaying(
            TcpAddress("127.0.0.1", 0), UnixAddress(f"{d}/e.sock"), max_connections_per_source=2
        ) as relay:
            a1, a2 = await connect_from(relay, "127.0.0.2"), await connect_from(relay, "127.0.0.2")
            assert await served(*a1) and await served(*a2)
            r, w = await connect_from(relay, "127.0.0.2")
            assert await eof_or_reset(r, 10)  # refused at once, not left hanging
            close(w)
            b1 = await connect_from(relay, "127.0.0.3")  # another source is still served
            assert await served(*b1)
            s = relay.stats
            assert (s.refused, s.refused_by_reason["per_source_connections"], s.total) == (1, 1, 3)
            assert await served(*a1)  # the admitted ones are unaffected
            close(a1[1])
            await until(lambda: relay.stats.active == 2, what="two active pairs")
            a3 = await connect_from(relay, "127.0.0.2")  # a freed slot is usable again
            assert await served(*a3)
            for _, w in (a2, b1, a3):
                close(w)

    run(main())


def test_unix_listener_is_one_source(d: Path) -> None:
    async def main() -> None:
        async with serving(UnixAddress(f"{d}/e.sock"), echo), relaying(
            UnixAddress(f"{d}/r.sock"), UnixAddress(f"{d}/e.sock"), max_connections_per_source=1
        ) as relay:
            first = await open_connection(relay.bound)
            assert await served(*first)
            r, w = await open_connection(relay.bound)
            assert await eof_or_reset(r, 10)
            assert relay.stats.refused_by_reason["per_source_connections"] == 1
            close(w)
            close(first[1])

    run(main())


def test_rate_limit_per_source(d: Path) -> None:
    """A burst of 2 and a rate that refills nothing during the test: the third connection is refused even
    though the first two are gone (a rate, not a cap), and another source has its own bucket."""

    async def main() -> None:
        async with serving(UnixAddress(f"{d}/e.sock"), echo), relaying(
            TcpAddress("127.0.0.1", 0),
            UnixAddress(f"{d}/e.sock"),
            connection_rate_per_source=0.001,
            connection_burst_per_source=2,
        ) as relay:
            for _ in range(2):
                r, w = await connect_from(relay, "127.0.0.2")
                assert await served(r, w)
                close(w)
            await until(lambda: relay.stats.active == 0, what="no active pairs")
            r, w = await connect_from(relay, "127.0.0.2")
            assert await eof_or_reset(r, 10)
            close(w)
            b = await connect_from(relay, "127.0.0.3")
            assert await served(*b)
            close(b[1])
            s = relay.stats
            assert s.refused_by_reason["per_source_rate"] == 1 and s.refused == 1 and s.total == 3

    run(main())


def test_flood_from_one_address_does_not_stop_another(d: Path) -> None:
    flood = 60

    async def main() -> None:
        async with serving(UnixAddress(f"{d}/e.sock"), echo), relaying(
            TcpAddress("127.0.0.1", 0),
            UnixAddress(f"{d}/e.sock"),
            max_connections=32,
            max_connections_per_source=4,
        ) as relay:
            attackers = await asyncio.gather(*(connect_from(relay, "127.0.0.2") for _ in range(flood)))
            victim = await connect_from(relay, "127.0.0.3")
            assert await served(*victim, b"still served")
            await until(lambda: relay.stats.total + relay.stats.refused == flood + 1,
                        what="every connection counted")
            s = relay.stats
            assert s.total == 4 + 1
            assert s.refused_by_reason["per_source_connections"] == flood - 4
            assert s.refused_by_reason["max_connections"] == 0
            outcomes = await asyncio.gather(*(served(r, w) for r, w in attackers))
            assert sum(outcomes) == 4  # exactly the admitted four are relayed, the rest were closed
            assert await served(*victim, b"and again")
            for _, w in (*attackers, victim):
                close(w)

    run(main())


def test_source_of() -> None:
    tcp, unix = TcpAddress("127.0.0.1", 1), UnixAddress("/tmp/x")
    assert source_of(tcp, ("192.0.2.7", 5555)) == "192.0.2.7"
    assert source_of(tcp, ("::ffff:192.0.2.7", 5555, 0, 0)) == "192.0.2.7"
    # one IPv6 host holds a /64: every address in it is one source
    assert source_of(tcp, ("2001:db8:1:2::1", 1, 0, 0)) == source_of(tcp, ("2001:db8:1:2:ffff::9", 1, 0, 0))
    assert source_of(tcp, ("2001:db8:1:2::1", 1, 0, 0)) != source_of(tcp, ("2001:db8:1:3::1", 1, 0, 0))
    assert source_of(unix, "") == source_of(unix, None) == "local"
    assert source_of(VsockAddress(3, 1), (16, 1234)) == "cid:16"


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(100.4) is False  # 0.8 token
    assert bucket.take(100.5) is True  # 1.0 token
    assert not bucket.full(101.0)
    assert bucket.full(102.0)  # capped at the burst, however long it waited
    assert [bucket.take(1000.0) for _ in range(4)] == [True, True, True, False]


# -- the TLS handshake guard -------------------------------------------------------------------------------


def test_guard_passes_handshake_records_then_only_splices(d: Path) -> None:
    rec = Recorder()
    after = b"after the first application_data record anything goes: \x00\xff GET / HTTP/1.1\r\n"

    async def main() -> None:
        async with serving(UnixAddress(f"{d}/t.sock"), rec), relaying(
            UnixAddress(f"{d}/r.sock"), UnixAddress(f"{d}/t.sock"), tls_handshake_timeout=30
        ) as relay:
            r, w = await open_connection(relay.bound)
            flight = HELLO + CCS + record(22, b"finished") + APP
            for i in (1, 3, 7, 120, len(flight)):  # headers split across reads
                w.write(flight[:i])
                flight = flight[i:]
                await w.drain()
            w.write(after)
            want = HELLO + CCS + record(22, b"finished") + APP + after
            assert await asyncio.wait_for(r.readexactly(len(want)), 10) == want
            assert rec.conns == [bytearray(want)]
            assert relay.stats.guard_closed == 0
            close(w)

    run(main())


def test_guard_does_not_read_target_to_client(d: Path) -> None:
    async def banner(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"not TLS at all")
        await w.drain()
        await echo(r, w)

    async def main() -> None:
        async with serving(UnixAddress(f"{d}/t.sock"), banner), relaying(
            UnixAddress(f"{d}/r.sock"), UnixAddress(f"{d}/t.sock"), tls_handshake_timeout=30
        ) as relay:
            r, w = await open_connection(relay.bound)
            assert await asyncio.wait_for(r.readexactly(14), 10) == b"not TLS at all"
            assert await served(r, w, HELLO)
            close(w)

    run(main())


def test_non_tls_first_byte_is_closed_before_reaching_the_target(
    d: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()

    async def main() -> None:
        async with serving(UnixAddress(f"{d}/t.sock"), rec), relaying(
            UnixAddress(f"{d}/r.sock"), UnixAddress(f"{d}/t.sock"), tls_handshake_timeout=30
        ) as relay:
            for request in (b"GET /secret-path HTTP/1.1\r\n\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"):
                r, w = await open_connection(relay.bound)
                w.write(request)
                assert await eof_or_reset(r, 10)
                close(w)
            await until(lambda: rec.ended == 2, what="two ended connections")
            assert rec.conns == [bytearray(), bytearray()]  # not one byte reached the target
            assert relay.stats.refused_by_reason["not_tls"] == 2 and relay.stats.guard_closed == 2
            assert relay.stats.bytes_up == 0

    with caplog.at_level("INFO", logger="nitrovault.transport.relay"):
        run(main())
    assert "not_tls" in caplog.text
    assert "secret" not in caplog.text and "HTTP" not in caplog.text  # no payload in the log


@pytest.mark.parametrize(
    ("flight", "why"),
    [
        (HELLO + record(24, b"heartbeat"), "unknown content type"),
        (record(22, b"hello", b"\x02\x00"), "SSL 2 record version"),
        (record(22, b"hello", b"\x03\x04"), "record version above 3.3"),
        (HELLO + record(22, b""), "empty handshake record"),
        (HELLO + bytes([22, 3, 3]) + (0x4801).to_bytes(2, "big"), "longer than TLS allows"),
    ],
)
def test_malformed_record_header_is_closed(d: Path, flight: bytes, why: str) -> None:
    rec = Recorder()

    async def main() -> None:
        async with serving(UnixAddress(f"{d}/t.sock"), rec), relaying(
            UnixAddress(f"{d}/r.sock"), UnixAddress(f"{d}/t.sock"), tls_handshake_timeout=30
        ) as relay:
            r, w = await open_connection(relay.bound)
            w.write(flight)
            assert await eof_or_reset(r, 10), why
            close(w)
            assert relay.stats.refused_by_reason["malformed_record"] == 1, why

    run(main())


def test_oversized_handshake_is_closed_on_the_header(d: Path) -> None:
    rec = Recorder()
    first = record(22, bytes(1000))  # 1005 bytes: within 1024

    async def main() -> None:
        async with serving(UnixAddress(f"{d}/t.sock"), rec), relaying(
            UnixAddress(f"{d}/r.sock"),
            UnixAddress(f"{d}/t.sock"),
            tls_handshake_timeout=30,
            max_handshake_bytes=1024,
        ) as relay:
            r, w = await open_connection(relay.bound)
            w.write(first)
            assert await asyncio.wait_for(r.readexactly(len(first)), 10) == first
            w.write(bytes([22, 3, 3, 0, 100]))  # the next header alone takes the total past 1024
            assert await eof_or_reset(r, 10)
            close(w)
            await until(lambda: rec.ended == 1, what="one ended connection")
            assert rec.conns == [bytearray(first)]  # the oversized record's header was never forwarded
            assert relay.stats.refused_by_reason["handshake_too_large"] == 1

    run(main())


def test_stalled_handshake_is_closed_while_another_client_is_served(d: Path) -> None:
    async def main() -> None:
        async with serving(UnixAddress(f"{d}/e.sock"), echo), relaying(
            UnixAddress(f"{d}/r.sock"), UnixAddress(f"{d}/e.sock"), tls_handshake_timeout=1.0
        ) as relay:
            good = await open_connection(relay.bound)
            assert await served(*good, HELLO + APP)  # past the guard: no handshake deadline any more
            stalled_r, stalled_w = await open_connection(relay.bound)
            assert await served(stalled_r, stalled_w, HELLO)  # a handshake that never finishes
            assert await eof_or_reset(stalled_r, 15)
            close(stalled_w)
            assert relay.stats.refused_by_reason["handshake_timeout"] == 1
            assert await served(*good, b"still here")  # the other client outlives the deadline
            assert relay.stats.refused_by_reason["handshake_timeout"] == 1
            close(good[1])

    run(main())


def test_guard_verdicts_in_any_chunking() -> None:
    flight = HELLO + CCS + APP + b"tail"
    for size in (1, 2, 5, 7, len(flight)):
        guard = TlsRecordGuard(max_handshake_bytes=1024)
        verdicts = [guard.feed(flight[i : i + size]) for i in range(0, len(flight), size)]
        assert verdicts == [None] * len(verdicts) and guard.done
    guard = TlsRecordGuard(1024)
    assert guard.feed(b"\x16\x03") is None and guard.feed(b"\x01") is None and not guard.done
    assert TlsRecordGuard(1024).feed(b"\x17\x03\x03\x00\x01x") is Refusal.NOT_TLS  # data before a hello
    assert TlsRecordGuard(1024).feed(record(22, bytes(1020))) is Refusal.HANDSHAKE_TOO_LARGE


# -- real TLS 1.3 sessions through the guard --------------------------------------------------------------

SERVER_NAME = "enclave.nitrovault.test"


def _self_signed(name: str) -> tuple[bytes, bytes]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class TlsEnd:
    """A TLS 1.3 endpoint over an asyncio stream through memory BIOs, so the raw records it sends and
    receives can be compared with the other end's."""

    def __init__(
        self, ctx: ssl.SSLContext, r: asyncio.StreamReader, w: asyncio.StreamWriter, *, server: bool
    ) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(
            self.incoming, self.outgoing, server_side=server, server_hostname=None if server else SERVER_NAME
        )
        self.r, self.w = r, w
        self.sent, self.received = bytearray(), bytearray()

    async def _flush(self) -> None:
        if data := self.outgoing.read():
            self.sent += data
            self.w.write(data)
            await self.w.drain()

    async def _op(self, op: Callable[[], Any]) -> Any:
        while True:
            try:
                result = op()
            except ssl.SSLWantReadError:
                await self._flush()
                data = await self.r.read(65536)
                if not data:
                    raise ConnectionError("EOF inside TLS") from None
                self.received += data
                self.incoming.write(data)
            else:
                await self._flush()
                return result

    async def handshake(self) -> None:
        await self._op(self.tls.do_handshake)

    async def send(self, data: bytes) -> None:
        self.tls.write(data)
        await self._flush()

    async def recv_exactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            out += await self._op(functools.partial(self.tls.read, n - len(out)))
        return bytes(out)


def _tls_contexts(d: Path) -> tuple[ssl.SSLContext, ssl.SSLContext, bytes, bytes]:
    cert, key = _self_signed(SERVER_NAME)
    (d / "cert.pem").write_bytes(cert)
    (d / "key.pem").write_bytes(key)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(d / "cert.pem", d / "key.pem")
    client = ssl.create_default_context(cadata=cert.decode())
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    return server, client, cert, key


def test_tls13_session_bytes_pass_unchanged(d: Path) -> None:
    server_ctx, client_ctx, _, _ = _tls_contexts(d)
    payload = os.urandom(300_000)
    ends: list[TlsEnd] = []

    async def tls_echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        end = TlsEnd(server_ctx, r, w, server=True)
        ends.append(end)
        await end.handshake()
        data = await end.recv_exactly(len(payload))
        await end.send(hashlib.sha256(data).digest() + data[::-1])
        await r.read()
        w.close()

    async def main() -> None:
        async with serving(UnixAddress(f"{d}/t.sock"), tls_echo), relaying(
            TcpAddress("127.0.0.1", 0), UnixAddress(f"{d}/t.sock"), tls_handshake_timeout=30
        ) as relay:
            assert isinstance(relay.bound, TcpAddress)
            r, w = await asyncio.open_connection(relay.bound.host, relay.bound.port)
            client = TlsEnd(client_ctx, r, w, server=False)
            await client.handshake()
            assert client.tls.version() == "TLSv1.3"
            await client.send(payload)
            reply = await client.recv_exactly(32 + len(payload))
            assert reply == hashlib.sha256(payload).digest() + payload[::-1]
            (server,) = ends
            # every record crossed the relay unchanged, in both directions
            assert bytes(server.received) == bytes(client.sent)
            assert bytes(client.received) == bytes(server.sent)
            s = relay.stats
            assert (s.bytes_up, s.bytes_down) == (len(client.sent), len(server.sent))
            assert s.guard_closed == 0
            close(w)

    run(main())


class _EchoHandlers(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpcio ships no type stubs
    """A stand-in enclave gRPC service on raw bytes: every cardinality."""

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        async def unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            md = dict(context.invocation_metadata() or ())
            context.set_trailing_metadata((("x-echo-back", str(md.get("x-echo", ""))),))
            return request[::-1]

        async def server_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
            for i in range(int(request)):
                yield b"chunk-%d" % i

        async def client_stream(requests: AsyncIterator[bytes], context: Any) -> bytes:
            return b"|".join([r async for r in requests])

        async def bidi(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
            async for r in requests:
                yield r.upper()

        table = {
            "/test.Echo/Unary": grpc.unary_unary_rpc_method_handler(unary),
            "/test.Echo/ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "/test.Echo/ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "/test.Echo/Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        }
        return table.get(details.method)


async def _grpc_tls_server(path: str, cert: bytes, key: bytes) -> grpc.aio.Server:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_EchoHandlers(),))
    assert server.add_secure_port(f"unix:{path}", grpc.ssl_server_credentials([(key, cert)])) != 0
    await server.start()
    return server


_OVERRIDE = (("grpc.ssl_target_name_override", SERVER_NAME),)


def test_grpc_tls_calls_through_the_relay(d: Path) -> None:
    """TLS ends at the (stand-in) enclave's gRPC server; the relay only carries its records."""
    _, _, cert, key = _tls_contexts(d)

    async def main() -> None:
        server = await _grpc_tls_server(f"{d}/grpc.sock", cert, key)
        try:
            async with relaying(
                TcpAddress("127.0.0.1", 0), UnixAddress(f"{d}/grpc.sock"), tls_handshake_timeout=30
            ) as relay:
                assert isinstance(relay.bound, TcpAddress)
                target = f"127.0.0.1:{relay.bound.port}"
                creds = grpc.ssl_channel_credentials(root_certificates=cert)
                async with grpc.aio.secure_channel(target, creds, options=_OVERRIDE) as ch:
                    call = ch.unary_unary("/test.Echo/Unary")(b"\x00abc\xff", metadata=(("x-echo", "p"),))
                    assert await call == b"\xffcba\x00"
                    assert ("x-echo-back", "p") in tuple(await call.trailing_metadata())
                    got = [m async for m in ch.unary_stream("/test.Echo/ServerStream")(b"3", timeout=10)]
                    assert got == [b"chunk-0", b"chunk-1", b"chunk-2"]

                    async def parts() -> AsyncIterator[bytes]:
                        for part in (b"a", b"b", b"c"):
                            yield part

                    assert await ch.stream_unary("/test.Echo/ClientStream")(parts(), timeout=10) == b"a|b|c"
                    bidi = ch.stream_stream("/test.Echo/Bidi")(timeout=10)
                    replies = []
                    for word in (b"one", b"two"):
                        await bidi.write(word)
                        replies.append(await bidi.read())
                    await bidi.done_writing()
                    assert replies == [b"ONE", b"TWO"]
                assert relay.stats.guard_closed == 0
                # a client that does not trust the enclave's certificate fails end to end
                other, _ = _self_signed(SERVER_NAME)
                bad = grpc.ssl_channel_credentials(root_certificates=other)
                async with grpc.aio.secure_channel(target, bad, options=_OVERRIDE) as ch:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await ch.unary_unary("/test.Echo/Unary")(b"x", timeout=5)
                    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
                # a plaintext HTTP/2 client never reaches the enclave: the guard closes it
                async with grpc.aio.insecure_channel(target) as ch:
                    with pytest.raises(grpc.aio.AioRpcError):
                        await ch.unary_unary("/test.Echo/Unary")(b"x", timeout=5)
                assert relay.stats.refused_by_reason["not_tls"] >= 1
        finally:
            await server.stop(None)

    run(main(), timeout=60)


def test_grpc_tls_enclave_down_fails_fast_and_recovers(d: Path) -> None:
    """While the target is down each connection is closed at once (UNAVAILABLE, well before the 30 s
    connect timeout and the call's deadline); once it is back calls succeed without restarting the relay."""
    _, _, cert, key = _tls_contexts(d)
    options = (*_OVERRIDE, ("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 200))

    async def call(ch: grpc.aio.Channel) -> bytes:
        result: bytes = await ch.unary_unary("/test.Echo/Unary")(b"abc", timeout=20)
        return result

    async def main() -> None:
        async with relaying(
            TcpAddress("127.0.0.1", 0),
            UnixAddress(f"{d}/grpc.sock"),
            connect_timeout=30,
            tls_handshake_timeout=30,
        ) as relay:
            assert isinstance(relay.bound, TcpAddress)
            creds = grpc.ssl_channel_credentials(root_certificates=cert)
            async with grpc.aio.secure_channel(f"127.0.0.1:{relay.bound.port}", creds, options=options) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(ch)
                assert err.value.code() is grpc.StatusCode.UNAVAILABLE
                assert relay.stats.failed >= 1
                server = await _grpc_tls_server(f"{d}/grpc.sock", cert, key)
                try:
                    while True:
                        try:
                            assert await call(ch) == b"cba"
                            break
                        except grpc.aio.AioRpcError as exc:
                            assert exc.code() is grpc.StatusCode.UNAVAILABLE
                finally:
                    await server.stop(None)

    run(main(), timeout=60)
