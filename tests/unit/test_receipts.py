"""Receipts: sign, encode, verify against a local attestation document; each step has its own failure."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519

from nitrovault.bindings import EnclaveBindings
from nitrovault.errors import BindingError, ConfigError, ReceiptError
from nitrovault.local.nsm import LocalNsmDevice
from nitrovault.local.pki import LocalPki
from nitrovault.nsm import Nsm
from nitrovault.receipts import (
    AUDIT_GENESIS,
    USER_DATA_MAGIC,
    AuditPosition,
    Receipt,
    ReceiptSigner,
    enclave_user_data,
    key_id,
    public_key_from_user_data,
    verify_receipt,
)

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
PCR0 = bytes(range(48))
SEALED = hashlib.sha256(b"sealed header").digest()
REQUEST, RESPONSE = b"\x0a\x05hello", b"\x12\x08embedding"
HEAD = hashlib.sha256(b"audit entry 41").hexdigest()
POSITION = AuditPosition(42, HEAD)


@dataclass(frozen=True)
class Enclave:
    key: ed25519.Ed25519PrivateKey
    document: bytes
    root: x509.Certificate


def make_enclave(pki: LocalPki, *, pcr0: bytes = PCR0, user_data: bytes | None = None,
                 key: ed25519.Ed25519PrivateKey | None = None) -> Enclave:
    key = key or ed25519.Ed25519PrivateKey.generate()
    device = LocalNsmDevice(pki, pcrs={0: pcr0, 1: b"\x01" * 48, 2: b"\x02" * 48}, clock=lambda: NOW)
    data = enclave_user_data(key.public_key()) if user_data is None else user_data
    return Enclave(key, Nsm(device).attestation(user_data=data), pki.root)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPki:
    return LocalPki.ensure(tmp_path_factory.mktemp("pki"), clock=lambda: NOW)


@pytest.fixture(scope="module")
def enclave(pki: LocalPki) -> Enclave:
    return make_enclave(pki)


def signer_for(enclave: Enclave, *, pcr0: bytes = PCR0) -> ReceiptSigner:
    return ReceiptSigner(enclave.key, model_id="all-minilm-l6-v2", sealed_digest=SEALED, pcr0=pcr0,
                         clock=lambda: NOW + timedelta(hours=5))


def verify(enclave: Enclave, data: bytes, response: bytes | None = RESPONSE, *,
           document: bytes | None = None) -> Receipt:
    return verify_receipt(data, attestation_doc=document or enclave.document, root=enclave.root, at=NOW,
                          response=response)


def reason(enclave: Enclave, data: bytes, response: bytes | None = RESPONSE, **kw: bytes) -> str:
    with pytest.raises(ReceiptError) as info:
        verify(enclave, data, response, **kw)
    return info.value.reason


def test_receipt_fields_and_roundtrip(enclave: Enclave) -> None:
    signer = signer_for(enclave)
    receipt = signer.sign("alice", "Embed", REQUEST, RESPONSE)
    assert receipt.sequence == 0 and signer.sign("alice", "Embed", REQUEST, RESPONSE).sequence == 1
    assert receipt.key_id == hashlib.sha256(
        enclave.key.public_key().public_bytes_raw()).digest()[:16].hex() == key_id(enclave.key.public_key())
    assert receipt.request_sha256 == hashlib.sha256(REQUEST).digest()
    assert receipt.time == NOW + timedelta(hours=5)
    assert receipt.receipt_id == f"{receipt.key_id}:0"
    data = receipt.to_bytes()
    assert Receipt.from_bytes(data) == receipt
    assert len(data) < 512


def test_receipt_verifies(enclave: Enclave) -> None:
    data = signer_for(enclave).sign("alice", "Embed", REQUEST, RESPONSE).to_bytes()
    verified = verify(enclave, data)
    assert (verified.subject, verified.method, verified.pcr0) == ("alice", "Embed", PCR0)
    verify(enclave, data, response=None)  # response not checked


def test_altered_response(enclave: Enclave) -> None:
    data = signer_for(enclave).sign("alice", "Embed", REQUEST, RESPONSE).to_bytes()
    assert reason(enclave, data, RESPONSE + b"!") == "response"


def test_other_enclave_key(enclave: Enclave, pki: LocalPki) -> None:
    other = make_enclave(pki)
    data = signer_for(other).sign("alice", "Embed", REQUEST, RESPONSE).to_bytes()
    assert reason(enclave, data) == "other-key"


def test_forged_signature_same_key_id(enclave: Enclave) -> None:
    receipt = signer_for(enclave).sign("alice", "Embed", REQUEST, RESPONSE)
    body = cbor2.loads(receipt.body)
    body["sub"] = "mallory"
    forged_body = cbor2.dumps(body, canonical=True)
    forged = cbor2.dumps([forged_body, receipt.signature], canonical=True)
    assert reason(enclave, forged) == "signature"


def test_pcr0_mismatch(enclave: Enclave) -> None:
    data = signer_for(enclave, pcr0=b"\x07" * 48).sign("alice", "Embed", REQUEST, RESPONSE).to_bytes()
    assert reason(enclave, data) == "pcr0"


def test_attestation_failure(enclave: Enclave, tmp_path: Path) -> None:
    data = signer_for(enclave).sign("alice", "Embed", REQUEST, RESPONSE).to_bytes()
    other_root = LocalPki.ensure(tmp_path / "other", clock=lambda: NOW).root
    with pytest.raises(ReceiptError) as info:
        verify_receipt(data, attestation_doc=enclave.document, root=other_root, at=NOW, response=RESPONSE)
    assert info.value.reason == "attestation"
    with pytest.raises(ReceiptError) as late:
        verify_receipt(data, attestation_doc=enclave.document, root=enclave.root, at=NOW + timedelta(hours=4))
    assert late.value.reason == "attestation"


def test_document_without_key(enclave: Enclave, pki: LocalPki) -> None:
    data = signer_for(enclave).sign("alice", "Embed", REQUEST, RESPONSE).to_bytes()
    bare = make_enclave(pki, key=enclave.key, user_data=b"something else")
    assert reason(enclave, data, document=bare.document) == "no-key"


@pytest.mark.parametrize("mutate", [
    lambda d: d[:-1],
    lambda d: d + b"\x00",
    lambda d: b"\xa0",
    lambda d: cbor2.dumps([cbor2.loads(d)[0]]),
    lambda d: cbor2.dumps([cbor2.dumps({**cbor2.loads(cbor2.loads(d)[0]), "extra": 1}, canonical=True),
                           cbor2.loads(d)[1]]),
    lambda d: cbor2.dumps([cbor2.loads(d)[0], cbor2.loads(d)[1][:63]]),
    lambda d: cbor2.dumps([cbor2.dumps({**cbor2.loads(cbor2.loads(d)[0]), "pcr0": b"\x01" * 32},
                                       canonical=True), cbor2.loads(d)[1]]),
    lambda d: cbor2.dumps([cbor2.dumps({**cbor2.loads(cbor2.loads(d)[0]), "seq": True}, canonical=True),
                           cbor2.loads(d)[1]]),
])
def test_malformed(enclave: Enclave, mutate: object) -> None:
    data = signer_for(enclave).sign("alice", "Embed", REQUEST, RESPONSE).to_bytes()
    mutated = mutate(data)  # type: ignore[operator]
    with pytest.raises(ReceiptError) as info:
        Receipt.from_bytes(mutated)
    assert info.value.reason == "malformed"


def test_non_canonical_body_is_rejected(enclave: Enclave) -> None:
    receipt = signer_for(enclave).sign("alice", "Embed", REQUEST, RESPONSE)
    body = cbor2.loads(receipt.body)
    reordered = cbor2.dumps(dict(reversed(list(body.items()))))  # same map, non-canonical key order
    assert reordered != receipt.body
    with pytest.raises(ReceiptError, match="deterministic"):
        Receipt.from_bytes(cbor2.dumps([reordered, receipt.signature], canonical=True))


def test_user_data_layout() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    data = enclave_user_data(key.public_key())
    assert data == USER_DATA_MAGIC + b"\x01\x20" + key.public_key().public_bytes_raw()
    # room for more keys: unknown entries are skipped
    extended = data + b"\x7f\x03abc"
    assert public_key_from_user_data(extended).public_bytes_raw() == key.public_key().public_bytes_raw()
    spki = bytes(range(32))
    bound = enclave_user_data(key.public_key(), spki)
    assert bound == data + b"\x02\x20" + spki
    assert EnclaveBindings.parse(bound) == EnclaveBindings(key.public_key().public_bytes_raw(), spki)
    assert EnclaveBindings.parse(data).tls_spki_sha256 is None
    for bad_tls in (data + b"\x02\x05abcde", bound + b"\x02\x20" + spki):  # wrong length, twice
        with pytest.raises(BindingError):
            EnclaveBindings.parse(bad_tls)
    for bad in (None, b"", b"other", USER_DATA_MAGIC, data[:-1], data + data[len(USER_DATA_MAGIC):],
                USER_DATA_MAGIC + b"\x01\x05abcde"):
        with pytest.raises(ReceiptError) as info:
            public_key_from_user_data(bad)
        assert info.value.reason == "no-key"


# -- v2: the audit position ----------------------------------------------------------------------------------


def resign(enclave: Enclave, body: dict[str, object]) -> bytes:
    """A body the enclave's key really signed: only the layout can be wrong."""
    body_bytes = cbor2.dumps(body, canonical=True)
    return cbor2.dumps([body_bytes, enclave.key.sign(b"nitrovault-receipt-v1\x00" + body_bytes)],
                       canonical=True)


