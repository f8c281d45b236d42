"""Committed sealed-format vectors (``tests/vectors/sealed``): positive decodes, negatives fail, no drift."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from safetensors.torch import load_file

from nitrovault.envelope import SealedModel
from nitrovault.envelope.format import ChunkCipher, check_commitment, derive_stream_key
from nitrovault.errors import KeyCommitmentError, LegacySealedFormatError, SealedModelError

REPO = Path(__file__).resolve().parents[2]
VECTORS = REPO / "tests" / "vectors" / "sealed"
MANIFEST: dict[str, Any] = json.loads((VECTORS / "vectors.json").read_text())
ATTACKS = {
    "header_byte_flipped",
    "commitment_flipped",
    "other_key_chunks",
    "chunk_byte_flipped",
    "swapped_chunks",
    "truncated",
    "appended_data",
    "wrong_encryption_context",
    "wrong_key",
}


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_sealed_vectors", REPO / "scripts" / "gen_sealed_vectors.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_manifest_hashes_match_files() -> None:
    for name, digest in MANIFEST["files"].items():
        assert hashlib.sha256((VECTORS / name).read_bytes()).hexdigest() == digest, name


def test_positive_vector_decodes_to_expected_tensors() -> None:
    pos = MANIFEST["positive"]
    model = SealedModel.open(VECTORS / pos["file"])
    h = model.header
    assert h.digest.hex() == pos["digest"]
    assert h.key_id == pos["key_id"] and dict(h.encryption_context) == pos["encryption_context"]
    assert h.wrapped_key.hex() == pos["wrapped_key_hex"] and h.chunk_size == MANIFEST["chunk_size"] == 64
    assert h.version == MANIFEST["format_version"] == 2 and h.commitment.hex() == pos["commitment_hex"]
    model.verify_key(bytes.fromhex(MANIFEST["data_key"]))
    assert h.chunk_count == pos["chunk_count"] > 10
    tensors = model.load_tensors(bytearray.fromhex(MANIFEST["data_key"]))
    assert tensors.keys() == pos["tensors"].keys()
    plain = load_file(str(VECTORS / pos["plain"]))  # the safetensors library agrees with our input file
    for name, want in pos["tensors"].items():
        t = tensors[name]
        assert list(t.shape) == want["shape"]
        assert (
            hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() == want["sha256"]
        )
        assert t.dtype == plain[name].dtype and torch.equal(t, plain[name])
    assert tensors["position_ids"].tolist() == [0, 1, 2, 3, -4]
    assert tensors["layers.0.norm.weight"].dtype == torch.bfloat16
    assert tensors["layers.0.norm.weight"].float().tolist() == [1 + i / 4 for i in range(8)]


def test_every_attack_has_a_vector() -> None:
    assert {n["name"] for n in MANIFEST["negative"]} == ATTACKS


@pytest.mark.parametrize("vector", MANIFEST["negative"], ids=lambda v: v["name"])
def test_negative_vector_fails_at_its_check(vector: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    decrypted: list[int] = []
    real_open = ChunkCipher.open_into

    def spy(self: ChunkCipher, i: int, sealed: memoryview, out: memoryview) -> None:
        decrypted.append(i)
        real_open(self, i, sealed, out)

    monkeypatch.setattr(ChunkCipher, "open_into", spy)
    with pytest.raises(SealedModelError) as exc:
        SealedModel.open(VECTORS / vector["file"]).load_tensors(bytes.fromhex(vector["data_key"]))
    assert exc.value.__cause__ is None
    if vector["error"] == "commitment":
        assert type(exc.value) is KeyCommitmentError and decrypted == []  # refused before any chunk
    else:
        assert type(exc.value) is SealedModelError and str(exc.value) == str(SealedModelError())


def test_the_forged_chunks_would_authenticate_without_the_commitment() -> None:
    """other_key_chunks is a complete forgery: every chunk opens under the other key with the genuine
    header's AAD, so the commitment is the only check that refuses it."""
    forged = VECTORS / "other_key_chunks.sealed"
    model = SealedModel.open(forged)
    assert model.header.raw == SealedModel.open(VECTORS / "model.sealed").header.raw
    other = bytes(range(1, 33))
    with pytest.raises(KeyCommitmentError):
        check_commitment(model.header, other)
    aead, h, data = AESGCM(derive_stream_key(other, model.header.salt)), model.header, forged.read_bytes()
    for i in range(h.chunk_count):
        start = h.chunk_offset(i)
        sealed = data[start:start + h.chunk_plain_len(i) + 16]
        nonce = h.nonce_prefix + i.to_bytes(4, "big") + (b"\x01" if i == h.chunk_count - 1 else b"\x00")
        aead.decrypt(nonce, sealed, h.digest)  # authenticates


def test_the_legacy_v1_vector_is_refused_unless_opted_in() -> None:
    legacy = MANIFEST["legacy_v1"]
    with pytest.raises(LegacySealedFormatError, match="version 1"):
        SealedModel.open(VECTORS / legacy["file"])
    model = SealedModel.open(VECTORS / legacy["file"], allow_legacy_v1=True)
    assert model.header.version == 1 and model.header.commitment == b""
    tensors = model.load_tensors(bytes.fromhex(legacy["data_key"]))
    assert tensors["position_ids"].tolist() == [0, 1, 2, 3, -4]


def test_check_mode_passes() -> None:
    assert _generator().main(["--check"]) == 0


def test_check_mode_detects_drift(tmp_path: Path) -> None:
    out = tmp_path / "v"
    shutil.copytree(VECTORS, out)
    gen = _generator()
    assert gen.main(["--check", "--out", str(out)]) == 0
    data = bytearray((out / "model.sealed").read_bytes())
    data[-1] ^= 1
    (out / "model.sealed").write_bytes(bytes(data))
    assert gen.main(["--check", "--out", str(out)]) == 1
