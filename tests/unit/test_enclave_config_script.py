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


def run(tmp_path: Path, config: dict[str, Any], sealed: Path,
        *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "in.json").write_text(json.dumps(config))
    return subprocess.run([sys.executable, str(SCRIPT), "--config", str(tmp_path / "in.json"),
                           "--sealed-model", str(sealed), "--output", str(tmp_path / "out.json"), *extra],
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


ENDPOINT = "master.nv-state.abc123.use1.cache.amazonaws.com"


def test_the_state_store_endpoint_and_its_ca_are_filled_in(tmp_path: Path, sealed: Path) -> None:
    kept = {**BASE, "state_store": {"host": "replaced.example", "ca_bundle": amazon_trust_services_pem(),
                                    "timeout_ms": 250, "username": "svc", "namespace": "fleet-a"}}
    result = run(tmp_path, kept, sealed, "--state-store-endpoint", ENDPOINT)
    assert result.returncode == 0, result.stderr
    store = json.loads((tmp_path / "out.json").read_text())["state_store"]
    assert (store["host"], store["timeout_ms"], store["username"], store["namespace"]) == (
        ENDPOINT, 250, "svc", "fleet-a")
    assert store["ca_bundle"] == amazon_trust_services_pem()
    result = run(tmp_path, BASE, sealed, "--state-store-endpoint", ENDPOINT)  # no section: the defaults
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out.json").read_text())["state_store"] == {
        "host": ENDPOINT, "ca_bundle": amazon_trust_services_pem(), "username": "nitrovault-enclave",
        "namespace": "", "timeout_ms": 500}
    assert run(tmp_path, BASE, sealed).returncode == 0  # without the flag: no store, nothing added
    assert json.loads((tmp_path / "out.json").read_text())["state_store"] is None
    ca = tmp_path / "store-ca.pem"
    first_root = amazon_trust_services_pem().split("-----END CERTIFICATE-----")[0]
    ca.write_text(first_root + "-----END CERTIFICATE-----\n")
    result = run(tmp_path, BASE, sealed, "--state-store-endpoint", ENDPOINT, "--state-store-ca", str(ca))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out.json").read_text())["state_store"]["ca_bundle"] == ca.read_text()


@pytest.mark.parametrize("endpoint", [f"{ENDPOINT}:6379", f"rediss://{ENDPOINT}", "two words",
                                      "UPPER.example", "edge-.example", f"{ENDPOINT}\nx", f"{ENDPOINT}\n",
                                      f" {ENDPOINT}", f"{ENDPOINT}\t", f"{ENDPOINT}/", f"user@{ENDPOINT}",
                                      "[::1]", ""])
def test_a_store_endpoint_that_is_not_a_bare_host_name_is_refused(tmp_path: Path, sealed: Path,
                                                                   endpoint: str) -> None:
    result = run(tmp_path, BASE, sealed, "--state-store-endpoint", endpoint)
    assert result.returncode != 0 and "bare host name" in result.stderr + result.stdout
    assert not (tmp_path / "out.json").exists()


def test_a_store_ca_without_an_endpoint_is_refused(tmp_path: Path, sealed: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text(amazon_trust_services_pem())
    result = run(tmp_path, BASE, sealed, "--state-store-ca", str(ca))
    assert result.returncode != 0 and "--state-store-endpoint" in result.stderr + result.stdout


def _first_root() -> str:
    return amazon_trust_services_pem().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"


def test_an_explicit_store_ca_replaces_the_configs_own(tmp_path: Path, sealed: Path) -> None:
    ca = tmp_path / "store-ca.pem"
    ca.write_text(_first_root())
    config = {**BASE, "state_store": {"host": "old.example", "ca_bundle": amazon_trust_services_pem()}}
    result = run(tmp_path, config, sealed, "--state-store-endpoint", ENDPOINT, "--state-store-ca", str(ca))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out.json").read_text())["state_store"]["ca_bundle"] == _first_root()
    config["state_store"]["ca_bundle"] = _first_root()  # no flag: the config's own CA is kept
    result = run(tmp_path, config, sealed, "--state-store-endpoint", ENDPOINT)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out.json").read_text())["state_store"]["ca_bundle"] == _first_root()


def test_a_store_ca_that_holds_no_certificate_fails_the_build(tmp_path: Path, sealed: Path) -> None:
    ca = tmp_path / "garbage.pem"
    ca.write_text("not a certificate\n")
    result = run(tmp_path, BASE, sealed, "--state-store-endpoint", ENDPOINT, "--state-store-ca", str(ca))
    assert result.returncode == 2 and "ConfigError" in result.stderr and "ca_bundle" in result.stderr
    assert not (tmp_path / "out.json").exists()


def test_a_missing_store_ca_file_fails_the_build(tmp_path: Path, sealed: Path) -> None:
    result = run(tmp_path, BASE, sealed, "--state-store-endpoint", ENDPOINT,
                 "--state-store-ca", str(tmp_path / "absent.pem"))
    assert result.returncode == 2 and "absent.pem" in result.stderr
    assert not (tmp_path / "out.json").exists()


def test_a_config_whose_state_store_is_not_an_object_is_refused(tmp_path: Path, sealed: Path) -> None:
    config = {**BASE, "state_store": "store.example"}
    result = run(tmp_path, config, sealed, "--state-store-endpoint", ENDPOINT)
    assert result.returncode != 0 and "state_store must be an object" in result.stderr + result.stdout
    assert not (tmp_path / "out.json").exists()


def test_build_enclave_passes_the_store_flags_through(tmp_path: Path, sealed: Path) -> None:
    (tmp_path / "in.json").write_text(json.dumps(BASE))
    ca = tmp_path / "ca.pem"
    ca.write_text(_first_root())
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "build_enclave.sh"), "--config", str(tmp_path / "in.json"),
         "--sealed-model", str(sealed), "--out-dir", str(tmp_path / "build"), "--dry-run",
         "--built-at", "2025-01-01T00:00:00Z",
         "--state-store-endpoint", ENDPOINT, "--state-store-ca", str(ca)],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if "enclave_config.py" in x)
    assert line.endswith(f"--state-store-endpoint {ENDPOINT} --state-store-ca {ca}"), line
    plain = subprocess.run(
        ["bash", str(REPO / "scripts" / "build_enclave.sh"), "--config", str(tmp_path / "in.json"),
         "--sealed-model", str(sealed), "--out-dir", str(tmp_path / "build"), "--dry-run",
         "--built-at", "2025-01-01T00:00:00Z"], capture_output=True, text=True, timeout=120, check=False)
    assert plain.returncode == 0, plain.stderr
    assert "--state-store" not in plain.stdout  # no flag: nothing passed (and no empty-array error)
