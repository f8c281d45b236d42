"""The measured ``state_store`` section, the audit bounds, the boot step that opens the store with the
sealed password, and the audit shipper's withholding bounds. Each rule has a test that breaks only it."""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from enclave_app.boot import open_state_store
from enclave_app.config import EnclaveConfig
from enclave_app.host import AuditShipper
from nitrovault.audit import AuditWriter
from nitrovault.envelope.extras import STATE_STORE_PASSWORD_KEY
from nitrovault.errors import ConfigError, StateStoreCredentialError, StateStoreError
from nitrovault.kms.trust import amazon_trust_services_pem
from nitrovault.local.state_store import HOST, USERNAME
from nitrovault.state import StateStore

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
    assert (settings.host, settings.username, settings.namespace, settings.timeout_s) == (
        STORE["host"], "nitrovault-enclave", "m", 0.5)
    assert config.ports.state_store == 8002
    assert EnclaveConfig.from_mapping(_config()).state_store is None  # no store: limits in memory


@pytest.mark.parametrize(("change", "says"), [
    ({"port": 6379}, "unknown"),  # no port: the parent's proxy decides where bytes go, TLS decides trust
    ({"host": None}, "missing"),
    ({"ca_bundle": None}, "missing"),
    ({"ca_bundle": "not a certificate"}, "ca_bundle"),
    ({"host": "store.example:6379"}, "bare host"),
    ({"host": "store.example/x"}, "bare host"),
    ({"username": ""}, "must not be empty"),
    ({"timeout_ms": 0}, "timeout"),
    ({"timeout_ms": 10_001}, "timeout"),
    ({"timeout_ms": "500"}, "must be int"),
])
def test_a_bad_store_section_is_refused(change: dict[str, Any], says: str) -> None:
    section = {k: v for k, v in {**STORE, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=says):
        EnclaveConfig.from_mapping(_config(section))


@pytest.mark.parametrize("bound", ["max_withheld_records", "max_withheld_s"])
def test_the_audit_withholding_bounds_are_at_least_one(bound: str) -> None:
    assert getattr(EnclaveConfig.from_mapping(_config(**{bound: 1})).audit, bound) == 1
    with pytest.raises(ConfigError, match="at least 1"):
        EnclaveConfig.from_mapping(_config(**{bound: 0}))


# -- boot step ``state-store`` (a real redis-server) ------------------------------------------------------


def _local(server: Any) -> EnclaveConfig:
    return EnclaveConfig.from_mapping(_config({"host": HOST, "ca_bundle": server.ca_pem.decode(),
                                               "username": USERNAME, "timeout_ms": 2000}))


def _factory(config: EnclaveConfig, port: int) -> Any:
    assert config.state_store is not None
    settings = config.state_store.settings(config.model_id)
    return lambda password: StateStore.connect(
        settings, password, route=lambda: socket.create_connection(("127.0.0.1", port), 2.0))


def test_the_sealed_password_opens_the_store_and_leaves_the_metadata(state_store_server: Any) -> None:
    server, port, _ = state_store_server
    config = _local(server)
    metadata = {STATE_STORE_PASSWORD_KEY: server.password, "other": "kept"}
    store = open_state_store(config, metadata, _factory(config, port))
    assert store is not None
    store.ping()
    store.close()
    assert metadata == {"other": "kept"}  # the handler never sees the password


def test_without_a_store_the_password_is_still_taken_out() -> None:
    metadata = {STATE_STORE_PASSWORD_KEY: "sealed-for-another-config"}
    assert open_state_store(EnclaveConfig.from_mapping(_config()), metadata, None) is None
    assert metadata == {}


def test_a_store_without_a_sealed_password_fails_the_step(state_store_server: Any) -> None:
    server, port, _ = state_store_server
    config = _local(server)
    with pytest.raises(StateStoreError, match="carries no credential"):
        open_state_store(config, {}, _factory(config, port))


def test_a_refused_password_fails_the_boot(state_store_server: Any) -> None:
    server, port, _ = state_store_server
    config = _local(server)
    with pytest.raises(StateStoreCredentialError):
        open_state_store(config, {STATE_STORE_PASSWORD_KEY: "not-the-password"}, _factory(config, port))


def test_an_unreachable_store_does_not_stop_the_boot(state_store_server: Any) -> None:
    server, _, _ = state_store_server
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    config = _local(server)
    store = open_state_store(config, {STATE_STORE_PASSWORD_KEY: server.password}, _factory(config, closed))
    assert store is not None  # calls get UNAVAILABLE until it answers
    with pytest.raises(StateStoreError, match="unreachable"):
        store.ping()


# -- the shipper's bounds (fake parent, fake clock) ---------------------------------------------------------


class Parent:
    """An ``AuditAppend`` that fails on demand; ``failed`` is set once it has refused a batch."""

    def __init__(self) -> None:
        self.down = False
        self.failed = threading.Event()
        self.stored: list[bytes] = []

    def send(self, boot_id: str, lines: list[bytes]) -> None:
        if self.down:
            self.failed.set()
            raise ConnectionError("the parent stopped storing")
        self.stored.extend(lines)


def _rig(**bounds: Any) -> tuple[Parent, AuditShipper, AuditWriter, list[str | None], list[float]]:
    parent, reports, now = Parent(), [], [0.0]
    shipper = AuditShipper(parent.send, retry_s=0.05, linger_s=0, monotonic=lambda: now[0],
                           on_withheld=reports.append, **bounds)
    writer = AuditWriter(ed25519.Ed25519PrivateKey.generate(), sink=shipper, checkpoint_every=1000,
                         max_buffered=2)
    shipper.start(writer)
    return parent, shipper, writer, reports, now


def test_more_unstored_entries_than_the_bound_count_as_withheld() -> None:
    parent, shipper, writer, reports, _ = _rig(max_withheld=3, max_withheld_s=10**6)
    try:
        parent.down = True
        writer.append({"n": 0})
        assert parent.failed.wait(30)
        for i in range(1, 4):
            assert shipper.withheld() is None, i  # 1, 2, 3 unstored: within the bound
            writer.append({"n": i})
        reason = shipper.withheld()  # 4 (one queued, two buffered, one lost): over it
        assert reason is not None and "4 audit entries" in reason
        assert shipper.withheld() == reason and reports == [reason]  # announced once, not per call
        parent.down = False
        writer.flush()
        assert shipper.drain(30)
        writer.flush()  # the buffer's retries, then the gap entry
        assert shipper.drain(30)
        assert shipper.withheld() is None and reports == [reason, None]
    finally:
        shipper.stop()


def test_a_sink_down_longer_than_the_bound_counts_as_withheld() -> None:
    parent, shipper, writer, reports, now = _rig(max_withheld=10**6, max_withheld_s=60)
    try:
        parent.down = True
        writer.append({"n": 0})
        assert parent.failed.wait(30)
        now[0] = 60.0
        assert shipper.withheld() is None  # down for exactly the bound: still within it
        now[0] = 60.5
        reason = shipper.withheld()
        assert reason is not None and "60 s" in reason
        assert reports == [reason]
    finally:
        shipper.stop()
