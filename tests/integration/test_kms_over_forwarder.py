"""boto3 -> ConnectForwarder (127.0.0.1) -> local vsock (a unix socket) -> the parent's vsock-proxy stand-in
(a Relay to TCP) -> a TLS HTTP responder playing KMS, with a certificate for ``kms.us-east-1.amazonaws.com``
from a throwaway CA: the enclave's real route to KMS, end to end, with TLS verified against the bundle
given to ``kms_client_from_env`` and nothing else.

Negative cases put the parent (which owns everything past the forwarder) in KMS's place: a certificate
from another CA, a certificate for another name, plain HTTP, and an attacker CA named by every
environment variable botocore or OpenSSL would read. Each one ends in :class:`KmsTlsError` before a
single request byte (signed headers, body) reaches the impostor.

No fixed sleeps: every wait is on a socket or an answer, bounded by :func:`run`'s timeout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import ssl
import tempfile
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nitrovault.errors import ConfigError, KmsTlsError
from nitrovault.kms import AwsCredentials, KmsClient, kms_client_from_env
from nitrovault.kms.client import sealed_pem_file
from nitrovault.local.vsock import LocalVsockMap
from nitrovault.transport import ConnectForwarder, Relay, TcpAddress, VsockAddress

REGION = "us-east-1"
KMS = f"kms.{REGION}.amazonaws.com"
ENDPOINT = f"https://{KMS}"
KMS_PROXY = VsockAddress(3, 8000)
CREDENTIALS = AwsCredentials("AKIDEXAMPLE", "not-a-real-secret", "token")
HOUR, DAY = datetime.timedelta(hours=1), datetime.timedelta(days=1)


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


# -- a throwaway PKI ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ca:
    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(cls, name: str) -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - HOUR)
            .not_valid_after(now + DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(name, key, cert)

    def server_context(self, host: str, folder: Path) -> ssl.SSLContext:
        """A TLS server context with a leaf for ``host`` signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - HOUR)
            .not_valid_after(now + DAY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_file, key_file = folder / f"{self.name}-{host}.crt", folder / f"{self.name}-{host}.key"
        cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_file, key_file)
        return ctx


@pytest.fixture(scope="module")
def trusted() -> Ca:
    return Ca.create("measured-config-ca")


@pytest.fixture(scope="module")
def attacker() -> Ca:
    return Ca.create("parent-ca")


@pytest.fixture
def d() -> Iterator[Path]:
    """A short private folder (tmp_path can exceed the 107-byte unix socket path limit)."""
    path = tempfile.mkdtemp(dir="/tmp", prefix="nvkf")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


# -- KMS's stand-in: a minimal TLS HTTP/1.1 responder speaking KMS JSON 1.1 for GenerateRandom -----------


@dataclass
class FakeKms:
    sni: list[str | None] = field(default_factory=list)  #: server names the TLS clients asked for
    requests: list[dict[str, str]] = field(default_factory=list)  #: request headers, one dict per request

    def context(self, ctx: ssl.SSLContext) -> ssl.SSLContext:
        def record(sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            self.sni.append(name)

        ctx.sni_callback = record
        return ctx

    async def __call__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if w.get_extra_info("ssl_object") is None:  # the parent answering itself in plain HTTP
            await r.read(1)
            w.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            w.close()
            return
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                fields = (line.partition(":") for line in lines[1:] if line)
                headers = {k.strip().lower(): v.strip() for k, _, v in fields}
                headers[":request-line"] = lines[0]
                body = json.loads(await r.readexactly(int(headers.get("content-length", "0"))) or b"{}")
                self.requests.append(headers)
                random = base64.b64encode(os.urandom(body["NumberOfBytes"])).decode()
                answer = json.dumps({"Plaintext": random})
                w.write(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\n"
                    f"x-amzn-RequestId: req-{len(self.requests)}\r\n"
                    f"Content-Length: {len(answer)}\r\n\r\n{answer}".encode()
                )
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            w.close()


@dataclass
class Route:
    forwarder: ConnectForwarder
    kms: FakeKms

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.forwarder.port}"

    def client(self, *, ca_bundle: bytes | None, **kw: Any) -> KmsClient:
        return KmsClient(
            kms_client_from_env(
                REGION,
                endpoint_url=ENDPOINT,
                credentials=CREDENTIALS,
                ca_bundle=ca_bundle,
                proxy=self.proxy,
                **kw,
            )
        )


