"""Boot step ``state-store``: :func:`enclave_app.boot.open_state_store` against the suite's real
redis-server (TLS, RBAC user, the sealed password), and how :func:`enclave_app.boot.boot` reports its
failures (``BootFailure(step="state-store", reason=<the message, naming no secret>)``)."""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

import enclave_app.boot as boot_module
from enclave_app.boot import BootFailure, BootResult, boot, open_state_store
from enclave_app.config import EnclaveConfig
from enclave_app.key_release import ReleaseTimings
from nitrovault.envelope import SealedModel, seal_file
from nitrovault.envelope.extras import STATE_STORE_PASSWORD_KEY
from nitrovault.errors import StateStoreCredentialError, StateStoreError
from nitrovault.identity import TlsIdentity
from nitrovault.kms import AwsCredentials
from nitrovault.kms.trust import amazon_trust_services_pem
from nitrovault.local.state_store import HOST, USERNAME
from nitrovault.state import StateStore

KEY = bytes(range(32))
CONTEXT = {"model": "m", "version": "1"}


def _config(state_store: Any = None, digest: str = "ab" * 32) -> EnclaveConfig:
    data: dict[str, Any] = {
        "model_id": "m", "model_version": "1", "handler": "generic:mlp-classifier",
        "kms_key_arn": "arn:aws:kms:us-east-1:111122223333:key/k", "region": "us-east-1",
        "encryption_context": CONTEXT, "sealed_digest": digest, "kms_ca_bundle": amazon_trust_services_pem(),
    }
    if state_store is not None:
        data["state_store"] = state_store
    return EnclaveConfig.from_mapping(data)


def _local(server: Any, digest: str = "ab" * 32) -> EnclaveConfig:
    """The measured config naming the test server (its CA, its RBAC user)."""
    return _config({"host": HOST, "ca_bundle": server.ca_pem.decode(), "username": USERNAME,
                    "timeout_ms": 2000}, digest)


def _factory(config: EnclaveConfig, port: int) -> Any:
    """What ``enclave_app.main`` builds, with a TCP route instead of vsock ``ports.state_store``."""
    assert config.state_store is not None
    settings = config.state_store.settings(config.model_id)
    return lambda password: StateStore.connect(
        settings, password, route=lambda: socket.create_connection(("127.0.0.1", port), 2.0))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- open_state_store ----------------------------------------------------------------------------------------


def test_without_a_store_none_and_the_password_is_still_taken_out() -> None:
    metadata = {STATE_STORE_PASSWORD_KEY: "sealed-for-another-config", "other": "kept"}
    assert open_state_store(_config(), metadata, None) is None
    assert metadata == {"other": "kept"}
    nothing: dict[str, str] = {}
    assert open_state_store(_config(), nothing, None) is None and nothing == {}


def test_the_sealed_password_opens_the_store_and_leaves_the_metadata(state_store_server: Any) -> None:
    server, port, _ = state_store_server
    config = _local(server)
    metadata = {STATE_STORE_PASSWORD_KEY: server.password, "other": "kept"}
    store = open_state_store(config, metadata, _factory(config, port))
    assert store is not None
    try:
        store.ping()
        assert store.settings.namespace == "m"  # empty namespace: the model id
    finally:
        store.close()
    assert metadata == {"other": "kept"}  # the handler never sees the password


def test_a_store_without_a_sealed_password_fails_the_step(state_store_server: Any) -> None:
    server, _, _ = state_store_server
    config = _local(server)
    called: list[str] = []

    def factory(password: str) -> StateStore:
        called.append(password)
        raise AssertionError("no credential: nothing to connect with")

    with pytest.raises(StateStoreError, match="carries no credential") as raised:
        open_state_store(config, {"other": "kept"}, factory)
    assert not isinstance(raised.value, StateStoreCredentialError)
    assert called == []  # nothing is tried without a credential


