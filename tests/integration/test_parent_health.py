"""The parent's public face over real sockets: the load balancer's health endpoint, the parent's config
for the relay, and ``parent_app.main.run`` wired end to end (TCP relay -> "vsock" -> a TLS stand-in
enclave; health following the enclave's reported status).

Deterministic: tests wait for conditions (a response, a status), never for a fixed time, and never assert
that something took less than some time; every wait is bounded by :func:`run`'s overall timeout.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import re
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

import pytest
from fakes import until
from test_relay import run

from nitrovault.errors import ConfigError
from nitrovault.local.vsock import LocalVsockMap
from nitrovault.transport import TcpAddress, VsockAddress, open_connection
from parent_app.config import ParentConfig
from parent_app.health import HealthEndpoint, answer
from parent_app.main import run as run_parent


async def get(address: TcpAddress, request: bytes) -> tuple[int, bytes]:
    """Send a raw request; return the status code and body (0, b"" when closed without an answer)."""
    r, w = await open_connection(address)
    try:
        w.write(request)
        await w.drain()
        try:
            data = await asyncio.wait_for(r.read(), 10)
        except ConnectionError:
            return 0, b""
    finally:
        w.transport.abort()
    if not data:
        return 0, b""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def closed_by_peer(r: asyncio.StreamReader, timeout: float = 10.0) -> bool:
    """True when the peer closed (EOF or reset) without sending anything, within ``timeout``."""
    try:
        return await asyncio.wait_for(r.read(), timeout) == b""
    except ConnectionError:
        return True


async def health_becomes(address: TcpAddress, code: int) -> None:
    """Poll ``GET /health`` until it answers ``code`` (a wait on the answer, bounded by :func:`until`)."""

    async def answers() -> bool:
        return (await get(address, health_request()))[0] == code

    await until(answers, what=f"GET /health to answer {code}")


def health_request(path: str = "/health", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: parent\r\nUser-Agent: ELB-HealthChecker/2.0\r\n\r\n".encode()


# -- the health endpoint -------------------------------------------------------------------------------------


def test_health_is_200_only_while_serving() -> None:
    state = ["BOOTING"]

    async def main() -> None:
        health = HealthEndpoint(TcpAddress("127.0.0.1", 0), lambda: state[0])
        await health.start()
        try:
            assert await get(health.bound, health_request()) == (503, b"BOOTING\n")
            state[0] = "SERVING"
            assert await get(health.bound, health_request()) == (200, b"SERVING\n")
            for other in ("RESTARTING", "FAILED", "STOPPED"):
                state[0] = other
                assert await get(health.bound, health_request()) == (503, other.encode() + b"\n")
            state[0] = "serving; reason=secret \r\n"  # never echoed: only a plain state name is
            assert await get(health.bound, health_request()) == (503, b"UNKNOWN\n")
            state[0] = "SERVING"
            # anything else is 404, whatever the state
            for request in (
                health_request("/"),
                health_request("/health/"),
                health_request("/health?verbose=1"),
                health_request(method="POST"),
                health_request(method="HEAD"),
                b"GET /health SPDY/3\r\n\r\n",
                b"\x16\x03\x01\x00\x05hello\r\n\r\n",
            ):
                assert (await get(health.bound, request))[0] == 404, request
        finally:
            await health.close()

    run(main())


def test_health_with_the_standard_http_client() -> None:
    async def main() -> None:
        health = HealthEndpoint(TcpAddress("127.0.0.1", 0), lambda: "SERVING")
        await health.start()

        def fetch() -> tuple[int, str, str | None, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", health.bound.port, timeout=10)
            try:
                conn.request("GET", "/health")
                resp = conn.getresponse()
                return resp.status, resp.reason, resp.getheader("Connection"), resp.read()
            finally:
                conn.close()

        try:
            assert await asyncio.to_thread(fetch) == (200, "OK", "close", b"SERVING\n")
        finally:
            await health.close()

    run(main())


def test_health_request_limits_and_slow_clients() -> None:
    async def main() -> None:
        health = HealthEndpoint(
            TcpAddress("127.0.0.1", 0), lambda: "SERVING", timeout=0.3, max_request_bytes=256
        )
        await health.start()
        try:
            # a request head beyond max_request_bytes is closed without an answer
            big = b"GET /health HTTP/1.1\r\nX-Pad: " + b"a" * 1000 + b"\r\n\r\n"
            assert await get(health.bound, big) == (0, b"")
            # a client that never finishes its request is closed by the timeout, while others are served
            r, w = await open_connection(health.bound)
            w.write(b"GET /health HTTP/1.1\r\n")
            assert await get(health.bound, health_request()) == (200, b"SERVING\n")
            assert await closed_by_peer(r, 10)
            w.transport.abort()
            assert await get(health.bound, health_request()) == (200, b"SERVING\n")
        finally:
            await health.close()

    run(main())


def test_health_close_ends_open_connections_and_stops_listening() -> None:
    async def main() -> None:
        health = HealthEndpoint(TcpAddress("127.0.0.1", 0), lambda: "SERVING", timeout=60)
        await health.start()
        bound = health.bound
        r, w = await open_connection(bound)
        w.write(b"GET /health HTTP/1.1\r\n")  # unfinished: held open
        await w.drain()
        await asyncio.wait_for(health.close(), 10)
        assert await closed_by_peer(r, 10)
        w.transport.abort()
        with pytest.raises(OSError):
            await open_connection(bound)

    run(main())


def test_answer_is_pure() -> None:
    assert answer(health_request(), "SERVING") == (200, "SERVING")
    assert answer(health_request(), "BOOTING") == (503, "BOOTING")
    assert answer(b"", "SERVING") == (404, "not found")


# -- configuration ------------------------------------------------------------------------------------------

BASE: dict[str, Any] = {
    "listen": "127.0.0.1:50051",
    "region": "us-east-1",
    "run_dir": "/tmp/nv-parent",
    "credentials": {"kind": "imds"},
    "models": {"kind": "directory", "path": "/tmp/models"},
    "enclave": {"kind": "process", "argv": ["true"]},
}


def test_config_defaults() -> None:
    config = ParentConfig(**BASE)
    assert (config.max_connections, config.max_connections_per_source) == (1024, 64)
    assert (config.connection_rate_per_source, config.connection_burst_per_source) == (50.0, 100)
    assert (config.idle_timeout_s, config.handshake_timeout_s, config.max_handshake_bytes) == (300, 10, 65536)
    assert config.health_listen == "" and config.health_address is None
    assert config.listen_address == TcpAddress("127.0.0.1", 50051)
    v6 = ParentConfig(**{**BASE, "listen": "[::]:443", "health_listen": "0.0.0.0:8080"})
    assert v6.listen_address == TcpAddress("::", 443)
    assert v6.health_address == TcpAddress("0.0.0.0", 8080)  # noqa: S104  # what a parent binds


@pytest.mark.parametrize(
    "change",
    [
        {"listen": "unix:/tmp/public.sock"},  # the public listener is TCP: per-source limits need peer IPs
        {"listen": "tcp:127.0.0.1:1"},
        {"listen": "127.0.0.1"},
        {"listen": "127.0.0.1:99999"},
        {"listen": "::1:443"},
        {"health_listen": "localhost"},
        {"health_listen": "127.0.0.1:50051"},  # the same address as listen
        {"max_connections": 0},
        {"max_connections": "1024"},
        {"max_connections_per_source": True},
        {"max_connections_per_source": 2000},  # more than max_connections
        {"connection_rate_per_source": 0},
        {"connection_rate_per_source": float("nan")},
        {"connection_burst_per_source": 0},
        {"idle_timeout_s": -1},
        {"handshake_timeout_s": 0},
        {"handshake_timeout_s": "10"},
        {"max_handshake_bytes": 100},
    ],
)
def test_config_rejects_bad_values(change: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        ParentConfig(**{**BASE, **change})


@pytest.mark.parametrize("retired", ["tls_cert", "tls_key", "max_concurrent_calls", "max_message_bytes"])
def test_config_rejects_the_retired_bridge_keys(tmp_path: Path, retired: str) -> None:
    path = tmp_path / "parent.json"
    path.write_text(json.dumps({**BASE, retired: ""}))
    with pytest.raises(ConfigError) as err:
        ParentConfig.load(path)
    assert retired in str(err.value)
    path.write_text(json.dumps(BASE))
    assert ParentConfig.load(path).listen == "127.0.0.1:50051"


# -- the parent, wired end to end -------------------------------------------------------------------------

#: A stand-in enclave process: it reports SERVING to the parent's host services over "vsock" once the test
#: writes to the go FIFO, on its first boot only (a restart stays silent, so the parent's RESTARTING shows).
FAKE_ENCLAVE = r"""
import os, signal, sys
import grpc
from nitrovault.local.vsock import LocalVsockMap
from nitrovault.rpc.gen.nitrovault.v1 import host_pb2, host_pb2_grpc
from nitrovault.transport import VsockAddress

