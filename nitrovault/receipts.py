"""Signed receipts: every response carries proof of which enclave, model and inputs produced it.

At boot the enclave makes an Ed25519 key (from NSM randomness) and binds its public key into the
attestation document's ``user_data`` (:func:`enclave_user_data`). Each response then carries a
:class:`Receipt` signed with that key; anyone holding the attestation document verifies it offline with
:func:`verify_receipt`. The same key signs the audit log's checkpoints (:mod:`nitrovault.audit`).

``user_data`` layout: :mod:`nitrovault.bindings` (type 0x01 is the Ed25519 receipt/audit public key).

Receipt encoding: **deterministic CBOR** (RFC 8949 §4.2 core deterministic encoding, ``cbor2`` with
``canonical=True``), chosen over canonical JSON because the hashes, digests and PCR travel as byte strings
without an extra text encoding, the receipt fits gRPC binary trailing metadata, and ``cbor2`` is already
what the attestation documents need. Wire form::

    receipt = [ body: bstr, signature: bstr(64) ]          ; a CBOR array of two byte strings
    body    = canonical CBOR map {"v": 1 | 2, "model": tstr, "sealed": bstr(32), "pcr0": bstr(48),
              "sub": tstr, "method": tstr, "t": uint (Unix ms), "req": bstr(32), "resp": bstr(32),
              "seq": uint (per boot, from 0), "kid": tstr (hex SHA-256(raw public key)[:16]),
              ; version 2 only, both present:
              "aseq": uint (audit position: seq the audit log's next chained entry gets),
              "ahead": bstr(32) (hash of the audit entry aseq-1; 32 zero bytes when aseq is 0)}
    signature = Ed25519(key, b"nitrovault-receipt-v1\\x00" || body)

``req``/``resp`` are SHA-256 of the serialized request and response messages. The signature covers the
exact ``body`` bytes received, and a body that is not in canonical form is rejected, so one receipt has
one encoding. Version 2 bodies (:meth:`ReceiptSigner.sign` with ``audit=``) also carry the audit log
position the call's record extends (:class:`AuditPosition`, taken from
:meth:`nitrovault.audit.AuditWriter.position` before the record is appended): whoever holds the receipt
can prove that the log has an entry ``aseq - 1`` with hash ``ahead`` and that the call's record comes
at ``seq >= aseq`` (``nitrovault.audit.verify_audit(receipts=...)``), so the parent cannot withhold the
log's tail unnoticed. Version 1 bodies (no audit position) still verify.
Verification steps (:func:`verify_receipt`), each failing with :class:`~nitrovault.errors.ReceiptError`
whose ``reason`` names it:

1. ``malformed``: the receipt does not decode to the layout above: not ``[bstr, bstr(64)]``, a body with
   missing or unknown keys for its version (a v1 body carrying ``aseq``/``ahead``, a v2 body without
   them), a field of the wrong type or length (``aseq`` not an unsigned integer, ``ahead`` not 32 bytes),
   ``aseq`` 0 with a non-zero ``ahead``, an unknown version, or a body not in deterministic form;
2. ``attestation``: the attestation document does not verify (``nitrovault.attestation.verify_document``);
3. ``no-key``: its ``user_data`` does not carry a receipt key in the layout above;
4. ``other-key``: the receipt's ``kid`` is not that key's (signed by another enclave or boot);
5. ``signature``: the Ed25519 signature does not verify (it covers ``aseq``/``ahead`` too);
6. ``pcr0``: the receipt's PCR0 is not the document's;
7. ``response``: (only when the response bytes are given) their SHA-256 is not the receipt's ``resp``;
8. ``request``: (only when the request bytes are given) their SHA-256 is not the receipt's ``req``.

Example::

    signer = ReceiptSigner(key, model_id="m", sealed_digest=digest, pcr0=pcr0)
    receipt = signer.sign("alice", "Embed", request_bytes, response_bytes, audit=writer.position())
    verify_receipt(receipt.to_bytes(), attestation_doc=doc, root=root, at=doc_time, response=response_bytes)
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from nitrovault.attestation import verify_document
from nitrovault.bindings import USER_DATA_MAGIC, EnclaveBindings
from nitrovault.clock import Clock, utc_now
from nitrovault.errors import AttestationError, BindingError, ConfigError, ReceiptError

__all__ = [
    "AUDIT_GENESIS",
    "MAX_RECEIPT_BYTES",
    "USER_DATA_MAGIC",
    "AuditPosition",
    "Receipt",
    "ReceiptSigner",
    "check_receipt",
    "enclave_user_data",
    "key_id",
    "public_key_from_user_data",
    "verify_receipt",
]


RECEIPT_VERSION = 1  #: bodies without an audit position
RECEIPT_VERSION_AUDIT = 2  #: bodies with ``aseq``/``ahead``
AUDIT_GENESIS = "0" * 64  #: the audit chain's ``prev`` at seq 0 (``nitrovault.audit.GENESIS``)
MAX_RECEIPT_BYTES = 2048
_SIGNING_CONTEXT = b"nitrovault-receipt-v1\x00"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_BODY_FIELDS: dict[str, type[Any]] = {
    "v": int, "model": str, "sealed": bytes, "pcr0": bytes, "sub": str, "method": str, "t": int,
    "req": bytes, "resp": bytes, "seq": int, "kid": str,
}
_AUDIT_FIELDS: dict[str, type[Any]] = {"aseq": int, "ahead": bytes}
_FIELDS_BY_VERSION = {RECEIPT_VERSION: _BODY_FIELDS, RECEIPT_VERSION_AUDIT: {**_BODY_FIELDS, **_AUDIT_FIELDS}}
_LENGTHS = {"sealed": 32, "pcr0": 48, "req": 32, "resp": 32, "ahead": 32}



def _raw(public_key: ed25519.Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """The receipt/audit key id: hex of the first 16 bytes of SHA-256 of the raw 32-byte public key."""
    return hashlib.sha256(_raw(public_key)).digest()[:16].hex()


# -- user_data binding ---------------------------------------------------------------------------------------


def enclave_user_data(public_key: ed25519.Ed25519PublicKey, tls_spki_sha256: bytes | None = None) -> bytes:
    """The attestation ``user_data`` binding the receipt/audit key (and the TLS key, once known)."""
    return EnclaveBindings(receipt_key=_raw(public_key), tls_spki_sha256=tls_spki_sha256).encode()


def public_key_from_user_data(user_data: bytes | None) -> ed25519.Ed25519PublicKey:
    """The receipt/audit key bound in ``user_data``; ``ReceiptError`` (``no-key``) when absent/invalid."""
    try:
        bindings = EnclaveBindings.parse(user_data)
    except BindingError as err:
        raise ReceiptError("no-key", str(err)) from None
    return ed25519.Ed25519PublicKey.from_public_bytes(bindings.receipt_key)


# -- receipts ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditPosition:
    """Where the audit chain stands: ``seq`` is the seq the next chained entry gets, ``head`` the hex
    hash of entry ``seq - 1`` (:data:`AUDIT_GENESIS` at seq 0). Defined here, not in
    :mod:`nitrovault.audit` (which re-exports it), because the audit module imports this one."""

    seq: int
    head: str

    def __post_init__(self) -> None:
        if (isinstance(self.seq, bool) or not isinstance(self.seq, int) or self.seq < 0
                or not isinstance(self.head, str) or not re.fullmatch(r"[0-9a-f]{64}", self.head)
                or (self.seq == 0) != (self.head == AUDIT_GENESIS)):
            raise ConfigError("an audit position is a seq >= 0 and a 64-digit lowercase hex head "
                              "(the genesis head exactly at seq 0)")


@dataclass(frozen=True)
class Receipt:
    """A decoded receipt. Fields mirror the CBOR body; ``body`` and ``signature`` are the signed bytes."""

    model_id: str
    sealed_digest: bytes  #: SHA-256 of the sealed model's header (``SealedHeader.digest``)
    pcr0: bytes  #: 48 bytes
    subject: str
    method: str
    time: datetime  #: aware UTC, millisecond precision
    request_sha256: bytes
    response_sha256: bytes
    sequence: int  #: per boot, from 0
    key_id: str
    body: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    audit_seq: int | None = None  #: v2: the audit position's seq at signing time (None in v1)
    audit_head: str | None = None  #: v2: hex hash of audit entry ``audit_seq - 1`` (None in v1)

    @property
    def version(self) -> int:
        return RECEIPT_VERSION if self.audit_seq is None else RECEIPT_VERSION_AUDIT

    @property
    def audit_position(self) -> AuditPosition | None:
        """The audit position the receipt extends (v2), ``None`` for a v1 receipt."""
        if self.audit_seq is None or self.audit_head is None:
            return None
        return AuditPosition(self.audit_seq, self.audit_head)

    @property
    def receipt_id(self) -> str:
        """``<key_id>:<sequence>``: unique per enclave boot, what the audit record refers to."""
        return f"{self.key_id}:{self.sequence}"

    def to_bytes(self) -> bytes:
        return cbor2.dumps([self.body, self.signature], canonical=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> Receipt:
        """Decode (step 1 of verification); does not check the signature."""
        if len(data) > MAX_RECEIPT_BYTES:
            raise ReceiptError("malformed", "receipt is too large")
        outer = _loads(data)
        if (not isinstance(outer, list) or len(outer) != 2
                or not all(isinstance(x, bytes) for x in outer)
                or cbor2.dumps(outer, canonical=True) != data):
            raise ReceiptError("malformed", "receipt is not [body, signature]")
        body_bytes, signature = outer
        body = _loads(body_bytes)
        version = body.get("v") if isinstance(body, dict) else None
        fields = _FIELDS_BY_VERSION.get(version) if type(version) is int else None
        if fields is None:
            raise ReceiptError("malformed", "receipt body is not a map of a known version")
        if set(body) != set(fields):
            raise ReceiptError("malformed", f"receipt body has missing or unknown fields for v{version}")
        for name, kind in fields.items():
            value = body[name]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ReceiptError("malformed", f"receipt field {name!r} has the wrong type")
            if name in _LENGTHS and len(value) != _LENGTHS[name]:  # value is bytes here
                raise ReceiptError("malformed", f"receipt field {name!r} has the wrong length")
        if body["t"] < 0 or body["seq"] < 0 or len(signature) != 64:
            raise ReceiptError("malformed", "bad receipt field value")
        audit_seq: int | None = None
        audit_head: str | None = None
        if version == RECEIPT_VERSION_AUDIT:
            audit_seq, audit_head = body["aseq"], body["ahead"].hex()
            if audit_seq < 0 or (audit_seq == 0) != (audit_head == AUDIT_GENESIS):
                raise ReceiptError("malformed", "receipt audit position is not a valid one "
                                                "(the genesis head goes with aseq 0, and only with it)")
        if cbor2.dumps(body, canonical=True) != body_bytes:
            raise ReceiptError("malformed", "receipt body is not in deterministic CBOR form")
        return cls(
            model_id=body["model"], sealed_digest=body["sealed"], pcr0=body["pcr0"], subject=body["sub"],
            method=body["method"], time=_EPOCH + timedelta(milliseconds=body["t"]),
            request_sha256=body["req"], response_sha256=body["resp"], sequence=body["seq"],
            key_id=body["kid"], body=body_bytes, signature=signature,
            audit_seq=audit_seq, audit_head=audit_head,
        )


def _loads(data: bytes) -> Any:
    try:
        return cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, EOFError):
        raise ReceiptError("malformed", "receipt is not valid CBOR") from None


class ReceiptSigner:
    """Signs one receipt per response with the enclave's boot key. Thread-safe (the sequence is locked)."""

    def __init__(self, private_key: ed25519.Ed25519PrivateKey, *, model_id: str, sealed_digest: bytes,
                 pcr0: bytes, clock: Clock = utc_now) -> None:
        if len(pcr0) != 48 or len(sealed_digest) != 32 or not model_id:
            raise ConfigError("receipts need a model id, a 32-byte sealed digest and a 48-byte PCR0")
        self._key = private_key
        self._model_id = model_id
        self._sealed = bytes(sealed_digest)
        self._pcr0 = bytes(pcr0)
        self._clock = clock
        self._kid = key_id(private_key.public_key())
        self._seq = 0
        self._lock = threading.Lock()

    @property
    def key_id(self) -> str:
        return self._kid

    def sign(self, subject: str, method: str, request_bytes: bytes, response_bytes: bytes, *,
             audit: AuditPosition | None = None) -> Receipt:
        """Sign one response. With ``audit`` (:meth:`nitrovault.audit.AuditWriter.position`, taken before
        the call's record is appended) the body is version 2 and binds that audit position."""
        if audit is not None and not isinstance(audit, AuditPosition):
            raise ConfigError("audit must be an AuditPosition")
        now_ms = (self._clock() - _EPOCH) // timedelta(milliseconds=1)
        with self._lock:
            seq = self._seq
            self._seq += 1
        req, resp = hashlib.sha256(request_bytes).digest(), hashlib.sha256(response_bytes).digest()
        body: dict[str, str | int | bytes] = {
            "v": RECEIPT_VERSION, "model": self._model_id, "sealed": self._sealed, "pcr0": self._pcr0,
            "sub": subject, "method": method, "t": now_ms,
            "req": req, "resp": resp,
            "seq": seq, "kid": self._kid,
        }
        if audit is not None:
            body.update(v=RECEIPT_VERSION_AUDIT, aseq=audit.seq, ahead=bytes.fromhex(audit.head))
        body_bytes = cbor2.dumps(body, canonical=True)
        signature = self._key.sign(_SIGNING_CONTEXT + body_bytes)
        return Receipt(
            model_id=self._model_id, sealed_digest=self._sealed, pcr0=self._pcr0, subject=subject,
            method=method, time=_EPOCH + timedelta(milliseconds=now_ms), request_sha256=req,
            response_sha256=resp, sequence=seq, key_id=self._kid, body=body_bytes, signature=signature,
            audit_seq=None if audit is None else audit.seq, audit_head=None if audit is None else audit.head,
        )


