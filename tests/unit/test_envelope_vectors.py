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
from safetensors.torch import load_file

from nitrovault.envelope import SealedModel
from nitrovault.errors import SealedModelError

REPO = Path(__file__).resolve().parents[2]
VECTORS = REPO / "tests" / "vectors" / "sealed"
MANIFEST: dict[str, Any] = json.loads((VECTORS / "vectors.json").read_text())
ATTACKS = {
    "header_byte_flipped",
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
def test_negative_vector_fails_opaquely(vector: dict[str, str]) -> None:
    with pytest.raises(SealedModelError) as exc:
        SealedModel.open(VECTORS / vector["file"]).load_tensors(bytes.fromhex(vector["data_key"]))
    assert str(exc.value) == str(SealedModelError())


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