vsock_dir, boots, go = sys.argv[1:4]
first = not os.path.exists(boots)
with open(boots, "a") as f:
    f.write(f"{os.getpid()}\n")
if first:
    with open(go) as fifo:  # blocks until the test says go (a FIFO: no polling)
        fifo.read()
    path = LocalVsockMap(vsock_dir, create=False).path_for(VsockAddress(3, 8001))
    with grpc.insecure_channel(f"unix:{path}") as channel:
        report = host_pb2.StatusReport(state=host_pb2.StatusReport.SERVING, step="ready")
        host_pb2_grpc.HostServicesStub(channel).ReportStatus(report, timeout=20, wait_for_ready=True)
signal.pause()
"""

SERVER_NAME = "enclave.nitrovault.test"


def _tls_pair(d: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    ).public_bytes(serialization.Encoding.PEM)
    (d / "cert.pem").write_bytes(cert)
    (d / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(d / "cert.pem", d / "key.pem")
    client = ssl.create_default_context(cadata=cert.decode())
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    return server, client


def test_parent_relays_tls_to_the_enclave_port_and_health_follows_the_enclave(
    d: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    vsock_dir, boots, go = d / "v", d / "boots", d / "go"
    fake_args = (vsock_dir, boots, go)
    os.mkfifo(go)
    (d / "creds.json").write_text(json.dumps({"access_key_id": "AKID", "secret_access_key": "s"}))
    (d / "models").mkdir()
    config = ParentConfig(
        listen="127.0.0.1:0",
        health_listen="127.0.0.1:0",
        region="us-east-1",
        run_dir=str(d / "run"),
        credentials={"kind": "static", "file": str(d / "creds.json")},
        models={"kind": "directory", "path": str(d / "models")},
        enclave={"kind": "process", "argv": [sys.executable, "-c", FAKE_ENCLAVE, *map(str, fake_args)]},
        handshake_timeout_s=5.0,
    )
    vmap = LocalVsockMap(vsock_dir)
    server_ctx, client_ctx = _tls_pair(d)
    out: list[str] = []

    def printed(pattern: str) -> re.Match[str] | None:
        out.append(capsys.readouterr().out)
        return re.search(pattern, "".join(out))

    def logged(pattern: str) -> re.Match[str] | None:
        return next((m for rec in caplog.records if (m := re.search(pattern, rec.getMessage()))), None)

    async def tls_echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            w.close()

    async def main() -> None:
        # the stand-in enclave's TLS server on its inference "vsock" port (TLS ends here, not on the parent)
        enclave = await asyncio.start_unix_server(
            tls_echo, vmap.path_for(VsockAddress(16, 5000)), ssl=server_ctx
        )
        stop = asyncio.Event()
        parent = asyncio.create_task(run_parent(config, mapping=vmap, stop=stop))
        try:
            await until(lambda: printed(r"parent listening on (\S+):(\d+)") is not None,
                        what="the parent's listening line")
            listening = printed(r"parent listening on (\S+):(\d+)")
            assert listening is not None
            public = TcpAddress(listening.group(1), int(listening.group(2)))
            await until(lambda: logged(r"health endpoint on (\S+):(\d+)") is not None,
                        what="the health endpoint's log line")
            found = logged(r"health endpoint on (\S+):(\d+)")
            assert found is not None
            health = TcpAddress(found.group(1), int(found.group(2)))

            assert await get(health, health_request()) == (503, b"BOOTING\n")
            await asyncio.to_thread(go.write_bytes, b"go")  # returns once the fake enclave reads it
            await health_becomes(health, 200)
            assert await get(health, health_request()) == (200, b"SERVING\n")

            # a TLS 1.3 session through the public listener reaches the enclave's port unchanged
            r, w = await asyncio.open_connection(
                public.host, public.port, ssl=client_ctx, server_hostname=SERVER_NAME
            )
            assert w.get_extra_info("ssl_object").version() == "TLSv1.3"
            w.write(b"ciphertext on the parent")
            assert await asyncio.wait_for(r.readexactly(24), 10) == b"ciphertext on the parent"
            w.close()
            # plaintext is closed by the relay's handshake guard
            r, w = await open_connection(public)
            w.write(b"GET / HTTP/1.1\r\n\r\n")
            assert await closed_by_peer(r, 10)
            w.transport.abort()

            # the enclave dies: the parent marks it RESTARTING and the load balancer sees 503
            pid = int(boots.read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
            await health_becomes(health, 503)
            assert await get(health, health_request()) == (503, b"RESTARTING\n")
        finally:
            stop.set()
            assert await parent == 0
            enclave.close()
            await enclave.wait_closed()
        # shut down: neither listener accepts any more
        for address in (public, health):
            with pytest.raises(OSError):
                await open_connection(address)
        assert not os.path.exists(vmap.path_for(VsockAddress(3, 8001)))
        assert not (d / "run" / "enclave.sock").exists()  # the old bridge hop is gone

    with caplog.at_level(logging.INFO):
        run(main(), timeout=60)
    # the parent never held or printed TLS material
    assert "PRIVATE KEY" not in caplog.text and "ciphertext on the parent" not in caplog.text


def test_parent_closes_clients_at_once_while_the_enclave_is_down(d: Path) -> None:
    """No enclave listening on the inference port: the relay closes each client at once."""
    from parent_app.main import ENCLAVE_CONNECT_TIMEOUT_S, public_relay

    config = ParentConfig(**{**BASE, "listen": "127.0.0.1:0", "run_dir": str(d / "run")})
    vmap = LocalVsockMap(d / "v")

    async def main() -> None:
        relay = public_relay(config, vmap)
        await relay.start()
        try:
            assert relay.target == VsockAddress(16, 5000)
            assert isinstance(relay.bound, TcpAddress)
            for _ in range(3):
                r, w = await open_connection(relay.bound)
                w.write(b"\x16\x03\x01\x00\x01\x01")
                assert await closed_by_peer(r, 10 * ENCLAVE_CONNECT_TIMEOUT_S)
                w.transport.abort()
            assert relay.stats.failed == 3 and relay.stats.active == 0
        finally:
            await relay.close()

    run(main())

