"""What an enclave binds into its attestation documents' ``user_data``: the keys a client must trust.

Every document an enclave produces carries, in ``user_data``, a small versioned structure naming the
keys of this boot, so that whoever verifies the document (KMS, a client, an auditor) knows which keys
only this measured enclave holds::

    user_data = magic entry*
    magic     = b"nitrovault/v1"                 ; the layout version (a reader refuses other magics)
    entry     = type:u8 length:u8 value[length]
    type 0x01 = receipt/audit key: Ed25519 public key, raw, 32 bytes (exactly once)
    type 0x02 = TLS key: SHA-256 of the TLS certificate's SubjectPublicKeyInfo (DER), 32 bytes (at most
                once; absent only in the boot document KMS sees, made before the identity is unsealed)

Readers skip entry types they do not know (room to grow within v1); a known type twice, a wrong length
or a truncated entry is a :class:`~nitrovault.errors.BindingError`. The encoding is hand-written because
it must fit the NSM's 1 KiB ``user_data`` and predate every library choice of a verifier in another
language: a TLV is one loop in any of them.

Example::

    data = EnclaveBindings(receipt_key=raw32, tls_spki_sha256=spki_hash).encode()
    assert EnclaveBindings.parse(data).tls_spki_sha256 == spki_hash
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nitrovault.errors import BindingError

__all__ = ["RECEIPT_KEY", "TLS_SPKI_SHA256", "USER_DATA_MAGIC", "EnclaveBindings"]

USER_DATA_MAGIC = b"nitrovault/v1"
RECEIPT_KEY = 0x01
TLS_SPKI_SHA256 = 0x02
_LENGTHS = {RECEIPT_KEY: 32, TLS_SPKI_SHA256: 32}


@dataclass(frozen=True)
class EnclaveBindings:
    """The keys one enclave boot binds (layout: module docstring)."""

    #: the boot's Ed25519 receipt/audit public key, raw 32 bytes
    receipt_key: bytes
    #: SHA-256 of the TLS certificate's SubjectPublicKeyInfo, or None (the pre-unseal boot document)
    tls_spki_sha256: bytes | None = None

    def __post_init__(self) -> None:
        if len(self.receipt_key) != 32:
            raise BindingError("the receipt key must be 32 bytes")
        if self.tls_spki_sha256 is not None and len(self.tls_spki_sha256) != 32:
            raise BindingError("the TLS key hash must be 32 bytes")

    def encode(self) -> bytes:
        out = bytearray(USER_DATA_MAGIC)
        out += bytes([RECEIPT_KEY, 32]) + self.receipt_key
        if self.tls_spki_sha256 is not None:
            out += bytes([TLS_SPKI_SHA256, 32]) + self.tls_spki_sha256
        return bytes(out)

    @classmethod
    def parse(cls, user_data: bytes | None) -> EnclaveBindings:
        if not user_data or not user_data.startswith(USER_DATA_MAGIC):
            raise BindingError("the attestation document's user_data carries no nitrovault bindings")
        pos, found = len(USER_DATA_MAGIC), {}
        while pos < len(user_data):
            if pos + 2 > len(user_data):
                raise BindingError("the attestation document's user_data is truncated")
            kind, length = user_data[pos], user_data[pos + 1]
            value = user_data[pos + 2:pos + 2 + length]
            if len(value) != length:
                raise BindingError("the attestation document's user_data is truncated")
            if kind in _LENGTHS:
                if kind in found or length != _LENGTHS[kind]:
                    raise BindingError(f"the document's user_data has a malformed entry {kind:#04x}")
                found[kind] = bytes(value)
            pos += 2 + length
        if RECEIPT_KEY not in found:
            raise BindingError("the attestation document's user_data carries no receipt key")
        return cls(receipt_key=found[RECEIPT_KEY], tls_spki_sha256=found.get(TLS_SPKI_SHA256))

    def with_tls(self, spki_sha256: bytes) -> EnclaveBindings:
        return EnclaveBindings(receipt_key=self.receipt_key, tls_spki_sha256=spki_sha256)

    def to_json(self) -> dict[str, Any]:
        """For ``nitrovault attest verify --json``: hex values, the layout version."""
        return {
            "layout": USER_DATA_MAGIC.decode(),
            "receipt_key": self.receipt_key.hex(),
            "tls_spki_sha256": None if self.tls_spki_sha256 is None else self.tls_spki_sha256.hex(),
        }
