"""The local KMS emulator: KMS JSON 1.1 over HTTP, so an unmodified boto3 (``endpoint_url=``) is the client.

* :mod:`.sigv4` verifies SigV4 (principal = the access key id's ARN from the principals file),
* :mod:`.operations` implements the operations over :mod:`.store` (keys, aliases, policies on disk),
  evaluating key policies with :mod:`nitrovault.policy` and ``Recipient`` attestation documents with
  :mod:`nitrovault.attestation`,
* :mod:`.blob` is the emulator's ciphertext blob format,
* :mod:`.server` is the HTTP(S) shell and :class:`KmsEmulator`,
* :mod:`.tls` is the local CA standing in for Amazon's, and the server certificate (:class:`KmsTls`).

Test and local use only: production code never imports this package. See ``docs/kms-emulator.md``.
"""

from nitrovault.local.kms.server import KmsEmulator, RunningKms, load_principals, parse_principals
from nitrovault.local.kms.sigv4 import Caller, Credentials
from nitrovault.local.kms.tls import KmsTls

__all__ = ["Caller", "Credentials", "KmsEmulator", "KmsTls", "RunningKms", "load_principals",
           "parse_principals"]
