"""The CA certificates an enclave trusts for KMS's TLS certificate in production.

KMS endpoints present certificates issued under Amazon Trust Services' roots; the bundle is package data
(``nitrovault/data/amazon-trust-services.pem``, public certificates with their SHA-256 fingerprints). The
image build copies it into the measured config's ``kms_ca_bundle``, so the trust root for key release is
part of PCR0/PCR2 and never comes from the parent or the environment.
"""

from __future__ import annotations

from importlib import resources

#: SHA-256 fingerprints of Amazon Root CA 1-4 (https://www.amazontrust.com/repository/)
AMAZON_ROOT_FINGERPRINTS = (
    "8ecde6884f3d87b1125ba31ac3fcb13d7016de7f57cc904fe1cb97c6ae98196e",
    "1ba5b2aa8c65401a82960118f80bec4f62304d83cec4713a19c39c011ea46db4",
    "18ce6cfe7bf14e60b2e347b8dfe868cb31d02ebb3ada271569f50343b46db3a4",
    "e35d28419ed02025cfa69038cd623962458da5c695fbdea3c22b0bfb25897092",
)


def amazon_trust_services_pem() -> str:
    """Amazon Root CA 1-4 as one PEM bundle (with comment lines, which PEM parsers skip)."""
    return resources.files("nitrovault").joinpath("data/amazon-trust-services.pem").read_text()
