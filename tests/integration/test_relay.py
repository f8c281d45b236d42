"""The bounded relay over real unix sockets (and the local vsock map). Every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from nitrovault.errors import ConfigError
from nitrovault.local.vsock import LocalVsockMap
from nitrovault.transport import (
    Listener,
    Relay,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    open_connection,
    start_server,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
MiB = 1024 * 1024


def run(coro: Coroutine[Any, Any, Any], timeout: float = 20.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture
def d() -> Iterator[Path]:
    # tmp_path can exceed the 107-byte unix socket path limit; keep these short.
    path = tempfile.mkdtemp(dir="/tmp", prefix="nvr")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


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
            for _ in range(200):
                if late:
                    break
                await asyncio.sleep(0.01)
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
            assert await eof_or_reset(r, 3)
            assert 0.25 <= loop.time() - t0 < 2.5
            close(w)
            for _ in range(100):
                if target_saw_eof:
                    break
                await asyncio.sleep(0.02)
            assert target_saw_eof == [True]
            assert relay.stats.idle_closed == 1

    run(main())


def test_activity_keeps_connection_open(d: Path) -> None:
    """Negative of the idle test: traffic more often than the timeout keeps the pair alive."""

    async def main() -> None:
        async with serving(UnixAddress(f"{d}/e.sock"), echo), relaying(
            UnixAddress(f"{d}/r.sock"), UnixAddress(f"{d}/e.sock"), idle_timeout=0.8
        ) as relay:
            r, w = await open_connection(relay.bound)
            for _ in range(7):  # 7 x 0.25 s, about twice the idle timeout
                w.write(b"k")
                assert await asyncio.wait_for(r.readexactly(1), 2) == b"k"
                await asyncio.sleep(0.25)
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
            for _ in range(100):
                if relay.stats.active == 0:
                    break
                await asyncio.sleep(0.02)
            r3, w3 = await open_connection(relay.bound)
            w3.write(b"3")
            assert await asyncio.wait_for(r3.readexactly(1), 5) == b"3"
            assert relay.stats.refused == 1 and relay.stats.total == 2
            close(w3)

    run(main())


def test_target_down_closes_client_quickly(d: Path) -> None:
    async def main() -> None:
        async with relaying(UnixAddress(f"{d}/r.sock"), UnixAddress(f"{d}/nobody.sock")) as relay:
            r, w = await open_connection(relay.bound)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            assert await eof_or_reset(r, 2)
            assert loop.time() - t0 < 1.0
            assert relay.stats.failed == 1
            assert relay.stats.active == 0
            close(w)

    run(main())


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


def test_bad_parameters_rejected() -> None:
    a, b = UnixAddress("/tmp/a"), UnixAddress("/tmp/b")
    for kw in ({"max_connections": 0}, {"idle_timeout": 0}, {"connect_timeout": -1}, {"buffer_size": 10}):
        with pytest.raises(ConfigError):
            Relay(a, b, **kw)


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