@contextlib.asynccontextmanager
async def route(d: Path, server_ctx: ssl.SSLContext | None) -> AsyncIterator[Route]:
    """The whole enclave -> parent -> "KMS" path; ``server_ctx=None`` answers in plain HTTP."""
    kms = FakeKms()
    server = await asyncio.start_server(
        kms, "127.0.0.1", 0, ssl=kms.context(server_ctx) if server_ctx is not None else None
    )
    port = server.sockets[0].getsockname()[1]
    mapping = LocalVsockMap(d)
    vsock_proxy = Relay(KMS_PROXY, TcpAddress("127.0.0.1", port), mapping=mapping)  # the parent's side
    forwarder = ConnectForwarder(TcpAddress("127.0.0.1", 0), KMS_PROXY, allowed=[(KMS, 443)], mapping=mapping)
    await vsock_proxy.start()
    await forwarder.start()
    try:
        yield Route(forwarder, kms)
    finally:
        await forwarder.close()
        await vsock_proxy.close()
        server.close()
        await server.wait_closed()


def generate_random(client: KmsClient) -> Coroutine[Any, Any, bytes]:
    return asyncio.to_thread(client.generate_random, 16)


# -- the route works, with TLS for KMS's real name ------------------------------------------------------


def test_boto3_reaches_kms_through_the_forwarder_with_sni_and_the_measured_bundle(
    d: Path, trusted: Ca
) -> None:
    async def main() -> None:
        async with route(d, trusted.server_context(KMS, d)) as r:
            client = r.client(ca_bundle=trusted.pem)
            assert len(await generate_random(client)) == 16
            assert len(await generate_random(client)) == 16  # the pooled tunnel is reused
            assert r.kms.sni and set(r.kms.sni) == {KMS}
            assert len(r.kms.requests) == 2
            request = r.kms.requests[0]
            assert request[":request-line"] == "POST / HTTP/1.1"  # origin form inside the tunnel
            assert request["host"] == KMS
            assert request["x-amz-target"] == "TrentService.GenerateRandom"
            assert r.forwarder.stats.tunnels == len(r.kms.sni)

    run(main())


