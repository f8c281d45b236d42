"""``nitrovault attest verify|fetch|pin`` in process (typer CliRunner).

``verify`` runs against real vectors and forged documents. The contract other tooling relies on: exit 0
valid, 1 invalid (``invalid: <step>: ...`` on stderr), 2 usage error; ``--json`` prints module_id,
timestamp, every PCR, debug, user_data, nonce, public_key and the nitrovault ``bindings`` in user_data
(or null and ``bindings_error``).

``fetch`` and ``pin`` run against the real enclave server with a TLS identity over the local fake NSM
(harness from ``test_enclave_server``): they verify it as the client does, send no token, and what
``pin`` writes is enough for a plain gRPC client to call the service.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from forge import forge, make_pki
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_enclave_server import CONFIG, PCRS, TOKEN, ServerThread, mlp_handler, mlp_module, short_socket_dir
from typer.testing import CliRunner

from nitrovault.cli import app
from nitrovault.identity import TlsIdentity
from nitrovault.local.nsm import make_local_nsm
from nitrovault.receipts import enclave_user_data

runner = CliRunner()
SERVER_NAME = "enclave.attest.test"
IDENTITY = TlsIdentity.generate(SERVER_NAME, now=datetime.now(UTC))

NITRO = "blocky-nitrite_2024-09-07_nitro.b64"
DEBUG = "evervault_2022-10-12_debug.cose"


def _vector(nitro_vectors: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(v for v in nitro_vectors if v["file"] == name)


def _at(vector: dict[str, Any]) -> str:
    return str(vector["suggested_verify_time_utc"])


def _run(*args: str) -> Any:
    return runner.invoke(app, ["attest", "verify", *args])


def test_valid_base64_vector_exits_0(nitro_vectors: list[dict[str, Any]], nitro_vectors_dir: Path) -> None:
    vector = _vector(nitro_vectors, NITRO)
    result = _run(str(nitro_vectors_dir / NITRO), "--at", _at(vector))
    assert result.exit_code == 0, result.output
    assert vector["module_id"] in result.stdout
    assert "PCR0: " + vector["pcrs"]["0"] in result.stdout
    assert "PCR3:" not in result.stdout  # all-zero PCRs are counted, not listed
    assert "12 all-zero PCRs" in result.stdout


def test_json_shape(nitro_vectors: list[dict[str, Any]], nitro_vectors_dir: Path) -> None:
    vector = _vector(nitro_vectors, "evervault_2022-10-13_pcr8-signed.cose")
    result = _run(str(nitro_vectors_dir / vector["file"]), "--at", _at(vector), "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["module_id"] == vector["module_id"]
    assert datetime.fromisoformat(out["timestamp"]) == datetime.fromisoformat(vector["timestamp_utc"])
    assert out["pcrs"] == vector["pcrs"] and len(out["pcrs"]) == 16
    assert out["debug"] is False
    assert out["user_data"] is None and out["public_key"] is None  # CBOR null -> JSON null
    assert out["nonce"] == vector["nonce"]
    assert out["valid"] is True
    assert out["bindings"] is None and "no nitrovault bindings" in out["bindings_error"]


def test_raw_cbor_file_and_expectations(nitro_vectors: list[dict[str, Any]], tmp_path: Path) -> None:
    vector = _vector(nitro_vectors, NITRO)
    path = tmp_path / "doc.cose"
    path.write_bytes(vector["cose"])
    args = [
        str(path),
        "--at",
        _at(vector),
        "--expect-pcr",
        f"0={vector['pcrs']['0']}",
        "--expect-pcr",
        f"2={vector['pcrs']['2']}",
        "--nonce",
        vector["nonce"],
    ]
    result = _run(*args)
    assert result.exit_code == 0, result.output


def test_wrong_pcr_exits_1_naming_the_step(
    nitro_vectors: list[dict[str, Any]], nitro_vectors_dir: Path
) -> None:
    vector = _vector(nitro_vectors, NITRO)
    result = _run(str(nitro_vectors_dir / NITRO), "--at", _at(vector), "--expect-pcr", "0=" + "ab" * 48)
    assert result.exit_code == 1
    assert result.stderr.startswith("invalid: pcr: PCR0 does not match")


def test_wrong_nonce_exits_1(nitro_vectors: list[dict[str, Any]], nitro_vectors_dir: Path) -> None:
    vector = _vector(nitro_vectors, NITRO)
    result = _run(str(nitro_vectors_dir / NITRO), "--at", _at(vector), "--nonce", "00")
    assert result.exit_code == 1
    assert result.stderr.startswith("invalid: nonce: ")


def test_expired_exits_1(nitro_vectors: list[dict[str, Any]], nitro_vectors_dir: Path) -> None:
    result = _run(str(nitro_vectors_dir / NITRO), "--at", "2024-09-07T17:37:40Z")
    assert result.exit_code == 1
    assert result.stderr.startswith("invalid: validity: ")
    assert "hint:" in result.stderr


def test_default_time_is_now_so_recorded_documents_expire(nitro_vectors_dir: Path) -> None:
    result = _run(str(nitro_vectors_dir / NITRO))
    assert result.exit_code == 1
    assert result.stderr.startswith("invalid: validity: ")


def test_invalid_json_output(nitro_vectors_dir: Path) -> None:
    result = _run(str(nitro_vectors_dir / NITRO), "--at", "2030-01-01T00:00:00Z", "--json")
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["valid"] is False and out["step"] == "validity"
    assert "not at 2030-01-01T00:00:00+00:00" in out["error"]


def test_tampered_signature_exits_1(nitro_vectors: list[dict[str, Any]], tmp_path: Path) -> None:
    vector = _vector(nitro_vectors, NITRO)
    raw = bytearray(vector["cose"])
    raw[-1] ^= 1
    path = tmp_path / "doc.b64"
    path.write_bytes(base64.b64encode(bytes(raw)))
    result = _run(str(path), "--at", _at(vector))
    assert result.exit_code == 1
    assert result.stderr.startswith("invalid: signature: ")


def test_garbage_file_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"hello world")
    result = _run(str(path), "--at", "2024-01-01T00:00:00Z")
    assert result.exit_code == 1
    assert result.stderr.startswith("invalid: decode: ")


def test_debug_needs_allow_debug(nitro_vectors: list[dict[str, Any]], nitro_vectors_dir: Path) -> None:
    vector = _vector(nitro_vectors, DEBUG)
    path = str(nitro_vectors_dir / DEBUG)
    refused = _run(path, "--at", _at(vector))
    assert refused.exit_code == 1
    assert refused.stderr.startswith("invalid: debug-mode: ")
    allowed = _run(path, "--at", _at(vector), "--allow-debug", "--json")
    assert allowed.exit_code == 0, allowed.output
    assert json.loads(allowed.stdout)["debug"] is True
    assert "WARNING" in allowed.stderr and "DEBUG" in allowed.stderr


def test_custom_root(tmp_path: Path) -> None:
    at = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    pki = make_pki(at, prefix="cli")
    doc = tmp_path / "doc.cose"
    doc.write_bytes(forge(pki, at))
    root = tmp_path / "root.pem"
    root.write_bytes(pki.root.public_bytes(serialization.Encoding.PEM))
    assert _run(str(doc), "--at", "2025-03-01T12:00:00Z", "--root", str(root)).exit_code == 0
    assert _run(str(doc), "--at", f"@{at.timestamp():.0f}", "--root", str(root)).exit_code == 0
    # a naive --at is refused, not guessed (one rule for every command: nitrovault.cli.times)
    naive = _run(str(doc), "--at", "2025-03-01T12:00:00", "--root", str(root))
    assert naive.exit_code == 2 and "no UTC offset" in naive.output
    pinned = _run(str(doc), "--at", "2025-03-01T12:00:00Z")
    assert pinned.exit_code == 1 and pinned.stderr.startswith("invalid: root: ")


@pytest.mark.parametrize(
    "args",
    [
        ["--expect-pcr", "0=abcd"],
        ["--expect-pcr", "nonsense"],
        ["--expect-pcr", "32=" + "ab" * 48],
        ["--nonce", "zz"],
        ["--at", "yesterday"],
        ["--root", "/nonexistent/root.pem"],
        ["--no-such-option"],
    ],
)
def test_usage_errors_exit_2(args: list[str], nitro_vectors_dir: Path) -> None:
    result = _run(str(nitro_vectors_dir / NITRO), "--at", "2024-09-07T14:37:39.545Z", *args)
    assert result.exit_code == 2, result.output


def test_missing_file_exits_2(tmp_path: Path) -> None:
    assert _run(str(tmp_path / "absent.cose")).exit_code == 2


def test_unreadable_root_exits_2(tmp_path: Path, nitro_vectors_dir: Path) -> None:
    bad = tmp_path / "root.pem"
    bad.write_text("not a certificate")
    result = _run(str(nitro_vectors_dir / NITRO), "--at", "2024-09-07T14:37:39.545Z", "--root", str(bad))
    assert result.exit_code == 2


def test_bindings_of_a_boot_document_and_of_a_foreign_one(tmp_path: Path) -> None:
    at = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    pki = make_pki(at, prefix="bind")
    root = tmp_path / "root.pem"
    root.write_bytes(pki.root.public_bytes(serialization.Encoding.PEM))
    receipt_key = ed25519.Ed25519PrivateKey.generate().public_key()
    raw_key = receipt_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    boot, foreign = tmp_path / "boot.cose", tmp_path / "foreign.cose"
    boot.write_bytes(forge(pki, at, user_data=enclave_user_data(receipt_key)))
    foreign.write_bytes(forge(pki, at, user_data=b"someone else's layout"))
    args = ["--at", "2025-03-01T12:00:00Z", "--root", str(root)]
    bound = json.loads(_run(str(boot), *args, "--json").stdout)
    assert bound["bindings"] == {"layout": "nitrovault/v1", "receipt_key": raw_key.hex(),
                                 "tls_spki_sha256": None}
    assert bound["bindings_error"] is None
    text = _run(str(boot), *args)
    assert f"bindings: nitrovault/v1 receipt_key {raw_key.hex()} tls_spki_sha256 none" in text.stdout
    other = _run(str(foreign), *args, "--json")
    assert other.exit_code == 0  # a valid document; it just binds nothing of ours
    assert json.loads(other.stdout)["bindings"] is None
    assert "bindings: none (" in _run(str(foreign), *args).stdout


# -- fetch and pin against a serving enclave -----------------------------------------------------------------


@dataclass
class Enclave:
    server: ServerThread
    root: Path
    #: every authorization value the server saw
    seen_tokens: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return self.server.target

    def trust(self, pcr0: bytes = PCRS[0]) -> list[str]:
        return ["--target", self.target, "--expect-pcr", f"0={pcr0.hex()}", "--expect-pcr",
                f"1={PCRS[1].hex()}", "--root", str(self.root)]


@pytest.fixture(scope="module")
def enclave(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Enclave]:
    pki = tmp_path_factory.mktemp("attest-pki") / "pki"
    directory = short_socket_dir()
    server = ServerThread(CONFIG, make_local_nsm(pki, PCRS), str(directory / "g.sock"), tls=IDENTITY)
    server.serve(mlp_handler(mlp_module()))
    served = Enclave(server, pki / "root.pem")
    original = server.server.service.protections.identify

    def spy(metadata: Any) -> Any:
        served.seen_tokens.extend(str(v) for k, v in metadata or () if k == "authorization")
        return original(metadata)

    server.server.service.protections.identify = spy  # type: ignore[method-assign]
    try:
        yield served
    finally:
        server.close()
        shutil.rmtree(directory, ignore_errors=True)


def _health(target: str, pem: bytes) -> Any:
    credentials = grpc.ssl_channel_credentials(root_certificates=pem)
    with grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", SERVER_NAME)]) \
            as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_pin_writes_a_certificate_a_plain_grpc_client_can_call_with(enclave: Enclave, tmp_path: Path) -> None:
    pem = tmp_path / "enclave.pem"
    result = runner.invoke(app, ["attest", "pin", *enclave.trust(), "-o", str(pem)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert f"verified: PCR0 {PCRS[0].hex()}" in lines
    assert f"certificate SHA-256: {IDENTITY.fingerprint}" in lines
    assert f"server name: {SERVER_NAME}" in lines
    assert pem.read_bytes() == IDENTITY.leaf_pem
    assert _health(enclave.target, pem.read_bytes()) == health_pb2.HealthCheckResponse.SERVING
    other = TlsIdentity.generate(SERVER_NAME, now=datetime.now(UTC)).leaf_pem  # the pin is what is trusted
    with pytest.raises(grpc.RpcError) as refused:
        _health(enclave.target, other)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert enclave.seen_tokens == []


def test_pin_writes_nothing_for_an_enclave_that_does_not_verify(enclave: Enclave, tmp_path: Path) -> None:
    pem = tmp_path / "enclave.pem"
    result = runner.invoke(app, ["attest", "pin", *enclave.trust(pcr0=b"\xee" * 48), "-o", str(pem)])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: pcr: PCR0 does not match") and result.stderr.count("\n") == 1
    assert not pem.exists()


def test_fetch_saves_a_verified_document_binding_the_tls_key(enclave: Enclave, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    document = tmp_path / "boot.cose"
    fetched = runner.invoke(app, ["attest", "fetch", *enclave.trust(), "--token-file", str(token_file),
                                  "-o", str(document)])
    assert fetched.exit_code == 0, fetched.output
    assert fetched.stdout.startswith(f"verified: PCR0 {PCRS[0].hex()}\nwrote {document} (")
    assert enclave.seen_tokens == []  # Attest is public: the token is accepted, never sent
    check = ["attest", "verify", str(document), "--root", str(enclave.root), "--expect-pcr",
             f"0={PCRS[0].hex()}"]
    out = json.loads(runner.invoke(app, [*check, "--json"]).stdout)
    assert out["bindings"]["tls_spki_sha256"] == IDENTITY.spki_sha256.hex()
    assert len(out["bindings"]["receipt_key"]) == 64 and out["bindings_error"] is None
    assert len(bytes.fromhex(out["nonce"])) == 32  # the client's own nonce: the document it verified
    text = runner.invoke(app, check).stdout
    assert f"tls_spki_sha256 {IDENTITY.spki_sha256.hex()}" in text


def test_fetch_with_a_nonce_binds_it(enclave: Enclave, tmp_path: Path) -> None:
    document, nonce = tmp_path / "doc.cose", "ab" * 16
    fetched = runner.invoke(app, ["attest", "fetch", *enclave.trust(), "--nonce", nonce, "-o", str(document)])
    assert fetched.exit_code == 0, fetched.output
    verified = _run(str(document), "--root", str(enclave.root), "--nonce", nonce)
    assert verified.exit_code == 0, verified.output


@pytest.mark.parametrize("args", [["--nonce", "zz"], ["--nonce", "ab" * 65], ["--nonce", ""],
                                  ["--expect-pcr", "0=abcd"]])
def test_fetch_usage_errors_exit_2(enclave: Enclave, tmp_path: Path, args: list[str]) -> None:
    result = runner.invoke(app, ["attest", "fetch", *enclave.trust(), *args, "-o", str(tmp_path / "d")])
    assert result.exit_code == 2, result.output
    assert not (tmp_path / "d").exists()