def test_a_store_without_a_route_fails_the_step(state_store_server: Any) -> None:
    server, _, _ = state_store_server
    metadata = {STATE_STORE_PASSWORD_KEY: server.password}
    with pytest.raises(StateStoreError, match="no route"):
        open_state_store(_local(server), metadata, None)
    assert metadata == {}


def test_a_refused_password_fails_the_step(state_store_server: Any) -> None:
    server, port, _ = state_store_server
    config = _local(server)
    wrong = "not-the-password-0123"
    metadata = {STATE_STORE_PASSWORD_KEY: wrong}
    with pytest.raises(StateStoreCredentialError) as raised:
        open_state_store(config, metadata, _factory(config, port))
    assert wrong not in str(raised.value) and server.password not in str(raised.value)
    assert metadata == {}


def test_an_unreachable_store_does_not_stop_the_boot(state_store_server: Any) -> None:
    server, _, _ = state_store_server
    config = _local(server)
    metadata = {STATE_STORE_PASSWORD_KEY: server.password}
    store = open_state_store(config, metadata, _factory(config, _closed_port()))
    assert store is not None  # calls get UNAVAILABLE until it answers
    try:
        with pytest.raises(StateStoreError, match="unreachable") as raised:
            store.ping()
        assert not isinstance(raised.value, StateStoreCredentialError)
    finally:
        store.close()
    assert metadata == {}


# -- boot(): the step's failures become BootFailure("state-store", <message>) --------------------------------


class _Host:
    def __init__(self, sealed: Path) -> None:
        self._sealed = sealed

    def credentials(self) -> AwsCredentials:
        return AwsCredentials("AKIDEXAMPLE", "secret", None)

    def sealed_model(self, model_id: str) -> Path:
        return self._sealed


def _sealed(tmp_path: Path, password: str | None) -> Path:
    metadata = TlsIdentity.generate(now=datetime.now(UTC)).sealed_metadata()
    if password is not None:
        metadata[STATE_STORE_PASSWORD_KEY] = password
    save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(tmp_path / "m.safetensors"), metadata=metadata)
    seal_file(tmp_path / "m.safetensors", tmp_path / "m.sealed", data_key=bytes(KEY), wrapped_key=b"w",
              key_id="arn:aws:kms:us-east-1:111122223333:key/k", encryption_context=CONTEXT)
    return tmp_path / "m.sealed"


def _boot(monkeypatch: pytest.MonkeyPatch, config: EnclaveConfig, sealed: Path, factory: Any) -> BootResult:
    """``boot`` with key release faked (attestation and KMS are other tests' business)."""
    monkeypatch.setattr(boot_module, "release_data_key",
                        lambda *args, **kwargs: (bytearray(KEY), ReleaseTimings(0.0, 0.0)))
    return boot(config, host=_Host(sealed), nsm=None, kms_factory=lambda credentials: None,  # type: ignore[arg-type,return-value]
         store_factory=factory)


def test_boot_reports_a_missing_sealed_password_as_the_state_store_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state_store_server: Any) -> None:
    server, port, _ = state_store_server
    sealed = _sealed(tmp_path, None)
    config = _local(server, SealedModel.open(sealed).header.digest.hex())
    with pytest.raises(BootFailure) as raised:
        _boot(monkeypatch, config, sealed, _factory(config, port))
    assert raised.value.step == "state-store"
    assert raised.value.reason.startswith("the measured config names a state store but the sealed model "
                                          "carries no credential")


def test_boot_reports_a_refused_password_without_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state_store_server: Any) -> None:
    server, port, _ = state_store_server
    wrong = "not-the-password-0123"
    sealed = _sealed(tmp_path, wrong)
    config = _local(server, SealedModel.open(sealed).header.digest.hex())
    with pytest.raises(BootFailure) as raised:
        _boot(monkeypatch, config, sealed, _factory(config, port))
    assert (raised.value.step, raised.value.reason) == (
        "state-store", "the state store refused the sealed credential")
    assert isinstance(raised.value.__cause__, StateStoreCredentialError)
    assert wrong not in str(raised.value)