def test_v2_receipt_roundtrips_and_verifies(enclave: Enclave) -> None:
    signer = signer_for(enclave)
    receipt = signer.sign("alice", "Embed", REQUEST, RESPONSE, audit=POSITION)
    body = cbor2.loads(receipt.body)
    assert body["v"] == 2 and body["aseq"] == 42 and body["ahead"] == bytes.fromhex(HEAD)
    assert (receipt.version, receipt.audit_seq, receipt.audit_head) == (2, 42, HEAD)
    assert receipt.audit_position == POSITION
    data = receipt.to_bytes()
    assert Receipt.from_bytes(data) == receipt
    verified = verify(enclave, data)
    assert (verified.audit_seq, verified.audit_head, verified.sequence) == (42, HEAD, 0)
    assert len(data) < 512
    genesis = signer.sign("alice", "Embed", REQUEST, RESPONSE, audit=AuditPosition(0, AUDIT_GENESIS))
    assert verify(enclave, genesis.to_bytes()).audit_position == AuditPosition(0, AUDIT_GENESIS)


def test_v1_receipt_still_verifies(enclave: Enclave) -> None:
    receipt = signer_for(enclave).sign("alice", "Embed", REQUEST, RESPONSE)
    assert cbor2.loads(receipt.body)["v"] == 1 and "aseq" not in cbor2.loads(receipt.body)
    verified = verify(enclave, receipt.to_bytes())
    assert (verified.version, verified.audit_seq, verified.audit_head, verified.audit_position) == (
        1, None, None, None)


