"""Attested key release with AWS KMS: the CMS envelope (pure) and the boto3 adapter.

* :mod:`nitrovault.kms.cms`: open and build ``CiphertextForRecipient`` (pure: bytes in, bytes out);
* :mod:`nitrovault.kms.recipient`: the enclave's RSA recipient key and the ``Recipient`` parameter;
* :mod:`nitrovault.kms.client`: :class:`KmsClient` over boto3, where botocore errors are translated
  once into the :class:`~nitrovault.errors.KeyReleaseError` tree.
"""

from nitrovault.kms.client import AwsCredentials, DataKey, KmsClient, kms_client_from_env
from nitrovault.kms.cms import (
    EnvelopeParts,
    build_ciphertext_for_recipient,
    open_ciphertext_for_recipient,
    parse_enveloped_data,
)
from nitrovault.kms.recipient import Recipient, RecipientKey

__all__ = [
    "AwsCredentials",
    "DataKey",
    "EnvelopeParts",
    "KmsClient",
    "Recipient",
    "RecipientKey",
    "build_ciphertext_for_recipient",
    "kms_client_from_env",
    "open_ciphertext_for_recipient",
    "parse_enveloped_data",
]
