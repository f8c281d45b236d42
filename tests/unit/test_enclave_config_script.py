"""scripts/enclave_config.py: the image build pins the sealed model's digest and the KMS trust roots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import save_file

from nitrovault.envelope import SealedModel, seal_file
from nitrovault.kms.trust import amazon_trust_services_pem

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "enclave_config.py"
BASE: dict[str, Any] = {
    "model_id": "m", "model_version": "1", "handler": "generic:mlp-classifier",
    "kms_key_arn": "arn:aws:kms:us-east-1:111122223333:key/k", "region": "us-east-1",
    "encryption_context": {"model": "m", "version": "1"},
}


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import numpy as np

    folder = tmp_path_factory.mktemp("sealed")
    save_file({"w": np.zeros((4, 4), dtype=np.float32)}, str(folder / "m.safetensors"))
    seal_file(folder / "m.safetensors", folder / "m.sealed", data_key=bytearray(32), wrapped_key=b"w",
              key_id=BASE["kms_key_arn"], encryption_context=BASE["encryption_context"])
    return folder / "m.sealed"


def run(tmp_path: Path, config: dict[str, Any], sealed: Path) -> subprocess.CompletedProcess[str]:
    (tmp_path / "in.json").write_text(json.dumps(config))
    return subprocess.run([sys.executable, str(SCRIPT), "--config", str(tmp_path / "in.json"),
                           "--sealed-model", str(sealed), "--output", str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_digest_and_the_amazon_roots_are_filled_in(tmp_path: Path, sealed: Path) -> None:
    result = run(tmp_path, BASE, sealed)
    assert result.returncode == 0, result.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["sealed_digest"] == SealedModel.open(sealed).header.digest.hex()
    assert out["kms_ca_bundle"] == amazon_trust_services_pem()
    again = run(tmp_path, BASE, sealed)  # deterministic bytes, so a deterministic PCR2
    assert again.returncode == 0 and json.loads((tmp_path / "out.json").read_text()) == out


def test_a_config_pinning_another_model_is_refused(tmp_path: Path, sealed: Path) -> None:
    result = run(tmp_path, {**BASE, "sealed_digest": "00" * 32}, sealed)
    assert result.returncode != 0 and "sealed_digest" in result.stderr + result.stdout
    assert not (tmp_path / "out.json").exists()


def test_a_config_with_an_http_kms_endpoint_fails_the_build(tmp_path: Path, sealed: Path) -> None:
    result = run(tmp_path, {**BASE, "kms_endpoint_url": "http://127.0.0.1:4566"}, sealed)
    assert result.returncode == 2 and "https" in result.stderr
    assert not (tmp_path / "out.json").exists()


def test_a_missing_sealed_model_fails_the_build(tmp_path: Path) -> None:
    result = run(tmp_path, BASE, tmp_path / "absent.sealed")
    assert result.returncode == 2 and "error" in result.stderr
