"""``nitrovault seal`` / ``nitrovault inspect`` in process (offline keys, and KMS through a stub client)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from nitrovault.cli import app
from nitrovault.envelope import SealedModel
from nitrovault.errors import KeyAccessDeniedError
from nitrovault.identity import TlsIdentity

KEY = bytes(range(32))
runner = CliRunner()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({"secret.layer.weight": torch.randn(300, 7), "bias": torch.randn(5).bfloat16()}, str(path))
    return path


@pytest.fixture
def keyfiles(tmp_path: Path) -> list[str]:
    (tmp_path / "dk.bin").write_bytes(KEY)
    (tmp_path / "wk.bin").write_bytes(b"wrapped-blob")
    return ["--data-key-file", str(tmp_path / "dk.bin"), "--wrapped-key-file", str(tmp_path / "wk.bin")]


def test_seal_offline_then_inspect(tmp_path: Path, model: Path, keyfiles: list[str]) -> None:
    out = tmp_path / "model.sealed"
    args = ["seal", str(model), "--key-id", "alias/m", "--context", "model=m", "--context", "version=3"]
    result = runner.invoke(app, [*args, "-o", str(out), "--chunk-size", "4096", *keyfiles])
    assert result.exit_code == 0, result.output
    sealed = SealedModel.open(out)
    assert result.stdout.strip().splitlines()[-1] == sealed.header.digest.hex()
    assert dict(sealed.header.encryption_context) == {"model": "m", "version": "3"}
    assert sealed.header.wrapped_key == b"wrapped-blob" and sealed.header.chunk_size == 4096
    assert sealed.load_tensors(KEY)["secret.layer.weight"].shape == (300, 7)

    shown = runner.invoke(app, ["inspect", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.stdout)
    assert info["digest"] == sealed.header.digest.hex() and info["key_id"] == "alias/m"
    assert info["chunk_count"] == sealed.header.chunk_count and info["payload_size"] == 300 * 7 * 4 + 10
    text = runner.invoke(app, ["inspect", str(out)])
    assert text.exit_code == 0 and "alias/m" in text.stdout and "model=m, version=3" in text.stdout
    for output in (shown.stdout, text.stdout):
        assert "secret.layer" not in output and "bias" not in output


def test_inspect_of_tampered_header_exits_1(tmp_path: Path, model: Path, keyfiles: list[str]) -> None:
    out = tmp_path / "model.sealed"
    assert (
        runner.invoke(app, ["seal", str(model), "--key-id", "k", "-o", str(out), "-q", *keyfiles]).exit_code
        == 0
    )
    data = bytearray(out.read_bytes())
    data[9] ^= 1  # the version field
    out.write_bytes(bytes(data))
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 1 and "tampered" in result.stderr


def test_key_files_go_together(tmp_path: Path, model: Path, keyfiles: list[str]) -> None:
    result = runner.invoke(
        app, ["seal", str(model), "--key-id", "k", "-o", str(tmp_path / "o"), *keyfiles[:2]]
    )
    assert result.exit_code == 2
    assert not (tmp_path / "o").exists()


def test_bad_context_is_a_usage_error(tmp_path: Path, model: Path, keyfiles: list[str]) -> None:
    out = tmp_path / "o"
    result = runner.invoke(
        app, ["seal", str(model), "--key-id", "k", "--context", "novalue", "-o", str(out), *keyfiles]
    )
    assert result.exit_code == 2 and not out.exists()


def test_bad_input_exits_2_and_leaves_nothing(tmp_path: Path, keyfiles: list[str]) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x02" + bytes(7) + b"{]")
    result = runner.invoke(
        app, ["seal", str(bad), "--key-id", "k", "-o", str(tmp_path / "o"), "-q", *keyfiles]
    )
    assert result.exit_code == 2 and not (tmp_path / "o").exists()


@dataclass
class _DataKey:
    plaintext: bytes
    ciphertext_blob: bytes
    key_id: str


def test_seal_with_kms_generate_data_key(
    tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GenerateDataKey on the key with the context; the blob and the key ARN KMS answered go in the header."""
    calls: list[dict[str, Any]] = []

    class StubKmsClient:
        def __init__(self, boto_client: object) -> None:
            self.boto_client = boto_client

        def generate_data_key(
            self, key_id: str, *, encryption_context: dict[str, str], number_of_bytes: int
        ) -> _DataKey:
            calls.append({"key_id": key_id, "context": encryption_context, "n": number_of_bytes})
            return _DataKey(KEY, b"kms-ciphertext-blob", "arn:aws:kms:eu-west-1:111122223333:key/abc")

    def kms_client_from_env(
        region: str | None, endpoint_url: str | None = None, credentials: object = None
    ) -> object:
        calls.append({"region": region, "endpoint": endpoint_url})
        return object()

    stub = ModuleType("nitrovault.kms")
    stub.KmsClient = StubKmsClient  # type: ignore[attr-defined]
    stub.kms_client_from_env = kms_client_from_env  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nitrovault.kms", stub)
    out = tmp_path / "m.sealed"
    args = ["seal", str(model), "--key-id", "alias/m", "--context", "model=m", "-o", str(out)]
    result = runner.invoke(
        app, [*args, "--region", "eu-west-1", "--kms-endpoint", "http://127.0.0.1:9", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert calls == [
        {"region": "eu-west-1", "endpoint": "http://127.0.0.1:9"},
        {"key_id": "alias/m", "context": {"model": "m"}, "n": 32},
    ]
    header = SealedModel.open(out).header
    assert header.wrapped_key == b"kms-ciphertext-blob"
    assert header.key_id == "arn:aws:kms:eu-west-1:111122223333:key/abc"
    assert torch.equal(SealedModel.open(out).load_tensors(KEY)["bias"], load_file(str(model))["bias"])


def test_kms_refusal_exits_1_and_writes_nothing(
    tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class DenyingKmsClient:
        def __init__(self, boto_client: object) -> None:
            pass

        def generate_data_key(self, key_id: str, **kw: object) -> _DataKey:
            raise KeyAccessDeniedError("access denied")

    stub = ModuleType("nitrovault.kms")
    stub.KmsClient = DenyingKmsClient  # type: ignore[attr-defined]
    stub.kms_client_from_env = lambda region, endpoint_url=None, credentials=None: object()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nitrovault.kms", stub)
    out = tmp_path / "m.sealed"
    args = ["seal", str(model), "--key-id", "alias/m", "-o", str(out), "-q"]
    result = runner.invoke(app, [*args, "--region", "eu-west-1"])
    assert result.exit_code == 1 and "access denied" in result.stderr
    assert not out.exists()
    no_region = runner.invoke(app, args)  # AWS_* variables are stripped by the autouse fixture
    assert no_region.exit_code == 2 and "region" in no_region.stderr


def test_seal_with_owner_extras_releases_them_only_with_the_key(
    tmp_path: Path, model: Path, keyfiles: list[str]
) -> None:
    import numpy as np

    from nitrovault.envelope.extras import REFERENCE_TENSOR, WATERMARK_CANDIDATES_KEY, WATERMARK_SECRET_KEY

    secret = bytes(range(100, 132))
    (tmp_path / "owner.key").write_text(secret.hex() + "\n")
    (tmp_path / "words.txt").write_text("alpha beta\ngamma delta\n")
    reference = np.random.default_rng(0).random((6, 7)).astype(np.float32)
    np.save(tmp_path / "ref.npy", reference)
    out = tmp_path / "model.sealed"
    result = runner.invoke(app, [
        "seal", str(model), "--key-id", "alias/m", "-o", str(out), *keyfiles,
        "--watermark-key", str(tmp_path / "owner.key"), "--watermark-candidates", str(tmp_path / "words.txt"),
        "--reference", str(tmp_path / "ref.npy"),
    ])
    assert result.exit_code == 0, result.output
    sealed = SealedModel.open(out)
    metadata = sealed.metadata(KEY)
    assert metadata[WATERMARK_SECRET_KEY] == secret.hex()
    assert json.loads(metadata[WATERMARK_CANDIDATES_KEY]) == ["alpha", "beta", "gamma", "delta"]
    tensors = sealed.load_tensors(KEY)
    assert np.array_equal(tensors[REFERENCE_TENSOR].numpy(), reference)
    assert torch.equal(tensors["secret.layer.weight"], load_file(str(model))["secret.layer.weight"])
    assert secret.hex() not in out.read_bytes().hex()  # encrypted, like the weights
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".nitrovault-seal")) == []


def test_the_state_store_password_is_sealed_and_bad_ones_are_refused_unechoed(
    tmp_path: Path, model: Path, keyfiles: list[str]
) -> None:
    from nitrovault.envelope.extras import STATE_STORE_PASSWORD_KEY

    password = "Xq7-vT2pL9mZ4rW8kN3b"
    (tmp_path / "store.password").write_text(password + "\n")
    out = tmp_path / "model.sealed"
    result = runner.invoke(app, ["seal", str(model), "--key-id", "alias/m", "-o", str(out), *keyfiles,
                                 "--state-store-password-file", str(tmp_path / "store.password")])
    assert result.exit_code == 0, result.output
    assert SealedModel.open(out).metadata(KEY)[STATE_STORE_PASSWORD_KEY] == password
    assert password.encode() not in out.read_bytes()  # encrypted, like the weights
    out.unlink()
    for bad in ("short-one", "has a space in the middle!", 'quote"quote-quote-quote'):
        (tmp_path / "bad.password").write_text(bad)
        refused = runner.invoke(app, ["seal", str(model), "--key-id", "alias/m", "-o", str(out), *keyfiles,
                                      "--state-store-password-file", str(tmp_path / "bad.password")])
        assert refused.exit_code == 2, (bad, refused.output)
        assert "state store password" in refused.output and bad not in refused.output
        assert not out.exists()


def test_bad_extras_are_a_usage_error(tmp_path: Path, model: Path, keyfiles: list[str]) -> None:
    import numpy as np

    np.save(tmp_path / "ints.npy", np.arange(10).reshape(5, 2))
    (tmp_path / "short.key").write_bytes(b"too short")
    for option, path in (("--reference", "ints.npy"), ("--watermark-key", "short.key")):
        out = tmp_path / "model.sealed"
        result = runner.invoke(app, ["seal", str(model), "--key-id", "alias/m", "-o", str(out), *keyfiles,
                                     option, str(tmp_path / path)])
        assert result.exit_code == 2, (option, result.output)
        assert not out.exists()


def test_seal_carries_a_fresh_self_signed_tls_identity_by_default(
    tmp_path: Path, model: Path, keyfiles: list[str]
) -> None:
    out = tmp_path / "model.sealed"
    result = runner.invoke(app, ["seal", str(model), "--key-id", "k", "-o", str(out), "--tls-name",
                                 "models.example.internal", *keyfiles])
    assert result.exit_code == 0, result.output
    identity = TlsIdentity.from_sealed_metadata(SealedModel.open(out).metadata(KEY))
    assert identity is not None and identity.server_name == "models.example.internal"
    written = (tmp_path / "model.sealed.tls.pem").read_bytes()
    assert written == identity.chain_pem and b"PRIVATE KEY" not in written
    assert identity.fingerprint in result.stderr


def test_seal_takes_the_owners_key_and_chain_and_refuses_a_mismatch(
    tmp_path: Path, model: Path, keyfiles: list[str]
) -> None:
    owner = TlsIdentity.generate("owner.example.internal", now=datetime.now(UTC))
    other = TlsIdentity.generate("owner.example.internal", now=datetime.now(UTC))
    (tmp_path / "key.pem").write_bytes(owner.private_key_pem)
    (tmp_path / "chain.pem").write_bytes(owner.chain_pem)
    (tmp_path / "other.pem").write_bytes(other.chain_pem)
    out = tmp_path / "model.sealed"
    base = ["seal", str(model), "--key-id", "k", "-o", str(out), *keyfiles,
            "--tls-key", str(tmp_path / "key.pem")]
    ok = runner.invoke(app, [*base, "--tls-chain", str(tmp_path / "chain.pem")])
    assert ok.exit_code == 0, ok.output
    sealed = TlsIdentity.from_sealed_metadata(SealedModel.open(out).metadata(KEY))
    assert sealed is not None and sealed.spki_sha256 == owner.spki_sha256
    mismatch = runner.invoke(app, [*base, "--tls-chain", str(tmp_path / "other.pem")])
    assert mismatch.exit_code == 2 and "does not belong" in mismatch.output
    alone = runner.invoke(app, base)
    assert alone.exit_code == 2 and "go together" in alone.output
    assert "PRIVATE KEY" not in ok.output + mismatch.output + alone.output


def test_inspect_shows_a_legacy_v1_header_and_says_so() -> None:
    legacy = Path(__file__).resolve().parents[1] / "vectors" / "sealed" / "legacy_v1.sealed"
    shown = runner.invoke(app, ["inspect", str(legacy), "--json"])
    assert shown.exit_code == 0, shown.output
    summary = json.loads(shown.stdout)
    assert summary["version"] == 1 and summary["key_committing"] is False
    assert "not key-committing" in shown.stderr


def test_the_state_store_password_bounds_are_16_to_128_printable_ascii(
    tmp_path: Path, model: Path, keyfiles: list[str]
) -> None:
    from nitrovault.envelope.extras import STATE_STORE_PASSWORD_KEY

    out = tmp_path / "model.sealed"
    plain = runner.invoke(app, ["seal", str(model), "--key-id", "alias/m", "-o", str(out), *keyfiles])
    assert plain.exit_code == 0, plain.output
    assert STATE_STORE_PASSWORD_KEY not in SealedModel.open(out).metadata(KEY)  # no flag: no credential
    out.unlink()
    password_file = tmp_path / "store.password"
    for good in ("A" * 16, "b" * 128, "!#$%&'()*+,-.:;<=>?[]^_`{|}~0123"):
        password_file.write_text(good)
        result = runner.invoke(app, ["seal", str(model), "--key-id", "alias/m", "-o", str(out), *keyfiles,
                                     "--state-store-password-file", str(password_file)])
        assert result.exit_code == 0, (good, result.output)
        assert SealedModel.open(out).metadata(KEY)[STATE_STORE_PASSWORD_KEY] == good
        out.unlink()
    for bad in ("C" * 15, "d" * 129, "ünicode-password-long", "tab\tinside-the-password",
                "at@inside-password", "slash/inside-password", "two\nlines-of-password", ""):
        password_file.write_text(bad)
        refused = runner.invoke(app, ["seal", str(model), "--key-id", "alias/m", "-o", str(out), *keyfiles,
                                      "--state-store-password-file", str(password_file)])
        assert refused.exit_code == 2, (bad, refused.output)
        assert "state store password" in refused.output
        assert not bad or bad not in refused.output
        assert not out.exists()
    password_file.write_bytes(b"\xff" + b"e" * 20)  # not text at all
    refused = runner.invoke(app, ["seal", str(model), "--key-id", "alias/m", "-o", str(out), *keyfiles,
                                  "--state-store-password-file", str(password_file)])
    assert refused.exit_code == 2 and "e" * 20 not in refused.output and not out.exists()
    assert "state store password" in refused.output and "0xff" not in refused.output  # no byte echoed
