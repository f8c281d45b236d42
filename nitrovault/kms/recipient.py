"""The enclave's ephemeral recipient key and the KMS ``Recipient`` request parameter.

Invariants:

* a :class:`RecipientKey` is RSA with at least 2048 bits (KMS documents RSA-2048 in a DER
  SubjectPublicKeyInfo); :meth:`RecipientKey.generate` makes RSA-2048 with e = 65537;
* the private key never appears in ``repr`` and never leaves the process: only
  :attr:`RecipientKey.public_key_der` goes into the attestation document's ``public_key``;
* :class:`Recipient` pairs the attestation document that carries the public key with the key that
  opens the answer; KMS encrypts ``CiphertextForRecipient`` to the document's key, so the two must
  belong together (the caller builds the document from ``key.public_key_der``).

Example::

    >>> key = RecipientKey.generate()
    >>> recipient = Recipient(attestation_document=b"...cose...", key=key)
    >>> recipient.to_boto()["KeyEncryptionAlgorithm"]
    'RSAES_OAEP_SHA_256'
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from nitrovault.kms.cms import KEY_ALGORITHM, MIN_RSA_BITS

__all__ = ["Recipient", "RecipientKey"]


@dataclass(frozen=True)
class RecipientKey:
    """An RSA key pair whose public half is put into an attestation document for KMS."""

    #: The private key; opens ``CiphertextForRecipient``. Excluded from ``repr``.
    private_key: rsa.RSAPrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.private_key, rsa.RSAPrivateKey):
            raise TypeError("RecipientKey needs an RSA private key")
        if self.private_key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RecipientKey needs at least {MIN_RSA_BITS} bits")

    @classmethod
    def generate(cls) -> RecipientKey:
        """A fresh RSA-2048 key (e = 65537), the size KMS documents for ``Recipient``."""
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @property
    def public_key_der(self) -> bytes:
        """The public key as DER SubjectPublicKeyInfo (what goes into the document's ``public_key``)."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@dataclass(frozen=True)
class Recipient:
    """The ``Recipient`` parameter of KMS Decrypt / GenerateDataKey / GenerateRandom."""

    #: Raw COSE_Sign1 attestation document whose ``public_key`` is ``key.public_key_der``.
    attestation_document: bytes = field(repr=False)
    key: RecipientKey

    def __post_init__(self) -> None:
        if not isinstance(self.attestation_document, bytes) or not self.attestation_document:
            raise ValueError("Recipient needs a non-empty attestation document (bytes)")
        if not isinstance(self.key, RecipientKey):
            raise TypeError("Recipient needs a RecipientKey")

    def to_boto(self) -> dict[str, str | bytes]:
        """The boto3 request parameter (boto3 base64-encodes the document itself)."""
        return {"KeyEncryptionAlgorithm": KEY_ALGORITHM, "AttestationDocument": self.attestation_document}
