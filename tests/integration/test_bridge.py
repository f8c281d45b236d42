"""The parent's gRPC bridge against a tiny real "enclave" gRPC server, over unix sockets.

The stand-in enclave uses generic handlers on raw bytes, so nothing here depends on a .proto either.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nitrovault.errors import ConfigError
from parent_app.bridge import Bridge, TlsConfig, bridge_from_args, forwardable_metadata

SC = grpc.StatusCode


def run_async(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 30))

    return wrapper


# -- the stand-in enclave ---------------------------------------------------------------------------------


@dataclass
class Observed:
    metadata: list[dict[str, Any]] = field(default_factory=list)
    slow_time_remaining: float | None = None
    slow_cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)


class EnclaveHandlers(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, obs: Observed) -> None:
        self.obs = obs

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        table = {
            "/test.Echo/Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "/test.Echo/ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
            "/test.Echo/ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
            "/test.Echo/Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            "/test.Echo/Slow": grpc.unary_unary_rpc_method_handler(self.slow),
            "/test.Echo/Hold": grpc.unary_unary_rpc_method_handler(self.hold),
            "/test.Echo/Denied": grpc.unary_unary_rpc_method_handler(self.denied),
            "/test.Echo/Big": grpc.unary_unary_rpc_method_handler(self.big),
        }
        return table.get(details.method)

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        md = dict(context.invocation_metadata() or ())
        self.obs.metadata.append(md)
        await context.send_initial_metadata((("x-initial", "hello"),))
        echoed = md.get("x-echo", "")
        context.set_trailing_metadata((("x-echo-back", echoed), ("x-bin-back-bin", md.get("x-bin-bin", b""))))
        return request[::-1]

    async def server_stream(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield b"chunk-%d" % i

    async def client_stream(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        return b"|".join([r async for r in requests])

    async def bidi(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for r in requests:
            yield r.upper()

    async def slow(self, request: bytes, context: Any) -> bytes:
        self.obs.slow_time_remaining = context.time_remaining()
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            self.obs.slow_cancelled.set()
            raise
        return b"too late"

    async def hold(self, request: bytes, context: Any) -> bytes:
        self.obs.held += 1
        try:
            await self.obs.release.wait()
        finally:
            self.obs.held -= 1
        return b"released"

    async def denied(self, request: bytes, context: Any) -> bytes:
        await context.abort(SC.PERMISSION_DENIED, "token lacks scope model:invoke", (("x-reason", "scope"),))
        raise AssertionError("unreachable")

    async def big(self, request: bytes, context: Any) -> bytes:
        return b"x" * int(request)


async def start_enclave(path: Path, obs: Observed) -> grpc.aio.Server:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((EnclaveHandlers(obs),))
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    return server


@dataclass
class Stack:
    bridge: Bridge
    enclave: grpc.aio.Server | None
    obs: Observed
    enclave_sock: Path
    target: str

    def channel(self, **kw: Any) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.target, **kw)

    async def close(self) -> None:
        await self.bridge.stop(None)
        if self.enclave is not None:
            await self.enclave.stop(None)


#: The unary test methods; every test runs twice: once on the generic stream path, once on the unary path.
UNARY_TEST_METHODS = frozenset(
    f"/test.Echo/{name}" for name in ("Unary", "Slow", "Hold", "Denied", "Big")
)
_unary_methods: frozenset[str] = frozenset()


@pytest.fixture(autouse=True, params=["stream-path", "unary-path"])
def forwarding_path(request: pytest.FixtureRequest) -> Iterator[str]:
    global _unary_methods
    _unary_methods = UNARY_TEST_METHODS if request.param == "unary-path" else frozenset()
    yield request.param
    _unary_methods = frozenset()


async def make_stack(tmp_path: Path, *, enclave_up: bool = True, **bridge_kw: Any) -> Stack:
    bridge_kw.setdefault("unary_methods", _unary_methods)
    obs = Observed()
    sock = tmp_path / "enclave.sock"
    enclave = await start_enclave(sock, obs) if enclave_up else None
    public = tmp_path / "public.sock"
    bridge = Bridge(f"unix:{public}", f"unix:{sock}", **bridge_kw)
    await bridge.start()
    return Stack(bridge, enclave, obs, sock, f"unix:{public}")


def unary(ch: grpc.aio.Channel, method: str = "/test.Echo/Unary") -> Any:
    return ch.unary_unary(method)


# -- pass-through -----------------------------------------------------------------------------------------


@run_async
async def test_bytes_and_metadata_pass_through_both_ways(tmp_path: Path) -> None:
    stack = await make_stack(tmp_path)
    try:
        async with stack.channel() as ch:
            call = unary(ch)(
                b"\x00abc\xff", metadata=(("x-echo", "ping"), ("x-bin-bin", b"\x01\x02")), timeout=5
            )
            assert await call == b"\xffcba\x00"
            initial = await call.initial_metadata()
            trailing = await call.trailing_metadata()
            assert await call.code() is SC.OK
        assert ("x-initial", "hello") in tuple(initial)
        assert ("x-echo-back", "ping") in tuple(trailing)
        assert ("x-bin-back-bin", b"\x01\x02") in tuple(trailing)
        seen = stack.obs.metadata[0]
        assert seen["x-echo"] == "ping"
        assert seen["x-bin-bin"] == b"\x01\x02"
        assert "grpc-timeout" not in seen
    finally:
        await stack.close()


@run_async
async def test_all_four_cardinalities(tmp_path: Path) -> None:
    stack = await make_stack(tmp_path)
    try:
        async with stack.channel() as ch:
            got = [m async for m in ch.unary_stream("/test.Echo/ServerStream")(b"3", timeout=5)]
            assert got == [b"chunk-0", b"chunk-1", b"chunk-2"]

            async def reqs() -> AsyncIterator[bytes]:
                for part in (b"a", b"b", b"c"):
                    yield part

            assert await ch.stream_unary("/test.Echo/ClientStream")(reqs(), timeout=5) == b"a|b|c"
            bidi = ch.stream_stream("/test.Echo/Bidi")(timeout=5)
            replies = []
            for word in (b"one", b"two"):
                await bidi.write(word)
                replies.append(await bidi.read())  # lock-step: each reply arrives before the next write
            await bidi.done_writing()
            assert await bidi.read() is grpc.aio.EOF
            assert replies == [b"ONE", b"TWO"]
    finally:
        await stack.close()


@run_async
async def test_status_code_details_and_trailers_pass_through(tmp_path: Path) -> None:
    stack = await make_stack(tmp_path)
    try:
        async with stack.channel() as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(ch, "/test.Echo/Denied")(b"", timeout=5)
            assert err.value.code() is SC.PERMISSION_DENIED
            assert err.value.details() == "token lacks scope model:invoke"
            assert ("x-reason", "scope") in tuple(err.value.trailing_metadata())
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(ch, "/no.Such/Method")(b"", timeout=5)
            assert err.value.code() is SC.UNIMPLEMENTED
    finally:
        await stack.close()


def test_forwardable_metadata_drops_reserved_and_hop_by_hop_keys() -> None:
    md = (
        (":authority", "x"),
        ("grpc-timeout", "1S"),
        ("grpc-accept-encoding", "gzip"),
        ("user-agent", "evil"),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
        ("authorization", "Bearer t"),
        ("X-Request-Id", "42"),
        ("x-trace-bin", b"\x00"),
    )
    assert forwardable_metadata(md) == (
        ("authorization", "Bearer t"),
        ("x-request-id", "42"),
        ("x-trace-bin", b"\x00"),
    )
    assert forwardable_metadata(None) == ()


# -- deadlines and availability ---------------------------------------------------------------------------


@run_async
async def test_deadline_propagates_upstream(tmp_path: Path) -> None:
    stack = await make_stack(tmp_path)
    try:
        async with stack.channel() as ch:
            await unary(ch)(b"warm", timeout=5)  # connect both hops first
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(ch, "/test.Echo/Slow")(b"", timeout=0.2)
            elapsed = time.monotonic() - t0
        assert err.value.code() is SC.DEADLINE_EXCEEDED
        assert elapsed < 0.6
        assert stack.obs.slow_time_remaining is not None
        # the client's 200 ms reached the enclave (without propagation it would be None); gRPC rounds the
        # grpc-timeout header up to whole units, hence the few milliseconds of slack
        assert 0 < stack.obs.slow_time_remaining <= 0.2 + 0.01
        await asyncio.wait_for(stack.obs.slow_cancelled.wait(), 1)
    finally:
        await stack.close()


@run_async
async def test_client_cancel_cancels_the_upstream_call(tmp_path: Path) -> None:
    stack = await make_stack(tmp_path)
    try:
        async with stack.channel() as ch:
            call = unary(ch, "/test.Echo/Hold")(b"", timeout=10)
            async with asyncio.timeout(5):
                while stack.obs.held < 1:
                    await asyncio.sleep(0.01)
            call.cancel()
            async with asyncio.timeout(2):
                while stack.obs.held > 0 or stack.bridge.in_flight > 0:
                    await asyncio.sleep(0.01)
    finally:
        await stack.close()


@run_async
async def test_enclave_down_is_unavailable_fast_and_recovers(tmp_path: Path) -> None:
    stack = await make_stack(tmp_path, enclave_up=False)
    try:
        async with stack.channel() as ch:
            for _ in range(2):
                t0 = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await unary(ch)(b"x", timeout=5)
                assert err.value.code() is SC.UNAVAILABLE
                assert time.monotonic() - t0 < 1.0

            stack.enclave = await start_enclave(stack.enclave_sock, stack.obs)
            assert await _eventually_ok(ch) == b"x"

            # down again after having been connected: fast UNAVAILABLE again, then recovery again
            await stack.enclave.stop(None)
            stack.enclave = None
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(ch)(b"x", timeout=5)
            assert err.value.code() is SC.UNAVAILABLE
            assert time.monotonic() - t0 < 1.0
            stack.enclave = await start_enclave(stack.enclave_sock, stack.obs)
            assert await _eventually_ok(ch) == b"x"
    finally:
        await stack.close()


async def _eventually_ok(ch: grpc.aio.Channel, within: float = 5.0) -> bytes:
    deadline = time.monotonic() + within
    while True:
        try:
            result: bytes = await unary(ch)(b"x", timeout=2)
            return result
        except grpc.aio.AioRpcError as err:
            assert err.code() is SC.UNAVAILABLE
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


# -- limits -----------------------------------------------------------------------------------------------


@run_async
async def test_in_flight_cap_answers_resource_exhausted_at_once(tmp_path: Path) -> None:
    stack = await make_stack(tmp_path, max_concurrent_calls=2)
    try:
        async with stack.channel() as ch:
            held = [asyncio.ensure_future(unary(ch, "/test.Echo/Hold")(b"", timeout=10)) for _ in range(2)]
            async with asyncio.timeout(5):
                while stack.obs.held < 2:
                    await asyncio.sleep(0.01)
            assert stack.bridge.in_flight == 2
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(ch)(b"x", timeout=5)
            assert err.value.code() is SC.RESOURCE_EXHAUSTED
            assert time.monotonic() - t0 < 0.5
            stack.obs.release.set()
            assert await asyncio.gather(*held) == [b"released", b"released"]
            assert await unary(ch)(b"x", timeout=5) == b"x"
            assert stack.bridge.in_flight == 0
    finally:
        await stack.close()


@run_async
async def test_oversized_messages_are_resource_exhausted(tmp_path: Path) -> None:
    stack = await make_stack(tmp_path, max_message_bytes=1024)
    try:
        async with stack.channel() as ch:
            assert await unary(ch)(b"a" * 1000, timeout=5) == b"a" * 1000
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(ch)(b"a" * 2048, timeout=5)
            assert err.value.code() is SC.RESOURCE_EXHAUSTED
            assert stack.obs.metadata == [stack.obs.metadata[0]]  # the big request never reached the enclave
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(ch, "/test.Echo/Big")(b"4096", timeout=5)  # oversized answer
            assert err.value.code() is SC.RESOURCE_EXHAUSTED
    finally:
        await stack.close()


@run_async
async def test_many_concurrent_clients(tmp_path: Path) -> None:
    stack = await make_stack(tmp_path)
    try:
        channels = [stack.channel() for _ in range(32)]

        async def client(i: int, ch: grpc.aio.Channel) -> list[bytes]:
            out = []
            for j in range(5):
                out.append(await unary(ch)(b"%d-%d" % (i, j), timeout=5))
            return out

        t0 = time.monotonic()
        results = await asyncio.gather(*(client(i, ch) for i, ch in enumerate(channels)))
        assert time.monotonic() - t0 < 10
        assert results == [[(b"%d-%d" % (i, j))[::-1] for j in range(5)] for i in range(32)]
        await asyncio.gather(*(ch.close() for ch in channels))
    finally:
        await stack.close()


# -- TLS --------------------------------------------------------------------------------------------------


def _self_signed(name: str) -> tuple[bytes, bytes]:
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


@run_async
async def test_tls_listener(tmp_path: Path) -> None:
    cert, key = _self_signed("bridge.nitrovault.test")
    obs = Observed()
    sock = tmp_path / "enclave.sock"
    enclave = await start_enclave(sock, obs)
    bridge = Bridge("127.0.0.1:0", f"unix:{sock}", tls=TlsConfig(cert, key), unary_methods=_unary_methods)
    port = await bridge.start()
    assert port > 0
    override = (("grpc.ssl_target_name_override", "bridge.nitrovault.test"),)
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert)
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=override) as ch:
            assert await unary(ch)(b"tls", timeout=5) == b"slt"
        # a client that does not trust this certificate cannot talk to the bridge
        other, _ = _self_signed("bridge.nitrovault.test")
        bad = grpc.ssl_channel_credentials(root_certificates=other)
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", bad, options=override) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(ch)(b"tls", timeout=2)
            assert err.value.code() is SC.UNAVAILABLE
        # and a plaintext client is refused too
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await unary(ch)(b"tls", timeout=2)
        assert obs.metadata and len(obs.metadata) == 1
    finally:
        await bridge.stop(None)
        await enclave.stop(None)


def test_tls_config_hides_the_key_and_rejects_non_pem(tmp_path: Path) -> None:
    cert, key = _self_signed("x.test")
    assert b"PRIVATE" not in repr(TlsConfig(cert, key)).encode()
    with pytest.raises(ConfigError):
        TlsConfig(cert, b"not pem")
    with pytest.raises(ConfigError):
        TlsConfig.from_files(tmp_path / "missing.pem", tmp_path / "missing.key")


# -- configuration ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"max_concurrent_calls": 0},
        {"max_message_bytes": -1},
        {"max_streams_per_connection": 0},
        {"connect_timeout": 0},
    ],
)
def test_bad_limits_are_config_errors(kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Bridge("127.0.0.1:0", "unix:/nonexistent", **kw)


def test_command_line(tmp_path: Path) -> None:
    bridge, grace = bridge_from_args(
        ["--listen", "127.0.0.1:0", "--upstream", "unix:/run/e.sock", "--max-message-bytes", "1024"]
    )
    assert (bridge.listen, bridge.upstream, bridge.max_message_bytes, bridge.tls, grace) == (
        "127.0.0.1:0",
        "unix:/run/e.sock",
        1024,
        None,
        5.0,
    )
    cert, key = _self_signed("x.test")
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    bridge, _ = bridge_from_args(
        [
            "--listen",
            "l:1",
            "--upstream",
            "unix:/u",
            "--tls-cert",
            str(tmp_path / "c.pem"),
            "--tls-key",
            str(tmp_path / "k.pem"),
        ]
    )
    assert bridge.tls is not None and bridge.tls.certificate_chain_pem == cert
    with pytest.raises(ConfigError):
        bridge_from_args(["--listen", "l:1", "--upstream", "unix:/u", "--tls-cert", str(tmp_path / "c.pem")])