def verify_receipt(receipt_bytes: bytes, *, attestation_doc: bytes, root: x509.Certificate | None,
                   at: datetime, response: bytes | None = None, request: bytes | None = None) -> Receipt:
    """Run verification steps 1-8 (module docstring); return the verified receipt.

    ``root=None`` means the pinned AWS Nitro root; ``at`` is the time the attestation document is checked
    at (a recorded document only verifies at a pinned time, usually its own timestamp).
    """
    receipt = Receipt.from_bytes(receipt_bytes)  # 1
    try:
        verified = verify_document(attestation_doc, at=at, root=root)  # 2
    except AttestationError as err:
        raise ReceiptError("attestation",
                           f"attestation document does not verify: {err.step}: {err}") from None
    public_key = public_key_from_user_data(verified.document.user_data)  # 3
    pcr0 = verified.document.pcrs.get(0, b"")
    return check_receipt(receipt, public_key=public_key, pcr0=pcr0, response=response, request=request)


def check_receipt(receipt: Receipt, *, public_key: ed25519.Ed25519PublicKey, pcr0: bytes,
                  response: bytes | None = None, request: bytes | None = None) -> Receipt:
    """Steps 4-8 against a key and PCR0 taken from an already verified attestation document (the client
    checks every receipt of a session against the document it verified when it connected)."""
    if receipt.key_id != key_id(public_key):  # 4
        raise ReceiptError("other-key", "receipt was signed by another key than this enclave's")
    try:  # 5
        public_key.verify(receipt.signature, _SIGNING_CONTEXT + receipt.body)
    except InvalidSignature:
        raise ReceiptError("signature", "receipt signature does not verify") from None
    if receipt.pcr0 != pcr0:  # 6
        raise ReceiptError("pcr0", "receipt PCR0 differs from the attestation document's")
    if response is not None and hashlib.sha256(response).digest() != receipt.response_sha256:  # 7
        raise ReceiptError("response", "response does not match the receipt's response hash")
    if request is not None and hashlib.sha256(request).digest() != receipt.request_sha256:  # 8
        raise ReceiptError("request", "request does not match the receipt's request hash")
    return receipt
