"""``nitrovault.client`` and the ``nitrovault embed`` / ``infer`` verbs against the in-process enclave server.

The server is the real :class:`enclave_app.server.EnclaveServer` (harness from ``test_enclave_server``)
serving a fake model: fixed embeddings per text, the real MLP classifier for ``Infer`` plus a bfloat16
output, and an unexpected exception on request. Every RPC records the metadata it received, so the test
can see the bearer token arrive.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import HealthServicer
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
from nitrovault.attestation import load_root
from nitrovault.cli import app
from nitrovault.client import ModelInfo, NitrovaultClient, ServingLimits
from nitrovault.errors import (
    AttestationError,
    ClientError,
    ConfigError,
    DocumentTooOldError,
    NonceMismatchError,
    PCRMismatchError,
)
from nitrovault.local.nsm import make_local_nsm
from nitrovault.local.pki import LocalPki

DIM = 6
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


@pytest.fixture(scope="module")
def recorded() -> Recorded:
    return Recorded()


@pytest.fixture(scope="module")
def pki_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("client-pki") / "pki"


@pytest.fixture(scope="module")
def server(recorded: Recorded, pki_root: Path) -> Iterator[ServerThread]:
    """One serving enclave for the module; each RPC first records its invocation metadata."""

    def recording(name: str) -> Any:
        original = getattr(InferenceService, name)

        async def wrapper(self: InferenceService, request: Any, context: Any) -> Any:
            with recorded.lock:
                recorded.metadata.append((name, dict(context.invocation_metadata() or ())))
            return await original(self, request, context)

        return wrapper

    directory = short_socket_dir()
    with pytest.MonkeyPatch.context() as patch:
        for name in ("Embed", "Infer", "Info", "Attest"):
            patch.setattr(InferenceService, name, recording(name))
        started = ServerThread(CONFIG, make_local_nsm(pki_root, PCRS), str(directory / "g.sock"))
    started.serve(FakeModel())
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def client(server: ServerThread) -> Iterator[NitrovaultClient]:
    with NitrovaultClient(server.target, token=TOKEN, timeout=10) as c:
        yield c


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


def test_the_token_arrives_as_bearer_metadata_on_every_call(
    server: ServerThread, client: NitrovaultClient, recorded: Recorded
) -> None:
    client.embed(["a"])
    client.infer({"x": np.zeros((1, 8), np.float32)})
    client.info()
    client.attest(b"n")
    for method in ("Embed", "Infer", "Info", "Attest"):
        assert recorded.last(method)["authorization"] == f"Bearer {TOKEN}"
    with NitrovaultClient(server.target) as anonymous, pytest.raises(ClientError) as refused:
        anonymous.info()
    assert "authorization" not in recorded.last("Info")
    assert refused.value.code == "UNAUTHENTICATED"


def test_a_token_that_cannot_travel_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as caught:
        NitrovaultClient("127.0.0.1:1", token="secret-part\nsecond-line")
    assert "secret-part" not in str(caught.value)
    with pytest.raises(ConfigError):
        NitrovaultClient("127.0.0.1:1", token="")
    assert "secret" not in repr(NitrovaultClient("127.0.0.1:1", token="secret-token"))


def test_a_token_over_plaintext_to_a_remote_host_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nitrovault.client"):
        NitrovaultClient("127.0.0.1:1", token=TOKEN).close()
        NitrovaultClient("unix:/tmp/nowhere.sock", token=TOKEN).close()
        NitrovaultClient("inference.example.com:443").close()
        assert caplog.records == []
        NitrovaultClient("inference.example.com:443", token=TOKEN).close()
    assert len(caplog.records) == 1
    assert TOKEN not in caplog.text
    with pytest.raises(ConfigError):
        NitrovaultClient("inference.example.com:443", server_name="enclave")  # TLS-only option


# -- attestation ---------------------------------------------------------------------------------------------


def test_attest_verified_binds_a_fresh_nonce(client: NitrovaultClient, pki_root: Path) -> None:
    nonce = bytes(range(32))
    verified = client.attest_verified(
        root=load_root(pki_root / "root.pem"), expect_pcrs={0: PCRS[0], 2: PCRS[2]}, rng=lambda n: nonce[:n]
    )
    assert verified.nonce == nonce
    assert verified.pcrs[8] == PCRS[8]
    other = client.attest_verified(root=load_root(pki_root / "root.pem"))
    assert other.nonce is not None and len(other.nonce) == 32 and other.nonce != nonce


def test_attest_verified_rejects_a_wrong_pcr(client: NitrovaultClient, pki_root: Path) -> None:
    with pytest.raises(PCRMismatchError):
        client.attest_verified(root=load_root(pki_root / "root.pem"), expect_pcrs={0: bytes(48)})


def test_attest_verified_rejects_another_root(client: NitrovaultClient, tmp_path: Path) -> None:
    with pytest.raises(AttestationError) as caught:
        client.attest_verified(root=LocalPki.ensure(tmp_path / "other").root)
    assert not isinstance(caught.value, PCRMismatchError | NonceMismatchError)


def test_attest_verified_rejects_a_replayed_document(
    client: NitrovaultClient, pki_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    replayed = client.attest(b"an old nonce".ljust(32, b"\0"))
    monkeypatch.setattr(client, "attest", lambda nonce=None: replayed)
    with pytest.raises(NonceMismatchError):
        client.attest_verified(root=load_root(pki_root / "root.pem"))


def test_attest_verified_rejects_a_stale_document(client: NitrovaultClient, pki_root: Path) -> None:
    with pytest.raises(DocumentTooOldError):
        client.attest_verified(
            root=load_root(pki_root / "root.pem"), at=datetime.now(UTC) + timedelta(minutes=6)
        )


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


def test_an_unreachable_target_is_unavailable(tmp_path: Path) -> None:
    started = time.monotonic()
    with NitrovaultClient(f"unix:{tmp_path}/none.sock", timeout=5) as c, pytest.raises(ClientError) as down:
        c.info()
    assert down.value.code == "UNAVAILABLE"
    assert time.monotonic() - started < 4


def test_health(client: NitrovaultClient) -> None:
    assert client.health() == "SERVING"
    assert client.health("nitrovault.v1.Inference") == "SERVING"
    with pytest.raises(ClientError) as unknown:
        client.health("no.such.Service")
    assert unknown.value.code == "NOT_FOUND"


def test_wait_until_serving(pki_root: Path) -> None:
    directory = short_socket_dir()
    server = ServerThread(CONFIG, make_local_nsm(pki_root, PCRS), str(directory / "g.sock"))
    try:
        with NitrovaultClient(server.target, timeout=5) as c:
            assert c.health() == "NOT_SERVING"
            with pytest.raises(ClientError) as waited:
                c.wait_until_serving(0.3)
            assert waited.value.code == "DEADLINE_EXCEEDED" and "NOT_SERVING" in waited.value.details
            timer = threading.Timer(0.3, server.serve, args=(FakeModel(),))
            timer.start()
            started = time.monotonic()
            c.wait_until_serving(5)
            assert 0.2 < time.monotonic() - started < 3
            timer.join()
    finally:
        server.close()


# -- the CLI -------------------------------------------------------------------------------------------------


def test_cli_embed_prints_vectors_and_similarities(server: ServerThread) -> None:
    args = ["embed", "alpha", "neg beta", "--similarity", "--target", server.target]
    result = runner.invoke(app, args, env=AUTH)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("[0] dim=6 norm=1.0000 [") and lines[0].endswith("alpha")
    assert lines[1].endswith("neg beta")
    assert lines[2] == "cosine similarity:"
    assert lines[4].split() == ["[0]", "1.000", "-1.000"]
    assert lines[5].split() == ["[1]", "-1.000", "1.000"]


def test_cli_embed_json(server: ServerThread) -> None:
    args = ["embed", "alpha", "beta", "--json", "--no-normalize", "--similarity", "--target", server.target]
    result = runner.invoke(app, args, env=AUTH)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["dim"] == DIM and out["texts"] == ["alpha", "beta"]
    np.testing.assert_allclose(out["embeddings"][1], fixed_vector("beta", normalize=False))
    assert out["norms"][0] == pytest.approx(float(np.linalg.norm(fixed_vector("alpha", normalize=False))))
    assert out["similarity"][0][1] == pytest.approx(1.0)
    args = ["embed", "alpha", "--json", "--similarity", "--target", server.target]
    single = runner.invoke(app, args, env=AUTH)
    assert "similarity" not in json.loads(single.stdout)


def test_cli_token_comes_from_a_file_or_the_environment(
    server: ServerThread, recorded: Recorded, tmp_path: Path
) -> None:
    file_token, env_token = ISSUER.issue("file", ["embed:*"], 600), ISSUER.issue("env", ["embed:*"], 600)
    token_file = tmp_path / "token"
    token_file.write_text(file_token + "\n")
    result = runner.invoke(
        app, ["embed", "a", "--token-file", str(token_file), "--target", server.target],
        env={"NITROVAULT_TOKEN": env_token},
    )
    assert result.exit_code == 0, result.output
    assert recorded.last("Embed")["authorization"] == f"Bearer {file_token}"
    env = {"NITROVAULT_TOKEN": env_token}
    result = runner.invoke(app, ["embed", "a", "--target", server.target], env=env)
    assert result.exit_code == 0, result.output
    assert recorded.last("Embed")["authorization"] == f"Bearer {env_token}"
    assert env_token not in result.output
    refused = runner.invoke(app, ["embed", "a", "--token", "x", "--target", server.target], env=AUTH)
    assert refused.exit_code == 2


def test_cli_infer_writes_npz(server: ServerThread, tmp_path: Path) -> None:
    x = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out.npz"
    result = runner.invoke(
        app, ["infer", "--input", f"x={tmp_path / 'x.npy'}", "-o", str(out), "--target", server.target],
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


def test_cli_a_call_error_exits_1(server: ServerThread, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((LIMITS.max_batch + 1, 8), np.float32))
    args = ["infer", "--input", f"x={tmp_path / 'x.npy'}", "--target", server.target]
    result = runner.invoke(app, args, env=AUTH)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: INVALID_ARGUMENT: at most 8 rows per call")
    down = runner.invoke(app, ["embed", "a", "--target", f"unix:{tmp_path}/none.sock", "--timeout", "3"])
    assert down.exit_code == 1
    assert down.stderr.startswith("error: UNAVAILABLE: ")


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
        ["embed", "a", "--server-name", "enclave"],
    ],
    ids=["no-texts", "no-inputs", "bad-spec", "missing-file", "pickled", "twice", "complex-dtype",
         "missing-token-file", "empty-token-file", "server-name-without-tls"],
)
def test_cli_usage_errors_exit_2(args: list[str], tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 8), np.float32))
    np.save(tmp_path / "complex.npy", np.zeros((1, 8), np.complex64))  # loads, but cannot travel
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "empty").write_text("\n")
    files = {"npy": tmp_path / "x.npy", "complex": tmp_path / "complex.npy",
             "pickle": tmp_path / "pickled.npy", "empty": tmp_path / "empty"}
    args = [a.format(**files) for a in args]
    result = runner.invoke(app, [*args, "--target", f"unix:{tmp_path}/none.sock"])
    assert result.exit_code == 2, result.output


def test_write_npz_keeps_names_numpy_would_take_as_keywords(tmp_path: Path) -> None:
    from nitrovault.cli.client_cmd import _write_npz

    path = tmp_path / "o.npz"
    _write_npz(path, {"allow_pickle": np.arange(3), "file": np.ones(2, np.float32)})
    with np.load(path, allow_pickle=False) as saved:
        assert saved["allow_pickle"].tolist() == [0, 1, 2] and saved["file"].dtype == np.float32
    with zipfile.ZipFile(io.BytesIO(path.read_bytes())) as archive:
        assert sorted(archive.namelist()) == ["allow_pickle.npy", "file.npy"]


# -- TLS ----------------------------------------------------------------------------------------------------


def _self_signed(name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_tls_with_root_certificates_and_a_name_override() -> None:
    cert, key = _self_signed("enclave.nitrovault.test")
    health = HealthServicer()
    health.set("", health_pb2.HealthCheckResponse.SERVING)
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    target = f"127.0.0.1:{port}"
    try:
        with NitrovaultClient(
            target, root_certificates=cert, server_name="enclave.nitrovault.test", timeout=5
        ) as c:
            assert c.health() == "SERVING"
        # the certificate does not name 127.0.0.1: without the override the handshake fails
        with (
            NitrovaultClient(target, root_certificates=cert, timeout=2) as c,
            pytest.raises(ClientError) as bad,
        ):
            c.health()
        assert bad.value.code == "UNAVAILABLE"
        # a client that does not trust the certificate cannot talk to it either
        other, _ = _self_signed("enclave.nitrovault.test")
        with NitrovaultClient(
            target, root_certificates=other, server_name="enclave.nitrovault.test", timeout=2
        ) as c, pytest.raises(ClientError) as untrusted:
            c.health()
        assert untrusted.value.code == "UNAVAILABLE"
    finally:
        server.stop(None).wait(5)
