"""The measured config's key-release section: a pinned model, TLS to KMS against a measured CA bundle, the
forwarder always on. Each rule has a test that breaks only it."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from enclave_app.config import DEFAULT_KMS_FORWARDER_PORT, EnclaveConfig
from enclave_app.key_release import SealedModelMismatchError, check_sealed_header
from nitrovault.errors import ConfigError
from nitrovault.kms.endpoints import kms_hostname
from nitrovault.kms.trust import AMAZON_ROOT_FINGERPRINTS, amazon_trust_services_pem

DIGEST = "ab" * 32


def _config(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model_id": "m", "model_version": "1", "handler": "generic:mlp-classifier",
        "kms_key_arn": "arn:aws:kms:eu-west-1:111122223333:key/k", "region": "eu-west-1",
        "encryption_context": {"model": "m", "version": "1"},
        "sealed_digest": DIGEST, "kms_ca_bundle": amazon_trust_services_pem(),
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def test_a_complete_config_reaches_the_real_endpoint_through_the_forwarder() -> None:
    config = EnclaveConfig.from_mapping(_config())
    assert config.kms_endpoint == "https://kms.eu-west-1.amazonaws.com"
    assert config.kms_forwarder_port == DEFAULT_KMS_FORWARDER_PORT
    assert config.kms_proxy_url == f"http://127.0.0.1:{DEFAULT_KMS_FORWARDER_PORT}"
    assert EnclaveConfig.from_mapping(__import__("json").loads(config.to_json())) == config


@pytest.mark.parametrize("digest", [None, "", "AB" * 32, "ab" * 31, "ab" * 33, "zz" * 32])
def test_the_sealed_digest_is_mandatory_and_exact(digest: str | None) -> None:
    with pytest.raises(ConfigError, match="sealed_digest"):
        EnclaveConfig.from_mapping(_config(sealed_digest=digest))


@pytest.mark.parametrize("url", ["http://kms.eu-west-1.amazonaws.com", "http://127.0.0.1:4566", "https://",
                                 "https://kms.eu-west-1.amazonaws.com/path", "https://u:p@kms.example",
                                 "ftp://kms.example", "kms.eu-west-1.amazonaws.com"])
def test_only_https_kms_endpoints(url: str) -> None:
    with pytest.raises(ConfigError, match="https"):
        EnclaveConfig.from_mapping(_config(kms_endpoint_url=url))


def test_an_explicit_https_endpoint_is_kept() -> None:
    config = EnclaveConfig.from_mapping(_config(kms_endpoint_url="https://kms-fips.eu-west-1.amazonaws.com"))
    assert config.kms_endpoint == "https://kms-fips.eu-west-1.amazonaws.com"


@pytest.mark.parametrize("bundle", [None, "", "not a certificate",
                                    "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"])
def test_the_ca_bundle_is_mandatory_and_must_hold_certificates(bundle: str | None) -> None:
    with pytest.raises(ConfigError, match="kms_ca_bundle"):
        EnclaveConfig.from_mapping(_config(kms_ca_bundle=bundle))


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_the_forwarder_cannot_be_turned_off(port: int) -> None:
    with pytest.raises(ConfigError, match="kms_forwarder_port"):
        EnclaveConfig.from_mapping(_config(kms_forwarder_port=port))


@pytest.mark.parametrize("region", ["", "EU-WEST-1", "eu-west-1.evil.com", "eu-west"])
def test_the_region_must_name_a_region(region: str) -> None:
    with pytest.raises(ConfigError, match="region"):
        EnclaveConfig.from_mapping(_config(region=region))


def test_kms_hostnames_per_partition() -> None:
    assert kms_hostname("us-east-1") == "kms.us-east-1.amazonaws.com"
    assert kms_hostname("us-gov-west-1") == "kms.us-gov-west-1.amazonaws.com"
    assert kms_hostname("cn-north-1") == "kms.cn-north-1.amazonaws.com.cn"


def test_the_packaged_bundle_is_amazon_trust_services_roots() -> None:
    certificates = x509.load_pem_x509_certificates(amazon_trust_services_pem().encode())
    fingerprints = tuple(c.fingerprint(hashes.SHA256()).hex() for c in certificates)
    assert fingerprints == AMAZON_ROOT_FINGERPRINTS
    assert all(c.subject == c.issuer for c in certificates)


class _Header:
    def __init__(self, digest: bytes, context: dict[str, str]) -> None:
        self.digest = digest
        self.encryption_context = context


def test_the_header_check_compares_the_pin() -> None:
    config = EnclaveConfig.from_mapping(_config())
    check_sealed_header(config, _Header(bytes.fromhex(DIGEST), {"model": "m", "version": "1"}))  # type: ignore[arg-type]
    with pytest.raises(SealedModelMismatchError, match="digest"):
        check_sealed_header(config, _Header(b"\x01" * 32, {"model": "m", "version": "1"}))  # type: ignore[arg-type]


def test_an_empty_pin_built_around_the_loader_matches_nothing() -> None:
    config = dataclasses.replace(EnclaveConfig.from_mapping(_config()), sealed_digest="")
    with pytest.raises(SealedModelMismatchError, match="digest"):
        check_sealed_header(config, _Header(bytes.fromhex(DIGEST), {"model": "m", "version": "1"}))  # type: ignore[arg-type]