def test_proxy_environment_variables_cannot_redirect_or_bypass_the_forwarder(
    d: Path, trusted: Ca, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # discard: nobody listens there
    monkeypatch.setenv("NO_PROXY", "*")
    monkeypatch.setenv("no_proxy", KMS)

    async def main() -> None:
        async with route(d, trusted.server_context(KMS, d)) as r:
            assert len(await generate_random(r.client(ca_bundle=trusted.pem))) == 16
            assert r.forwarder.stats.tunnels == 1

    run(main())


# -- the parent in KMS's place ----------------------------------------------------------------------------


def refused(r: Route, err: pytest.ExceptionInfo[KmsTlsError]) -> str:
    message = str(err.value)
    assert message.startswith("TLS verification of the KMS endpoint failed: ")
    assert r.kms.requests == []  # no signed request, no body ever reached the impostor
    assert "not-a-real-secret" not in err.value.diagnostics()
    return message


def test_a_certificate_from_another_ca_is_refused(d: Path, trusted: Ca, attacker: Ca) -> None:
    async def main() -> None:
        async with route(d, attacker.server_context(KMS, d)) as r:
            with pytest.raises(KmsTlsError) as err:
                await generate_random(r.client(ca_bundle=trusted.pem))
            assert "certificate verify failed" in refused(r, err)
            assert set(r.kms.sni) == {KMS}

    run(main())


def test_a_certificate_for_another_name_is_refused(d: Path, trusted: Ca) -> None:
    async def main() -> None:
        async with route(d, trusted.server_context("kms.eu-west-1.amazonaws.com", d)) as r:
            with pytest.raises(KmsTlsError) as err:
                await generate_random(r.client(ca_bundle=trusted.pem))
            assert "not for the KMS host name" in refused(r, err)
            assert set(r.kms.sni) == {KMS}  # urllib3 checks the name after the handshake, before any request

    run(main())


def test_a_plain_http_answer_is_refused(d: Path, trusted: Ca) -> None:
    async def main() -> None:
        async with route(d, None) as r:
            with pytest.raises(KmsTlsError) as err:
                await generate_random(r.client(ca_bundle=trusted.pem))
            assert "TLS handshake failed" in refused(r, err)

    run(main())


def test_ca_bundle_environment_variables_do_not_make_the_attacker_trusted(
    d: Path, trusted: Ca, attacker: Ca, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = d / "attacker-ca.pem"
    bundle.write_bytes(attacker.pem)
    for name in ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(name, str(bundle))
    monkeypatch.setenv("SSL_CERT_DIR", str(d))

    async def main() -> None:
        async with route(d, attacker.server_context(KMS, d)) as r:
            with pytest.raises(KmsTlsError) as err:
                await generate_random(r.client(ca_bundle=trusted.pem))
            refused(r, err)
            # the control: without a measured bundle botocore does follow AWS_CA_BUNDLE, so the variable
            # was live and only ca_bundle= kept the attacker out
            assert len(await generate_random(r.client(ca_bundle=None))) == 16

    run(main())


# -- the bundle file ------------------------------------------------------------------------------------


def test_the_bundle_is_a_sealed_memfd_nobody_can_change(trusted: Ca) -> None:
    path = sealed_pem_file(trusted.pem)
    assert path.startswith("/proc/self/fd/")
    fd = int(path.rsplit("/", 1)[1])
    assert Path(path).read_bytes() == trusted.pem
    assert os.readlink(path).startswith("/memfd:nitrovault-kms-ca")  # anonymous: not on any file system
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    wanted = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
    assert seals & wanted == wanted
    with pytest.raises(PermissionError):
        os.pwrite(fd, b"x", 0)
    for mode in ("r+b", "ab", "wb"):  # through a new open file description: write (or O_TRUNC) fails
        with pytest.raises(PermissionError), open(path, mode, buffering=0) as reopened:
            reopened.write(b"-----BEGIN CERTIFICATE-----")
    with pytest.raises(PermissionError):
        os.truncate(path, 0)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, len(trusted.pem) + 1)
    with pytest.raises(PermissionError):
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0)  # F_SEAL_SEAL: the seals themselves are final
    assert sealed_pem_file(trusted.pem) == path  # one memfd per bundle
    assert Path(path).read_bytes() == trusted.pem


def test_the_client_verifies_with_the_memfd_even_when_aws_ca_bundle_is_set(
    trusted: Ca, attacker: Ca, monkeypatch: pytest.MonkeyPatch, d: Path
) -> None:
    (d / "a.pem").write_bytes(attacker.pem)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(d / "a.pem"))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(d / "a.pem"))
    boto = kms_client_from_env(
        REGION, ENDPOINT, CREDENTIALS, ca_bundle=trusted.pem, proxy="http://127.0.0.1:1"
    )
    assert boto._endpoint.http_session._verify == sealed_pem_file(trusted.pem)
    assert boto._endpoint.http_session._proxy_config.proxy_url_for(ENDPOINT + "/") == "http://127.0.0.1:1"


@pytest.mark.parametrize(
    "bundle",
    [b"", b"not a certificate", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"],
    ids=["empty", "text", "bad_base64_body"],
)
def test_a_bundle_without_certificates_is_a_config_error(bundle: bytes) -> None:
    with pytest.raises(ConfigError, match="CA bundle"):
        kms_client_from_env(REGION, ENDPOINT, CREDENTIALS, ca_bundle=bundle)


def test_writing_a_sealed_bundle_fails_with_eperm(trusted: Ca) -> None:
    fd = int(sealed_pem_file(trusted.pem).rsplit("/", 1)[1])
    with pytest.raises(OSError) as err:
        os.write(os.dup(fd), b"x")
    assert err.value.errno == errno.EPERM
