"""The hostile parent against key release, through the local stack's real processes.

The attack this file automates: the parent sits on the enclave's KMS leg (it runs the proxy the enclave's
only route to KMS goes through), answers the enclave's ``Decrypt`` itself with a ``CiphertextForRecipient``
built for the RSA key in the enclave's own attestation document, and serves a forged model file: the
genuine header with every chunk re-encrypted under the attacker's key. Two defences, each tested alone:

* **TLS to KMS, verified in the enclave** against the measured CA bundle: a parent that answers itself
  cannot present a certificate for ``kms.<region>.amazonaws.com`` from that CA, so the boot fails at
  ``key-release``, before any answer is read.
* **Key commitment**: even a KMS that answers through the real TLS path with another key (simulated here
  by an impostor holding the emulator's own certificate) cannot make the enclave load chunks sealed
  under that key: the header commits to the data key, and the boot fails at ``key-commitment``.

The production route is checked on the shared stack: the enclave starts with ``lo`` down, brings it up
itself, reaches KMS by its real host name through the in-enclave forwarder, and its NSM is unreachable
from the parent's network namespace. And the measured config refuses, at load, anything weaker.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID

from nitrovault.attestation import parse_document
from nitrovault.envelope import SealedModel, seal_file
from nitrovault.envelope.format import chunk_nonce, derive_stream_key
from nitrovault.kms import build_ciphertext_for_recipient
from nitrovault.local.digits import digits_data, save_classifier, train_classifier
from nitrovault.local.homes import REGION, StackError, free_port
from nitrovault.local.models import LocalModel
from nitrovault.local.stack import REPO_ROOT, LocalStack
from nitrovault.nsm import Nsm, UnixSocketTransport

pytestmark = pytest.mark.slow

KMS_HOST = f"kms.{REGION}.amazonaws.com"


# -- the impostor KMS the hostile parent runs on the KMS leg ----------------------------------------------


class ImpostorKms:
    """HTTPS on 127.0.0.1 with the given certificate; answers every ``Decrypt`` with ``key`` wrapped for the
    recipient key in the request's attestation document (what a parent on the KMS leg would do)."""

    def __init__(self, cert_pem: bytes, key_pem: bytes, *, key: bytes, tmp: Path) -> None:
        self.key = key
        self.connections = 0
        self.failed_handshakes = 0
        self.decrypts = 0
        (tmp / "impostor.pem").write_bytes(cert_pem)
        (tmp / "impostor.key").write_bytes(key_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tmp / "impostor.pem", tmp / "impostor.key")
        impostor = self

        class Handler(BaseHTTPRequestHandler):
            def setup(self) -> None:
                impostor.connections += 1
                try:
                    self.request = context.wrap_socket(self.request, server_side=True)
                except (ssl.SSLError, OSError):
                    impostor.failed_handshakes += 1
                    raise
                super().setup()

            def handle(self) -> None:
                try:
                    super().handle()
                except (ssl.SSLError, OSError):
                    return

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.headers.get("X-Amz-Target") != "TrentService.Decrypt" or "Recipient" not in body:
                    self._answer(400, {"__type": "ValidationException", "message": "impostor"})
                    return
                document = parse_document(base64.b64decode(body["Recipient"]["AttestationDocument"]))
                assert document.public_key is not None
                impostor.decrypts += 1
                blob = build_ciphertext_for_recipient(impostor.key, document.public_key)
                self._answer(200, {"KeyId": body.get("KeyId", ""), "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                                   "CiphertextForRecipient": base64.b64encode(blob).decode()})

            def _answer(self, status: int, answer: dict[str, Any]) -> None:
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def target(self) -> str:
        return f"tcp:127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def attacker_certificate(hostname: str) -> tuple[bytes, bytes]:
    """A certificate for ``hostname`` from the attacker's own CA (all a parent can make)."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Amazon Root CA 1")])  # a look-alike name
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


# -- the forged model --------------------------------------------------------------------------------------


def forge_under(genuine: Path, plain: Path, attacker_key: bytes, work: Path) -> None:
    """Replace ``genuine``'s chunks with the same plaintext model encrypted under ``attacker_key``, keeping
    the genuine header byte for byte (so its digest, the enclave's pin and every chunk's AAD still match).

    The plaintext comes from sealing ``plain`` under the attacker's key (same layout) and opening it again.
    """
    own = work / "attacker.sealed"
    seal_file(plain, own, data_key=bytearray(attacker_key), wrapped_key=b"\x00", key_id="attacker",
              encryption_context={"model": "x"})
    mine, theirs = SealedModel.open(own).header, SealedModel.open(genuine).header
    assert (mine.chunk_size, mine.metadata_chunks, mine.payload_size) == (
        theirs.chunk_size, theirs.metadata_chunks, theirs.payload_size), "the forgery needs the same layout"
    header = genuine.read_bytes()[: theirs.header_length]
    plaintexts = [chunk for chunk in _chunks(own, mine.header_length, attacker_key)]
    stream = _stream_key(attacker_key, theirs.salt)
    aad = hashlib.sha256(header).digest()
    with genuine.open("wb") as out:
        out.write(header)
        for i, chunk in enumerate(plaintexts):
            out.write(AESGCM(stream).encrypt(_nonce(theirs.nonce_prefix, i, len(plaintexts)), chunk, aad))


def _stream_key(key: bytes, salt: bytes) -> bytes:
    return derive_stream_key(key, salt)  # the format's own KDF: the forger knows the spec


def _nonce(prefix: bytes, i: int, n: int) -> bytes:
    return chunk_nonce(prefix, i, i == n - 1)


def _chunks(path: Path, header_length: int, key: bytes) -> Iterator[bytes]:
    header = SealedModel.open(path).header
    data = path.read_bytes()
    raw = data[:header_length]
    stream, aad = _stream_key(key, header.salt), hashlib.sha256(raw).digest()
    body, step = data[header_length:], header.chunk_size + 16
    n = (len(body) + step - 1) // step
    for i in range(n):
        yield AESGCM(stream).decrypt(_nonce(header.nonce_prefix, i, n), body[i * step:(i + 1) * step], aad)


# -- stacks --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("digits") / "digits.safetensors"
    x, y, _, _ = digits_data()
    save_classifier(train_classifier(x[:400], y[:400], hidden=16, epochs=5, seed=0), path, reference=x[:50])
    return path


@pytest.fixture
def prepared(tmp_path: Path, digits_weights: Path) -> Iterator[tuple[LocalStack, str]]:
    """A stack with everything before the parent done: the test plays the parent's part next."""
    model = LocalModel("digits", "1", "generic:mlp-classifier", digits_weights)
    stack = LocalStack(tmp_path / "home", model=model, listen=f"127.0.0.1:{free_port()}")
    try:
        yield stack, stack.prepare()
    finally:
        stack.close()


def _boot_failure(stack: LocalStack, nsm: str) -> str:
    stack.start_parent(nsm)
    with pytest.raises(StackError) as failure:
        stack.wait_serving(timeout=120)
    return str(failure.value)


def test_a_parent_answering_kms_itself_fails_tls_verification(
        prepared: tuple[LocalStack, str], tmp_path: Path) -> None:
    stack, nsm = prepared
    impostor = ImpostorKms(*attacker_certificate(KMS_HOST), key=os.urandom(32), tmp=tmp_path)
    try:
        stack.kms_proxy_target = impostor.target  # the parent's KMS proxy goes to the parent's own "KMS"
        message = _boot_failure(stack, nsm)
    finally:
        impostor.close()
    assert "at step key-release" in message and "TLS" in message, message
    assert impostor.connections >= 1 and impostor.failed_handshakes == impostor.connections
    assert impostor.decrypts == 0  # the enclave never sent its request, so there was nothing to answer


def test_a_forged_file_under_another_key_fails_the_key_commitment(
        prepared: tuple[LocalStack, str], tmp_path: Path) -> None:
    stack, nsm = prepared
    attacker_key = os.urandom(32)
    sealed = stack.paths.sealed("digits")
    forge_under(sealed, stack.model.weights, attacker_key, tmp_path)
    # only the commitment stands between the forgery and the enclave: its chunks open under the attacker's
    # key with the genuine header's digest as AAD, exactly as the enclave would read them
    header = SealedModel.open(sealed).header
    first = next(_chunks(sealed, header.header_length, attacker_key))
    assert first  # authenticated
    tls = stack.paths.kms_tls  # the impostor even has the emulator's own certificate: the "real TLS path"
    impostor = ImpostorKms((tls / "server.pem").read_bytes(), (tls / "server.key").read_bytes(),
                           key=attacker_key, tmp=tmp_path)
    try:
        stack.kms_proxy_target = impostor.target
        message = _boot_failure(stack, nsm)
    finally:
        impostor.close()
    assert impostor.decrypts >= 1  # the enclave took the attacker's key...
    assert "at step key-commitment" in message, message  # ...and refused the file before decrypting it


# -- the production route, on the shared stack ---------------------------------------------------------------


def _netns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def test_the_nsm_is_unreachable_from_the_parents_namespace(stack: LocalStack) -> None:
    assert stack.nsm is not None
    netns = stack.nsm.netns
    if netns is None:
        pytest.skip("this machine cannot make network namespaces (needs root and util-linux)")
    name = stack.nsm.socket
    assert name.startswith("@") and not any(stack.paths.run.glob("**/nsm*"))  # no socket file to reach
    (parent,) = stack.parent_pids()
    (enclave,) = stack.enclave_pids()
    assert _netns(parent) == _netns(os.getpid()) != _netns(enclave)
    with pytest.raises(Exception, match="local NSM socket failed"):
        Nsm(UnixSocketTransport(name, timeout=5)).attestation(nonce=b"parent")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw, pytest.raises(ConnectionRefusedError):
        raw.connect("\0" + name[1:])
    # positive control: from inside the enclave's namespace, the same name answers with a document
    probe = ("from nitrovault.nsm import Nsm, UnixSocketTransport; import sys; "
             f"sys.stdout.write(str(len(Nsm(UnixSocketTransport({name!r})).attestation(nonce=b'x'))))")
    inside = subprocess.run(["nsenter", f"--net={netns}", "--", sys.executable, "-c", probe],
                            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, check=False)
    assert inside.returncode == 0 and int(inside.stdout) > 1000, inside.stderr


def test_the_enclave_reaches_kms_by_its_real_name_through_its_forwarder(stack: LocalStack) -> None:
    config = json.loads(stack.paths.enclave_config.read_text())
    assert stack.kms_service is not None and stack.nsm is not None
    assert config["kms_endpoint_url"] == "" and config["kms_ca_bundle"] == stack.kms_service.ca_pem.decode()
    events = [json.loads(line) for line in (stack.paths.logs / "parent.log").read_text().splitlines()
              if line.startswith("{")]
    if stack.nsm.netns is not None:  # it started with lo down, and brought it up itself
        assert {"event": "network", "detail": "brought the loopback interface up"} in events
    serving = [e for e in events if e.get("event") == "serving"]
    assert serving, "the enclave released its key over TLS and served"
    parent = json.loads(stack.paths.parent_config.read_text())
    assert parent["kms_proxy_target"] == "tcp:" + stack.kms_service.endpoint.removeprefix("https://")
    assert str(stack.paths.parent) in parent["models"]["path"]
    owner = stack.paths.owner
    assert not any(str(owner) in json.dumps(v) for v in parent.values())  # the parent is handed no owner path
    assert not any(str(stack.paths.aws) in json.dumps(v) for v in parent.values() if v != parent["enclave"])


def test_the_parent_counts_boots(stack: LocalStack) -> None:
    status = json.loads((stack.paths.run / "parent" / "status.json").read_text())
    assert status["boots"] >= 1
    assert "enclave boot 1: the enclave attests to KMS" in (stack.paths.logs / "parent.log").read_text()


@pytest.mark.parametrize(("change", "complaint"), [
    ({"kms_endpoint_url": "http://127.0.0.1:4566"}, "https"),
    ({"kms_ca_bundle": None}, "kms_ca_bundle"),
    ({"sealed_digest": None}, "sealed_digest"),
])
def test_a_weaker_config_is_refused_at_load(stack: LocalStack, tmp_path: Path, change: dict[str, Any],
                                            complaint: str) -> None:
    config = json.loads(stack.paths.enclave_config.read_text())
    for key, value in change.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    (tmp_path / "enclave.json").write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, "-m", "nitrovault.local.enclave", "--config", str(tmp_path / "enclave.json"),
         "--nsm-socket", "@none", "--vsock-dir", str(tmp_path), "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, check=False)
    assert result.returncode == 2 and complaint in result.stderr, result.stderr


def test_the_enclave_sizes_torch_threads_to_its_vcpus(stack: LocalStack) -> None:
    events = [json.loads(line) for line in (stack.paths.logs / "parent.log").read_text().splitlines()
              if line.startswith("{")]
    threads = [e for e in events if e.get("event") == "threads"]
    assert threads, "the enclave reported no thread sizing"
    sized = threads[-1]
    assert sized["workers"] == sized["vcpus"]  # limits.workers 0: one model worker per vCPU
    assert sized["torch_threads"] == max(1, sized["vcpus"] // sized["workers"])
    assert sized["interop_threads"] == 1
