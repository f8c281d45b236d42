"""Where the model key is released: attest to KMS and open the data key, inside the enclave.

1. Generate an ephemeral RSA-2048 key; its DER SubjectPublicKeyInfo goes into the attestation document's
   ``public_key`` (what KMS encrypts ``CiphertextForRecipient`` to).
2. Ask the NSM for an attestation document over that key.
3. Call KMS ``Decrypt`` with ``Recipient`` through boto3, naming the configured key (never the parent's
   choice) and the configured encryption context (checked against the sealed header first).
4. Open the CMS envelope with the ephemeral key. The result is only trusted because the weights then pass
   AEAD authentication under it (docs/design.md, "Trust decisions").

The ephemeral private key never leaves this process; the data key is returned as a ``bytearray`` so the
caller can zero it as soon as the weights are unsealed.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

from enclave_app.config import EnclaveConfig
from nitrovault.envelope import SealedHeader
from nitrovault.errors import KeyReleaseError
from nitrovault.kms import KmsClient, Recipient, RecipientKey
from nitrovault.nsm import Nsm


@dataclass(frozen=True)
class ReleaseTimings:
    attestation_s: float
    kms_s: float


class SealedModelMismatchError(KeyReleaseError):
    """The sealed model is not the one this enclave was built to serve (context or digest differ)."""

    step = "sealed-model-identity"


def check_sealed_header(config: EnclaveConfig, header: SealedHeader) -> None:
    """Refuse, before any KMS call, a sealed model that is not the one the measured config names."""
    if dict(header.encryption_context) != dict(config.encryption_context):
        raise SealedModelMismatchError("sealed model's encryption context differs from the enclave config")
    # always compared: an empty pin (a config built around from_mapping's checks) matches nothing
    if not hmac.compare_digest(header.digest.hex(), config.sealed_digest.lower() or "-"):
        raise SealedModelMismatchError("sealed model's digest differs from the enclave config")


def release_data_key(
    config: EnclaveConfig, header: SealedHeader, *, nsm: Nsm, kms: KmsClient, user_data: bytes | None = None
) -> tuple[bytearray, ReleaseTimings]:
    """``user_data``: bound into the document KMS sees too (the boot's receipt key, so every document this
    enclave produces names it)."""
    check_sealed_header(config, header)
    started = time.perf_counter()
    recipient_key = RecipientKey.generate()
    document = nsm.attestation(public_key=recipient_key.public_key_der, user_data=user_data)
    attested = time.perf_counter()
    plaintext = kms.decrypt(
        header.wrapped_key,
        key_id=config.kms_key_arn,
        encryption_context=dict(config.encryption_context),
        recipient=Recipient(attestation_document=document, key=recipient_key),
    )
    done = time.perf_counter()
    return bytearray(plaintext), ReleaseTimings(attestation_s=attested - started, kms_s=done - attested)
