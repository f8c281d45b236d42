"""``nitrovault.client`` and the ``nitrovault embed`` / ``infer`` verbs on the confidential path, in process.

The server is the real :class:`enclave_app.server.EnclaveServer` (harness from ``test_enclave_server``)
with a sealed-style TLS identity: TLS ends in it, and every attestation document it serves binds that key.
The NSM is the local fake over a throwaway PKI whose root the clients are given (``Expect(root=...)``,
``--root``). It serves a fake model: fixed embeddings per text, the real MLP classifier for ``Infer`` plus
a bfloat16 output, and an unexpected exception on request. Every RPC records the metadata it received, so
a test sees whether, and on which call, the bearer token arrived.

Hostile parents are played by :class:`Impostor`: a TLS server holding some identity that answers
``Attest`` as it is told (a document captured earlier, or one relayed from the genuine enclave) and
records whatever else reaches it. Each broken step (:data:`BROKEN_STEPS`) fails only that step, in the
client and in the CLI, and no token reaches any server.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import shutil
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from test_enclave_server import (
    CONFIG,
    DIGEST,
    ISSUER,
    LIMITS,
    PCRS,
    TOKEN,
    ServerThread,
    mlp_handler,
    mlp_module,
    short_socket_dir,
)
from typer.testing import CliRunner

import nitrovault
from enclave_app.server import InferenceService
from nitrovault.cli import app, client_cmd
from nitrovault.client import Expect, ModelInfo, NitrovaultClient, ServingLimits
from nitrovault.clock import utc_now
from nitrovault.errors import (
    ClientError,
    ConfigError,
    DocumentTooOldError,
    NitrovaultError,
    NonceMismatchError,
    PCRMismatchError,
    TlsBindingError,
    TlsIdentityError,
    UntrustedRootError,
)
from nitrovault.identity import TlsIdentity
from nitrovault.local.nsm import make_local_nsm
from nitrovault.local.pki import LocalPki
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2 as pb

DIM = 6
NOW = datetime.now(UTC)
SERVER_NAME = "enclave.test.internal"
IDENTITY = TlsIdentity.generate(SERVER_NAME, now=NOW)
#: another key pair with the same name: what a parent that does not hold the enclave's key can present
OTHER_IDENTITY = TlsIdentity.generate(SERVER_NAME, now=NOW)
runner = CliRunner()
#: the CLI reads its token from the environment (or --token-file)
AUTH = {"NITROVAULT_TOKEN": TOKEN}


def fixed_vector(text: str, *, normalize: bool) -> np.ndarray:
    seed = sum(text.encode())
    vector = np.arange(1, DIM + 1, dtype=np.float32) * (1 + seed % 5)
    if text.startswith("neg"):
        vector = -vector
    return vector / np.linalg.norm(vector) if normalize else vector


class FakeModel:
    """Fixed embeddings, the real MLP for Infer (plus a bfloat16 copy of x), and a crash on input ``boom``."""

    kind = "test-fake"
    rows_independent = False

    def __init__(self) -> None:
        self.module = mlp_module()
        self.mlp = mlp_handler(self.module)

    def warm_up(self) -> None:
        pass

    def embed(self, texts: Sequence[str], *, normalize: bool) -> np.ndarray:
        return np.stack([fixed_vector(t, normalize=normalize) for t in texts])

    def infer(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "boom" in inputs:
            raise ZeroDivisionError("model internals that must stay inside")
        out = self.mlp.infer(inputs)
        out["x_bf16"] = inputs["x"].to(torch.bfloat16)
        return out


class Recorded:
    def __init__(self) -> None:
        self.metadata: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()

    def last(self, method: str) -> dict[str, str]:
        with self.lock:
            return next(md for m, md in reversed(self.metadata) if m == method)

    def since(self, mark: int) -> list[tuple[str, dict[str, str]]]:
        with self.lock:
            return list(self.metadata[mark:])


@pytest.fixture(scope="module")
def recorded() -> Recorded:
    return Recorded()


@pytest.fixture(scope="module")
def pki_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("client-pki") / "pki"


@pytest.fixture(scope="module")
def root(pki_root: Path) -> x509.Certificate:
    return LocalPki.ensure(pki_root).root


def start_server(pki_root: Path, identity: TlsIdentity = IDENTITY, *, serving: bool = True) -> ServerThread:
    directory = short_socket_dir()
    started = ServerThread(CONFIG, make_local_nsm(pki_root, PCRS), str(directory / "g.sock"), tls=identity)
    if serving:
        started.serve(FakeModel())
    return started


def stop_server(started: ServerThread) -> None:
    started.close()
    shutil.rmtree(Path(started.server.socket_path).parent, ignore_errors=True)


@pytest.fixture(scope="module")
def server(recorded: Recorded, pki_root: Path) -> Iterator[ServerThread]:
    """One serving TLS enclave for the module; each RPC first records its invocation metadata."""

    def recording(name: str) -> Any:
        original = getattr(InferenceService, name)

        async def wrapper(self: InferenceService, request: Any, context: Any) -> Any:
            with recorded.lock:
                recorded.metadata.append((name, dict(context.invocation_metadata() or ())))
            return await original(self, request, context)

        return wrapper

    with pytest.MonkeyPatch.context() as patch:
        for name in ("Embed", "Infer", "Info", "Attest"):
            patch.setattr(InferenceService, name, recording(name))
        started = start_server(pki_root)
    try:
        yield started
    finally:
        stop_server(started)


def expect_for(root: x509.Certificate, **changes: Any) -> Expect:
    values: dict[str, Any] = {"pcrs": {0: PCRS[0], 1: PCRS[1], 2: PCRS[2]}, "root": root}
    values.update(changes)
    return Expect(**values)


@pytest.fixture(scope="module")
def expect(root: x509.Certificate) -> Expect:
    return expect_for(root)


@pytest.fixture
def client(server: ServerThread, expect: Expect) -> Iterator[NitrovaultClient]:
    with NitrovaultClient(server.target, expect=expect, token=TOKEN, timeout=10) as c:
        yield c


def trust_args(pki_root: Path, pcr0: bytes = PCRS[0]) -> list[str]:
    """The CLI's trust options for the module's enclave."""
    return ["--expect-pcr", f"0={pcr0.hex()}", "--expect-pcr", f"2={PCRS[2].hex()}",
            "--root", str(pki_root / "root.pem")]


# -- impostors: what a hostile parent can run in the enclave's place ----------------------------------------


class Impostor:
    """A TLS server with ``identity`` on a unix socket: ``Attest`` answers ``answer(nonce)``, any other
    method UNIMPLEMENTED; every call's method and metadata are recorded in :attr:`calls`."""

    def __init__(self, identity: TlsIdentity, answer: Callable[[bytes], bytes]) -> None:
        self.directory = short_socket_dir()
        self.target = f"unix:{self.directory / 'g.sock'}"
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.answer = answer
        self.server = grpc.server(ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers((self._Handlers(self),))
        credentials = grpc.ssl_server_credentials([(identity.private_key_pem, identity.chain_pem)])
        self.server.add_secure_port(self.target, credentials)
        self.server.start()

    class _Handlers(grpc.GenericRpcHandler):  # type: ignore[misc]  # untyped base
        def __init__(self, impostor: Impostor) -> None:
            self.impostor = impostor

        def service(self, details: Any) -> grpc.RpcMethodHandler:
            method = str(details.method)

            def call(request: bytes, context: Any) -> bytes:
                self.impostor.calls.append((method, dict(context.invocation_metadata() or ())))
                if method != "/nitrovault.v1.Inference/Attest":
                    context.abort(grpc.StatusCode.UNIMPLEMENTED, "impostor")
                nonce = pb.AttestRequest.FromString(request).nonce
                return pb.AttestResponse(document=self.impostor.answer(nonce)).SerializeToString()

            return grpc.unary_unary_rpc_method_handler(call)

    def close(self) -> None:
        self.server.stop(None).wait(5)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def impostors() -> Iterator[Callable[[TlsIdentity, Callable[[bytes], bytes]], Impostor]]:
    started: list[Impostor] = []

    def start(identity: TlsIdentity, answer: Callable[[bytes], bytes]) -> Impostor:
        started.append(Impostor(identity, answer))
        return started[-1]

    yield start
    for impostor in started:
        impostor.close()


def genuine_attest(server: ServerThread, nonce: bytes) -> bytes:
    """A genuine document of the enclave binding ``nonce`` (what a relay to the enclave gets)."""
    credentials = grpc.ssl_channel_credentials(root_certificates=IDENTITY.leaf_pem)
    options = [("grpc.ssl_target_name_override", SERVER_NAME)]
    with grpc.secure_channel(server.target, credentials, options=options) as channel:
        attest = channel.unary_unary("/nitrovault.v1.Inference/Attest")
        raw = attest(pb.AttestRequest(nonce=nonce).SerializeToString(), timeout=10)
    return bytes(pb.AttestResponse.FromString(raw).document)


def owner_ca() -> tuple[bytes, TlsIdentity]:
    """An owner CA (PEM) and an identity for :data:`SERVER_NAME` it issued."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "owner test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(minutes=5)).not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     key_cert_sign=True, crl_sign=True, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(minutes=5)).not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    pem = serialization.Encoding.PEM
    return ca.public_bytes(pem), TlsIdentity.from_pem(key_pem, leaf.public_bytes(pem))


OWNER_CA, CA_IDENTITY = owner_ca()


@dataclass
class Broken:
    """One verification step broken, and nothing else."""

    target: str
    expect: Expect
    #: the same trust options for the CLI
    cli: list[str]
    error: type[NitrovaultError]
    step: str
    clock: Callable[[], datetime] | None = None
    #: every (method, metadata) any server saw from the client under test
    seen: Callable[[], list[tuple[str, dict[str, str]]]] = field(default=lambda: [])


BROKEN_STEPS = ["pcr", "root", "freshness", "nonce", "tls-binding", "tls"]


@pytest.fixture(params=BROKEN_STEPS)
def broken(request: pytest.FixtureRequest, server: ServerThread, recorded: Recorded, pki_root: Path,
           root: x509.Certificate, tmp_path: Path, impostors: Any) -> Broken:
    step, cli, target = request.param, trust_args(pki_root), server.target
    impostor_calls: list[tuple[str, dict[str, str]]] = []
    if step == "pcr":
        other = bytes([0xEE]) * 48
        case = Broken(target, expect_for(root, pcrs={0: other}), trust_args(pki_root, other),
                      PCRMismatchError, step)
    elif step == "root":
        other_root = LocalPki.ensure(tmp_path / "other")
        case = Broken(target, expect_for(root=other_root.root),
                      [*cli[:-1], str(other_root.root_path)], UntrustedRootError, step)
    elif step == "freshness":
        case = Broken(target, expect_for(root), cli, DocumentTooOldError, step,
                      clock=lambda: utc_now() + timedelta(minutes=30))
    elif step == "nonce":  # a relay answering Attest with a document it captured earlier
        captured = genuine_attest(server, b"an earlier client's nonce".ljust(32, b"\0"))
        impostor = impostors(IDENTITY, lambda nonce: captured)
        impostor_calls = impostor.calls
        case = Broken(impostor.target, expect_for(root), cli, NonceMismatchError, step)
    elif step == "tls-binding":  # another key, relaying the genuine enclave's answer to the client's nonce
        impostor = impostors(OTHER_IDENTITY, functools.partial(genuine_attest, server))
        impostor_calls = impostor.calls
        case = Broken(impostor.target, expect_for(root), cli, TlsBindingError, step)
    else:  # the enclave presents a certificate the owner's CA did not issue
        (tmp_path / "ca.pem").write_bytes(OWNER_CA)
        case = Broken(target, expect_for(root, ca=OWNER_CA), [*cli, "--ca-file", str(tmp_path / "ca.pem")],
                      TlsIdentityError, step)
    mark = len(recorded.metadata)
    case.seen = lambda: recorded.since(mark) + list(impostor_calls)
    return case


def assert_nothing_sent(seen: list[tuple[str, dict[str, str]]]) -> None:
    """At most Attest was called, and never with a token."""
    assert {method.rsplit("/", 1)[-1] for method, _ in seen} <= {"Attest"}, seen
    assert all("authorization" not in metadata for _, metadata in seen), seen


# -- calls ---------------------------------------------------------------------------------------------------


def test_embed_returns_the_models_vectors(client: NitrovaultClient) -> None:
    texts = ["alpha", "beta", "neg gamma"]
    vectors = client.embed(texts)
    assert vectors.dtype == np.float32 and vectors.shape == (3, DIM)
    np.testing.assert_array_equal(vectors, np.stack([fixed_vector(t, normalize=True) for t in texts]))
    vectors[0, 0] = 42.0  # a writable array, not a view of the response buffer
    raw = client.embed(texts, normalize=False)
    np.testing.assert_array_equal(raw[1], fixed_vector("beta", normalize=False))


def test_embed_refuses_a_single_string(client: NitrovaultClient) -> None:
    with pytest.raises(TypeError):
        client.embed("one text, not a list")


def test_infer_equals_the_torch_module_and_widens_bfloat16(client: NitrovaultClient) -> None:
    x = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)
    outputs = client.infer({"x": x})
    with torch.inference_mode():
        expected = mlp_module()(torch.from_numpy(x))
    assert set(outputs) == {"logits", "probabilities", "x_bf16"}
    np.testing.assert_allclose(outputs["logits"], expected["logits"].numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        outputs["probabilities"], expected["probabilities"].numpy(), rtol=1e-6, atol=1e-6
    )
    assert outputs["x_bf16"].dtype == np.float32
    np.testing.assert_array_equal(outputs["x_bf16"], torch.from_numpy(x).to(torch.bfloat16).float().numpy())


def test_info(client: NitrovaultClient) -> None:
    info = client.info()
    assert isinstance(info, ModelInfo)
    assert (info.model_id, info.model_version, info.sealed_digest) == ("mlp", "3", DIGEST)
    assert info.pcrs[0] == PCRS[0] and info.pcrs[3] == bytes(48)
    assert info.enclave_version == nitrovault.__version__
    assert info.max_batch == LIMITS.max_batch
    assert info.limits == ServingLimits(
        max_request_bytes=LIMITS.max_request_bytes,
        max_response_bytes=LIMITS.max_response_bytes,
        max_tensor_elements=LIMITS.max_tensor_elements,
        max_text_chars=LIMITS.max_text_chars,
        max_inflight=LIMITS.workers + LIMITS.queue_depth,
    )
    with pytest.raises(TypeError):
        info.pcrs[0] = b"x" * 48  # type: ignore[index]


def test_the_token_travels_only_after_the_attestation_and_never_with_attest(
    server: ServerThread, expect: Expect, recorded: Recorded
) -> None:
    mark = len(recorded.metadata)
    with NitrovaultClient(server.target, expect=expect, token=TOKEN, timeout=10) as client:
        client.embed(["a"])
        client.infer({"x": np.zeros((1, 8), np.float32)})
        client.info()
        client.attest(b"n")
    calls = recorded.since(mark)
    assert [method for method, _ in calls] == ["Attest", "Embed", "Infer", "Info", "Attest"]
    for method, metadata in calls:
        assert metadata.get("authorization") == (None if method == "Attest" else f"Bearer {TOKEN}")
    with NitrovaultClient(server.target, expect=expect) as anonymous, pytest.raises(ClientError) as refused:
        anonymous.info()
    assert "authorization" not in recorded.last("Info")
    assert refused.value.code == "UNAUTHENTICATED"


def test_a_token_that_cannot_travel_is_refused_without_echoing_it(expect: Expect) -> None:
    with pytest.raises(ConfigError) as caught:
        NitrovaultClient("127.0.0.1:1", expect=expect, token="secret-part\nsecond-line")
    assert "secret-part" not in str(caught.value)
    with pytest.raises(ConfigError):
        NitrovaultClient("127.0.0.1:1", expect=expect, token="")
    assert "secret" not in repr(NitrovaultClient("127.0.0.1:1", expect=expect, token="secret-token"))


def test_a_client_needs_expectations_or_says_it_is_unsafe(expect: Expect) -> None:
    with pytest.raises(ConfigError):
        NitrovaultClient("127.0.0.1:1", token=TOKEN)
    with pytest.raises(ConfigError):
        NitrovaultClient("127.0.0.1:1", expect=expect, unsafe_plaintext=True)
    with pytest.raises(ConfigError):
        Expect(pcrs={1: PCRS[1]})  # no PCR0: nothing about the image is proven


def test_unsafe_plaintext_warns_on_every_use_and_more_for_a_remote_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="nitrovault.client"):
        for target in ("127.0.0.1:1", "unix:/tmp/nowhere.sock"):
            NitrovaultClient(target, token=TOKEN, unsafe_plaintext=True).close()
        NitrovaultClient("inference.example.com:443", unsafe_plaintext=True).close()
        assert len(caplog.records) == 3 and "bearer token" not in caplog.text
        NitrovaultClient("inference.example.com:443", token=TOKEN, unsafe_plaintext=True).close()
    assert len(caplog.records) == 5 and "bearer token" in caplog.records[-1].getMessage()
    assert TOKEN not in caplog.text


# -- the verified connection -------------------------------------------------------------------------------


def test_connect_attests_with_a_fresh_nonce_and_pins_the_certificate(
    server: ServerThread, expect: Expect
) -> None:
    nonce = bytes(range(32))
    with NitrovaultClient(server.target, expect=expect, rng=lambda n: nonce[:n]) as client:
        verified = client.connect()
        assert verified.nonce == nonce and verified.pcrs[8] == PCRS[8]
        assert client.attestation is verified  # one verification per connection
        assert client.fingerprint == IDENTITY.fingerprint
        assert client.certificate_pem == IDENTITY.leaf_pem
    with NitrovaultClient(server.target, expect=expect) as other:
        fresh = other.connect().nonce
    assert fresh is not None and len(fresh) == 32 and fresh != nonce


def test_a_broken_step_fails_only_that_step_before_the_token_is_sent(broken: Broken) -> None:
    with NitrovaultClient(broken.target, expect=broken.expect, token=TOKEN, clock=broken.clock,
                          timeout=10) as client, pytest.raises(NitrovaultError) as caught:
        client.embed(["a"])
    assert type(caught.value) is broken.error and caught.value.step == broken.step
    assert_nothing_sent(broken.seen())


def test_a_certificate_the_owners_ca_issued_is_accepted(pki_root: Path, root: x509.Certificate) -> None:
    started = start_server(pki_root, CA_IDENTITY)
    try:
        with NitrovaultClient(started.target, expect=expect_for(root, ca=OWNER_CA), server_name=SERVER_NAME,
                              token=TOKEN) as client:
            assert client.embed(["a"]).shape == (1, DIM)
            assert client.fingerprint == CA_IDENTITY.fingerprint
        with NitrovaultClient(started.target, expect=expect_for(root, ca=OWNER_CA),
                              server_name="other.test.internal") as client, pytest.raises(TlsIdentityError):
            client.connect()  # the CA issued it for another name
    finally:
        stop_server(started)


# -- errors and health ---------------------------------------------------------------------------------------


def test_status_codes_become_client_errors(client: NitrovaultClient) -> None:
    with pytest.raises(ClientError) as invalid:
        client.infer({"x": np.zeros((LIMITS.max_batch + 1, 8), np.float32)})
    assert invalid.value.code == "INVALID_ARGUMENT" and "rows per call" in invalid.value.details
    with pytest.raises(ClientError) as nonce:
        client.attest(b"n" * 65)
    assert nonce.value.code == "INVALID_ARGUMENT"
    with pytest.raises(ClientError) as internal:
        client.infer({"x": np.zeros((1, 8), np.float32), "boom": np.zeros(1, np.float32)})
    assert internal.value.code == "INTERNAL"
    assert internal.value.correlation_id is not None
    assert internal.value.correlation_id in internal.value.details
    assert "inside" not in str(internal.value)
    with pytest.raises(ClientError) as oversized:
        client.embed(["y" * 90] * 800)
    assert oversized.value.code == "RESOURCE_EXHAUSTED"


def test_an_unreachable_target_is_unavailable(tmp_path: Path, expect: Expect) -> None:
    with NitrovaultClient(f"unix:{tmp_path}/none.sock", expect=expect, timeout=5) as c, \
            pytest.raises(ClientError) as down:
        c.info()
    assert down.value.code == "UNAVAILABLE"


def test_health(client: NitrovaultClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("nitrovault.v1.Inference") == "SERVING"
    with pytest.raises(ClientError) as unknown:
        client.health("no.such.Service")
    assert unknown.value.code == "NOT_FOUND"


def test_wait_until_serving(pki_root: Path, expect: Expect) -> None:
    server = start_server(pki_root, serving=False)
    try:
        with NitrovaultClient(server.target, expect=expect, timeout=5) as c:
            assert c.health() == "NOT_SERVING"  # attested before serving: Attest needs no model
            with pytest.raises(ClientError) as waited:
                c.wait_until_serving(0.2, poll=0.05)
            assert waited.value.code == "DEADLINE_EXCEEDED" and "NOT_SERVING" in waited.value.details
            server.serve(FakeModel())
            c.wait_until_serving(10)
            assert c.health() == "SERVING"
    finally:
        stop_server(server)


# -- the CLI -------------------------------------------------------------------------------------------------


def test_cli_embed_prints_vectors_and_similarities(server: ServerThread, pki_root: Path) -> None:
    args = ["embed", "alpha", "neg beta", "--similarity", "--target", server.target, *trust_args(pki_root)]
    result = runner.invoke(app, args, env=AUTH)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("[0] dim=6 norm=1.0000 [") and lines[0].endswith("alpha")
    assert lines[1].endswith("neg beta")
    assert lines[2] == "cosine similarity:"
    assert lines[4].split() == ["[0]", "1.000", "-1.000"]
    assert lines[5].split() == ["[1]", "-1.000", "1.000"]


def test_cli_embed_json(server: ServerThread, pki_root: Path) -> None:
    trust = trust_args(pki_root)
    args = ["embed", "alpha", "beta", "--json", "--no-normalize", "--similarity", "--target", server.target]
    result = runner.invoke(app, [*args, *trust], env=AUTH)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["dim"] == DIM and out["texts"] == ["alpha", "beta"]
    np.testing.assert_allclose(out["embeddings"][1], fixed_vector("beta", normalize=False))
    assert out["norms"][0] == pytest.approx(float(np.linalg.norm(fixed_vector("alpha", normalize=False))))
    assert out["similarity"][0][1] == pytest.approx(1.0)
    args = ["embed", "alpha", "--json", "--similarity", "--target", server.target, *trust]
    single = runner.invoke(app, args, env=AUTH)
    assert "similarity" not in json.loads(single.stdout)


def test_cli_takes_the_pcrs_from_the_build_manifest(
    server: ServerThread, pki_root: Path, tmp_path: Path
) -> None:
    manifest = tmp_path / "pcr-manifest.json"
    manifest.write_text(json.dumps({"pcrs": {str(i): PCRS[i].hex() for i in (0, 1, 2, 8)}}))
    base = ["embed", "a", "--target", server.target, "--root", str(pki_root / "root.pem"),
            "--pcr-manifest", str(manifest)]
    assert runner.invoke(app, base, env=AUTH).exit_code == 0
    agreeing = runner.invoke(app, [*base, "--expect-pcr", f"0={PCRS[0].hex()}"], env=AUTH)
    assert agreeing.exit_code == 0, agreeing.output
    contradicting = runner.invoke(app, [*base, "--expect-pcr", "0=" + "ee" * 48], env=AUTH)
    assert contradicting.exit_code == 2 and "PCR0 is given twice" in contradicting.output


def test_cli_token_comes_from_a_file_or_the_environment(
    server: ServerThread, recorded: Recorded, tmp_path: Path, pki_root: Path
) -> None:
    file_token, env_token = ISSUER.issue("file", ["embed:*"], 600), ISSUER.issue("env", ["embed:*"], 600)
    token_file = tmp_path / "token"
    token_file.write_text(file_token + "\n")
    trust = ["--target", server.target, *trust_args(pki_root)]
    result = runner.invoke(app, ["embed", "a", "--token-file", str(token_file), *trust],
                           env={"NITROVAULT_TOKEN": env_token})
    assert result.exit_code == 0, result.output
    assert recorded.last("Embed")["authorization"] == f"Bearer {file_token}"
    env = {"NITROVAULT_TOKEN": env_token}
    result = runner.invoke(app, ["embed", "a", *trust], env=env)
    assert result.exit_code == 0, result.output
    assert recorded.last("Embed")["authorization"] == f"Bearer {env_token}"
    assert env_token not in result.output
    refused = runner.invoke(app, ["embed", "a", "--token", "x", *trust], env=AUTH)
    assert refused.exit_code == 2


def test_cli_infer_writes_npz(server: ServerThread, tmp_path: Path, pki_root: Path) -> None:
    x = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out.npz"
    result = runner.invoke(
        app, ["infer", "--input", f"x={tmp_path / 'x.npy'}", "-o", str(out), "--target", server.target,
              *trust_args(pki_root)],
        env=AUTH,
    )
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines()]
    assert ["logits", "shape=[3,", "3]", "dtype=float32"] in rows
    assert ["x_bf16", "shape=[3,", "8]", "dtype=float32"] in rows
    with np.load(out, allow_pickle=False) as saved:
        assert set(saved.files) == {"logits", "probabilities", "x_bf16"}
        with torch.inference_mode():
            expected = mlp_module()(torch.from_numpy(x))["logits"].numpy()
        np.testing.assert_allclose(saved["logits"], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("verb", ["embed", "infer"])
def test_cli_saved_receipt_request_and_response_verify_offline(
    verb: str, server: ServerThread, tmp_path: Path, pki_root: Path
) -> None:
    np.save(tmp_path / "x.npy", np.ones((2, 8), np.float32))
    call = ["embed", "alpha", "beta"] if verb == "embed" else ["infer", "--input", f"x={tmp_path / 'x.npy'}"]
    saved = {name: tmp_path / f"{name}.bin" for name in ("receipt", "response", "request")}
    trust = ["--target", server.target, *trust_args(pki_root)]
    save = [arg for name, path in saved.items() for arg in (f"--save-{name}", str(path))]
    result = runner.invoke(app, [*call, *trust, *save], env=AUTH)
    assert result.exit_code == 0, result.output
    document = tmp_path / "boot.cose"
    assert runner.invoke(app, ["attest", "fetch", "-o", str(document), *trust]).exit_code == 0
    check = ["receipt", "verify", str(saved["receipt"]), "--attestation", str(document),
             "--root", str(pki_root / "root.pem"), "--response", str(saved["response"])]
    ok = runner.invoke(app, [*check, "--request", str(saved["request"]), "--json"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout)
    assert summary["request_checked"] and summary["response_checked"] and summary["subject"] == "tester"
    assert summary["method"] == verb.capitalize()
    other = tmp_path / "other-request.bin"
    other.write_bytes(saved["request"].read_bytes() + b"\x00")
    changed = runner.invoke(app, [*check, "--request", str(other)])
    assert changed.exit_code == 1 and changed.stderr.startswith("invalid: request: ")


def test_cli_no_verify_receipts_warns_on_every_use(server: ServerThread, pki_root: Path) -> None:
    args = ["embed", "a", "--no-verify-receipts", "--target", server.target, *trust_args(pki_root)]
    for _ in range(2):
        result = runner.invoke(app, args, env=AUTH)
        assert result.exit_code == 0, result.output
        assert result.stderr.startswith("WARNING: --no-verify-receipts")


def test_cli_a_call_error_exits_1(server: ServerThread, tmp_path: Path, pki_root: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((LIMITS.max_batch + 1, 8), np.float32))
    args = ["infer", "--input", f"x={tmp_path / 'x.npy'}", "--target", server.target, *trust_args(pki_root)]
    result = runner.invoke(app, args, env=AUTH)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: INVALID_ARGUMENT: at most 8 rows per call")
    down = runner.invoke(app, ["embed", "a", "--target", f"unix:{tmp_path}/none.sock", "--timeout", "3",
                               *trust_args(pki_root)])
    assert down.exit_code == 1
    assert down.stderr.startswith("error: UNAVAILABLE: ")


def test_cli_a_broken_step_exits_1_with_one_line_and_sends_no_token(
    broken: Broken, monkeypatch: pytest.MonkeyPatch
) -> None:
    if broken.clock is not None:  # the CLI runs on the wall clock: move the client's
        moved = functools.partial(NitrovaultClient, clock=broken.clock)
        monkeypatch.setattr(client_cmd, "NitrovaultClient", moved)
    result = runner.invoke(app, ["embed", "a", "--target", broken.target, *broken.cli], env=AUTH)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"error: {broken.step}: "), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert TOKEN not in result.output and TOKEN not in result.stderr
    assert_nothing_sent(broken.seen())


def test_cli_errors_never_print_the_token(server: ServerThread, tmp_path: Path, pki_root: Path) -> None:
    trust = ["--target", server.target, *trust_args(pki_root)]
    forged = TOKEN[:-4] + ("AAAA" if not TOKEN.endswith("AAAA") else "BBBB")  # a bad signature
    refused = runner.invoke(app, ["embed", "a", *trust], env={"NITROVAULT_TOKEN": forged})
    assert refused.exit_code == 1 and refused.stderr.startswith("error: UNAUTHENTICATED: ")
    untravelable = tmp_path / "token"
    untravelable.write_text("secret-part second-part\n")
    bad = runner.invoke(app, ["embed", "a", "--token-file", str(untravelable), *trust])
    assert bad.exit_code == 2
    for result, secret in ((refused, forged), (bad, "secret-part")):
        assert secret not in result.output and secret not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["embed"],
        ["infer"],
        ["infer", "--input", "no-equals-sign"],
        ["infer", "--input", "x=/nonexistent/x.npy"],
        ["infer", "--input", "x={pickle}"],
        ["infer", "--input", "x={npy}", "--input", "x={npy}"],
        ["infer", "--input", "x={complex}"],
        ["embed", "a", "--token-file", "/nonexistent/token"],
        ["embed", "a", "--token-file", "{empty}"],
        ["embed", "a", "--expect-pcr", "0=abcd"],
        ["embed", "a", "--root", "{empty}"],
        ["embed", "a", "--ca-file", "{empty}"],
        ["embed", "a", "--pcr-manifest", "{empty}"],
    ],
    ids=["no-texts", "no-inputs", "bad-spec", "missing-file", "pickled", "twice", "complex-dtype",
         "missing-token-file", "empty-token-file", "short-pcr", "bad-root", "bad-ca", "bad-manifest"],
)
def test_cli_usage_errors_exit_2(args: list[str], tmp_path: Path, pki_root: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 8), np.float32))
    np.save(tmp_path / "complex.npy", np.zeros((1, 8), np.complex64))  # loads, but cannot travel
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "empty").write_text("\n")
    files = {"npy": tmp_path / "x.npy", "complex": tmp_path / "complex.npy",
             "pickle": tmp_path / "pickled.npy", "empty": tmp_path / "empty"}
    args = [a.format(**files) for a in args]
    # the trust options first: for an option given twice the last one counts
    target = ["--target", f"unix:{tmp_path}/none.sock"]
    result = runner.invoke(app, [args[0], *trust_args(pki_root), *args[1:], *target])
    assert result.exit_code == 2, result.output


@pytest.mark.parametrize("verb", [["embed", "a"], ["infer", "--input", "x={npy}"],
                                  ["attest", "fetch", "-o", "{tmp}/d"], ["attest", "pin", "-o", "{tmp}/p"]])
def test_cli_without_pcr0_is_a_usage_error(verb: list[str], tmp_path: Path, pki_root: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 8), np.float32))
    args = [a.format(npy=tmp_path / "x.npy", tmp=tmp_path) for a in verb]
    result = runner.invoke(app, [*args, "--expect-pcr", f"1={PCRS[1].hex()}", "--root",
                                 str(pki_root / "root.pem"), "--target", f"unix:{tmp_path}/none.sock"])
    assert result.exit_code == 2 and "PCR0" in result.output


def test_write_npz_keeps_names_numpy_would_take_as_keywords(tmp_path: Path) -> None:
    from nitrovault.cli.client_cmd import _write_npz

    path = tmp_path / "o.npz"
    _write_npz(path, {"allow_pickle": np.arange(3), "file": np.ones(2, np.float32)})
    with np.load(path, allow_pickle=False) as saved:
        assert saved["allow_pickle"].tolist() == [0, 1, 2] and saved["file"].dtype == np.float32
    with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as archive:
        assert sorted(archive.namelist()) == ["allow_pickle.npy", "file.npy"]


def test_a_new_connection_is_attested_again_before_the_next_call(pki_root: Path, expect: Expect) -> None:
    """The instance behind the address restarts (same fleet identity, a new boot key): the client's next
    call first attests the new connection."""
    first = start_server(pki_root)
    socket_path = first.server.socket_path
    second: ServerThread | None = None
    try:
        with NitrovaultClient(first.target, expect=expect, token=TOKEN, timeout=10) as client:
            assert client.embed(["before"]).shape == (1, DIM)
            first_boot = client.attestation.document.user_data
            first.close()
            second = ServerThread(CONFIG, make_local_nsm(pki_root, PCRS), socket_path, tls=IDENTITY)
            second.serve(FakeModel())
            outcome = None
            for _ in range(3):  # the first call may still meet the dead connection
                try:
                    outcome = client.embed(["after"])
                    break
                except ClientError as err:
                    assert err.code == "UNAVAILABLE"
            assert outcome is not None and outcome.shape == (1, DIM)
            assert client.attestation.document.user_data != first_boot  # the new boot's receipt key
    finally:
        if second is not None:
            second.close()
        shutil.rmtree(Path(socket_path).parent, ignore_errors=True)
