"""The measured ``state_store`` section and the audit withholding bounds of the enclave config. Each rule
has a test that breaks only it. (The boot step is in test_boot_state_store.py, the shipper's bounds in
test_audit_withheld.py.)"""

from __future__ import annotations

import json
from typing import Any

import pytest

from enclave_app.config import EnclaveConfig, StateStoreConfig
from nitrovault.errors import ConfigError
from nitrovault.kms.trust import amazon_trust_services_pem

STORE = {"host": "master.nv-state.abc123.use1.cache.amazonaws.com", "ca_bundle": amazon_trust_services_pem()}


def _config(state_store: Any = None, **audit: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "model_id": "m", "model_version": "1", "handler": "generic:mlp-classifier",
        "kms_key_arn": "arn:aws:kms:us-east-1:111122223333:key/k", "region": "us-east-1",
        "encryption_context": {"model": "m", "version": "1"},
        "sealed_digest": "ab" * 32, "kms_ca_bundle": amazon_trust_services_pem(),
    }
    if state_store is not None:
        config["state_store"] = state_store
    if audit:
        config["audit"] = audit
    return config


def test_a_store_section_round_trips_and_defaults_its_namespace_to_the_model() -> None:
    config = EnclaveConfig.from_mapping(_config(STORE))
    assert config.state_store is not None
    assert EnclaveConfig.from_mapping(json.loads(config.to_json())) == config
    settings = config.state_store.settings("m")
    assert (settings.host, settings.ca_bundle, settings.username, settings.namespace, settings.timeout_s) == (
        STORE["host"], STORE["ca_bundle"], "nitrovault-enclave", "m", 0.5)
    assert config.ports.state_store == 8002
    assert EnclaveConfig.from_mapping(_config()).state_store is None  # no store: limits in memory
    assert json.loads(EnclaveConfig.from_mapping(_config()).to_json())["state_store"] is None


def test_every_store_key_round_trips_and_a_namespace_is_used_as_given() -> None:
    section: dict[str, Any] = {**STORE, "username": "svc-user", "namespace": "fleet-a", "timeout_ms": 10_000}
    config = EnclaveConfig.from_mapping(_config(section))
    assert config.state_store == StateStoreConfig(**section)
    assert json.loads(config.to_json())["state_store"] == section
    assert EnclaveConfig.from_mapping(json.loads(config.to_json())) == config
    settings = config.state_store.settings("m")
    assert (settings.username, settings.namespace, settings.timeout_s) == ("svc-user", "fleet-a", 10.0)
    assert StateStoreConfig(**{**section, "timeout_ms": 1}).settings("m").timeout_s == 0.001  # lower edge


@pytest.mark.parametrize(("change", "says"), [
    ({"port": 6379}, "unknown"),  # no port: the parent's proxy decides where bytes go, TLS decides trust
    ({"password": "x" * 20}, "unknown"),  # the password is sealed with the model, never measured
    ({"host": None}, "missing"),
    ({"ca_bundle": None}, "missing"),
    ({"ca_bundle": ""}, "ca_bundle"),
    ({"ca_bundle": "not a certificate"}, "ca_bundle"),
    ({"ca_bundle": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}, "ca_bundle"),
    ({"host": ""}, "bare host"),
    ({"host": "store.example:6379"}, "bare host"),
    ({"host": "store.example/x"}, "bare host"),
    ({"host": "rediss://store.example"}, "bare host"),
    ({"host": "store example"}, "bare host"),
    ({"host": "store.example\n"}, "bare host"),
    ({"host": "user@store.example"}, "bare host"),  # the build script and the config agree on names
    ({"host": "Store.Example"}, "bare host"),
    ({"host": "store.example?x"}, "bare host"),
    ({"host": "[::1]"}, "bare host"),
    ({"username": ""}, "must not be empty"),
    ({"timeout_ms": 0}, "timeout"),
    ({"timeout_ms": -1}, "timeout"),
    ({"timeout_ms": 10_001}, "timeout"),
    ({"timeout_ms": "500"}, "must be int"),
    ({"timeout_ms": 500.0}, "must be int"),
    ({"timeout_ms": True}, "must be int"),
    ({"host": 7}, "must be str"),
    ({"ca_bundle": ["pem"]}, "must be str"),
    ({"username": 1}, "must be str"),
    ({"namespace": ["a"]}, "must be str"),
])
def test_a_bad_store_section_is_refused(change: dict[str, Any], says: str) -> None:
    section = {k: v for k, v in {**STORE, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=says):
        EnclaveConfig.from_mapping(_config(section))


@pytest.mark.parametrize("section", ["store.example", ["store.example"], 1])
def test_a_store_section_that_is_not_an_object_is_refused(section: Any) -> None:
    with pytest.raises(ConfigError, match="must be an object"):
        EnclaveConfig.from_mapping(_config(section))


@pytest.mark.parametrize("bound", ["max_withheld_records", "max_withheld_s"])
def test_the_audit_withholding_bounds_are_at_least_one(bound: str) -> None:
    assert getattr(EnclaveConfig.from_mapping(_config(**{bound: 1})).audit, bound) == 1
    for bad in (0, -5):
        with pytest.raises(ConfigError, match="at least 1"):
            EnclaveConfig.from_mapping(_config(**{bound: bad}))
    with pytest.raises(ConfigError, match="must be int"):
        EnclaveConfig.from_mapping(_config(**{bound: "60"}))  # type: ignore[arg-type]


def test_the_audit_withholding_bounds_default_and_round_trip() -> None:
    config = EnclaveConfig.from_mapping(_config())
    assert (config.audit.max_withheld_records, config.audit.max_withheld_s) == (1000, 60)
    tuned = EnclaveConfig.from_mapping(_config(max_withheld_records=7, max_withheld_s=3))
    assert json.loads(tuned.to_json())["audit"]["max_withheld_records"] == 7
    assert EnclaveConfig.from_mapping(json.loads(tuned.to_json())) == tuned