@pytest.mark.parametrize(("name", "value"), [("aseq", 41), ("aseq", 43), ("ahead", b"\x00" * 31 + b"\x01")])
def test_tampered_audit_position_breaks_the_signature(enclave: Enclave, name: str, value: object) -> None:
    receipt = signer_for(enclave).sign("alice", "Embed", REQUEST, RESPONSE, audit=POSITION)
    body = cbor2.loads(receipt.body)
    body[name] = value
    forged = cbor2.dumps([cbor2.dumps(body, canonical=True), receipt.signature], canonical=True)
    assert Receipt.from_bytes(forged).audit_seq in (41, 42, 43)  # the layout is fine: only the signature
    assert reason(enclave, forged) == "signature"


def test_downgrade_to_v1_breaks_the_signature(enclave: Enclave) -> None:
    receipt = signer_for(enclave).sign("alice", "Embed", REQUEST, RESPONSE, audit=POSITION)
    body = cbor2.loads(receipt.body)
    del body["aseq"], body["ahead"]
    body["v"] = 1
    stripped = cbor2.dumps([cbor2.dumps(body, canonical=True), receipt.signature], canonical=True)
    assert reason(enclave, stripped) == "signature"


@pytest.mark.parametrize("change", [
    {"aseq": True},
    {"aseq": -1},
    {"aseq": "42"},
    {"aseq": 1.0},
    {"ahead": b"\x01" * 31},
    {"ahead": b"\x01" * 33},
    {"ahead": HEAD},
    {"aseq": None},
    {"aseq": 0},  # the genesis head goes with aseq 0 only...
    {"ahead": b"\x00" * 32},  # ...and aseq 0 with the genesis head only
    {"v": 1},  # a v1 body carrying aseq/ahead
    {"v": 3},
    {"v": True},
    {"extra": 1},
    {"ahead": None, "drop": "ahead"},
    {"aseq": None, "drop": "aseq"},
])
def test_malformed_v2(enclave: Enclave, change: dict[str, object]) -> None:
    receipt = signer_for(enclave).sign("alice", "Embed", REQUEST, RESPONSE, audit=POSITION)
    body = {**cbor2.loads(receipt.body), **{k: v for k, v in change.items() if k != "drop"}}
    if "drop" in change:
        del body[str(change["drop"])]
    with pytest.raises(ReceiptError) as info:
        Receipt.from_bytes(resign(enclave, body))
    assert info.value.reason == "malformed"
    with pytest.raises(ReceiptError) as verified:
        verify(enclave, resign(enclave, body))
    assert verified.value.reason == "malformed"


def test_v1_body_with_one_audit_field_is_malformed(enclave: Enclave) -> None:
    body = cbor2.loads(signer_for(enclave).sign("alice", "Embed", REQUEST, RESPONSE).body)
    for extra in ({"aseq": 3}, {"ahead": bytes.fromhex(HEAD)}):
        with pytest.raises(ReceiptError) as info:
            Receipt.from_bytes(resign(enclave, {**body, **extra}))
        assert info.value.reason == "malformed"
    assert Receipt.from_bytes(resign(enclave, body)).audit_seq is None  # the helper itself is sound


@pytest.mark.parametrize(("seq", "head"), [(-1, HEAD), (1, AUDIT_GENESIS), (0, HEAD), (1, HEAD.upper()),
                                           (1, HEAD[:-2]), (True, HEAD)])
def test_audit_position_is_validated(seq: int, head: str) -> None:
    with pytest.raises(ConfigError):
        AuditPosition(seq, head)
