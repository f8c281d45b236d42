"""The one error tree of nitrovault.

Every failure a caller can act on is a subclass of :class:`NitrovaultError`. Errors are translated at
each boundary exactly once: botocore errors become :class:`KeyReleaseError` in ``nitrovault.kms.client``,
domain errors become gRPC status codes in one table in the serving layer, and the sealed format has a
single opaque failure (:class:`SealedModelError`) so that it is no decryption oracle.

A subclass defined outside this module is drawn with its module in parentheses. The drawing is checked
against the classes (``tests/unit/test_error_tree.py``): a new subclass must be drawn under its parent.

::

    NitrovaultError                      diagnostics() -> str, never secret material
    ├── ConfigError                      bad or unknown configuration keys, bad CLI input
    ├── AttestationError                 an attestation document failed verification
    │   ├── MalformedDocumentError         step 1: not CBOR / not COSE_Sign1 / wrong header
    │   ├── InvalidPayloadError            step 2: payload field missing, wrong type or size
    │   ├── UntrustedRootError             step 3: the trust root is not the pinned one
    │   ├── CertificateChainError          steps 3-5: chain does not validate to the root
    │   │   └── CertificateExpiredError      a certificate is outside its validity at the given time
    │   ├── SignatureError                 step 6: the COSE signature does not verify
    │   ├── DebugModeError                 PCR0 is all zeros and unsafe_allow_debug was not set
    │   └── ExpectationError               a verified document is not the one the caller expects
    │       ├── PCRMismatchError             a PCR is not the expected measurement
    │       ├── NonceMismatchError           the nonce is not the one the caller sent
    │       ├── PublicKeyMismatchError       ``public_key`` is not the expected key
    │       ├── UserDataMismatchError        ``user_data`` is not the expected bytes
    │       ├── DocumentTooOldError          the document is older than the caller's freshness bound
    │       └── TlsBindingError              the document binds another TLS key than this connection's
    ├── EnvelopeError                    CMS (CiphertextForRecipient) could not be opened
    │   └── UnsupportedAlgorithmError      an algorithm other than RSAES-OAEP-SHA256 / AES-256-CBC
    ├── KeyReleaseError                  KMS refused or failed to release key material
    │   ├── KeyAccessDeniedError           AccessDeniedException (policy, PCRs, principal)
    │   ├── KeyNotFoundError               NotFoundException
    │   ├── KeyUnavailableError            DisabledException / KeyUnavailableException / pending deletion
    │   ├── InvalidCiphertextError         InvalidCiphertextException (bad blob or encryption context)
    │   ├── KmsTransportError              endpoint unreachable, throttled, 5xx
    │   │   └── KmsTlsError                  KMS's TLS certificate did not verify (measured CA bundle)
    │   └── SealedModelMismatchError       (enclave_app.key_release) not the model this enclave serves
    ├── SealedModelError                 the sealed model could not be opened (one opaque failure)
    │   ├── KeyCommitmentError             the header does not commit to this data key (format v2)
    │   └── LegacySealedFormatError        a version-1 (non-committing) file, refused by default
    ├── NetworkSetupError                the enclave could not set up its route to KMS (loopback)
    ├── PolicyError                      a key policy document is malformed
    ├── EifError                         an enclave image file (.eif) is truncated, corrupt or not an EIF
    ├── NsmError                         the NSM device (real or local) answered with an error
    ├── AccessError                      a caller was refused; ``reason`` is for the audit log ONLY
    │   ├── AuthenticationError            bad/missing bearer token          -> UNAUTHENTICATED
    │   ├── PermissionDeniedError          valid token, scope does not allow -> PERMISSION_DENIED
    │   ├── QuotaExceededError             rate/daily quota used up -> RESOURCE_EXHAUSTED (retry_after_s)
    │   └── ProtectionUnavailableError     limits or audit cannot be enforced now -> UNAVAILABLE (fail closed)
    ├── StateStoreError                  the shared state store could not be reached or answered oddly
    │   └── StateStoreCredentialError      it refused the sealed credential (a boot failure, not a retry)
    ├── BindingError                     a document's ``user_data`` is not the nitrovault/v1 layout
    ├── TlsIdentityError                 a TLS identity or a server's TLS session is unusable
    ├── ClientError                      a nitrovault.client call failed (gRPC ``code`` name, ``details``)
    ├── ReceiptError                     a response receipt failed verification (``reason`` names the check)
    ├── AuditError                       an audit record was refused (raw inputs/outputs, bad value types)
    ├── TensorFormatError                (nitrovault.rpc.tensors) a wire tensor is malformed (dtype, shape)
    ├── ModelLoadError                   (enclave_app.models.base) the unsealed tensors do not fit the handler
    │   └── WeightsSelectionError        (enclave_app.weights) Protection.weights selects nothing in the model
    ├── UnsupportedCallError             (enclave_app.models.base) the model cannot serve this method
    ├── InvalidInputError                (enclave_app.models.base) the caller's input does not fit the model
    ├── GenerationError                  (enclave_app.models.causal_lm) no valid next-token distribution
    │   └── SubjectScopeError              (enclave_app.models.green_list) a per-subject mark with no subject
    ├── WeightsIntegrityError            (enclave_app.weights) in-memory weight ciphertext failed -> DATA_LOSS
    ├── NotReadyError                    (enclave_app.status) no model or limits yet -> UNAVAILABLE
    ├── OverloadedError                  (enclave_app.status) too many calls in flight -> RESOURCE_EXHAUSTED
    ├── BootFailure                      (enclave_app.boot) boot failed at ``step`` (coarse, safe ``reason``)
    ├── NitroCliError                    (parent_app.supervisor) nitro-cli failed or printed no/bad JSON
    └── StackError                       (nitrovault.local.homes) the local stack's ``step`` failed
"""

from __future__ import annotations


class NitrovaultError(Exception):
    """Base of every nitrovault error.

    ``str(err)`` is a one-line summary safe to print; :meth:`diagnostics` adds the failed step and a
    hint. Neither ever contains key material, plaintext or tokens.
    """

    step: str = "nitrovault"
    hint: str = ""

    def diagnostics(self) -> str:
        lines = [f"{self.step}: {self}"]
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)


class ConfigError(NitrovaultError):
    step = "config"


# -- attestation -------------------------------------------------------------------------------------


class AttestationError(NitrovaultError):
    step = "attestation"


class MalformedDocumentError(AttestationError):
    step = "decode"


class InvalidPayloadError(AttestationError):
    step = "payload"


class UntrustedRootError(AttestationError):
    step = "root"
    hint = "the trust root must be the pinned AWS Nitro Enclaves Root G1, or one given with --root"


class CertificateChainError(AttestationError):
    step = "chain"


class CertificateExpiredError(CertificateChainError):
    step = "validity"
    hint = "recorded documents only verify at a pinned time (--at); live ones expire after ~3 hours"


class SignatureError(AttestationError):
    step = "signature"


class DebugModeError(AttestationError):
    step = "debug-mode"
    hint = "debug enclaves have all-zero PCRs and prove nothing; opt in with unsafe_allow_debug only in tests"


class ExpectationError(AttestationError):
    step = "expectation"


class PCRMismatchError(ExpectationError):
    step = "pcr"


class NonceMismatchError(ExpectationError):
    step = "nonce"


class PublicKeyMismatchError(ExpectationError):
    step = "public-key"


class UserDataMismatchError(ExpectationError):
    step = "user-data"


class DocumentTooOldError(ExpectationError):
    step = "freshness"


class TlsBindingError(ExpectationError):
    step = "tls-binding"
    hint = "the server that answered is not the attested enclave (or the enclave has another TLS identity)"


# -- key release ---------------------------------------------------------------------------------------


class EnvelopeError(NitrovaultError):
    step = "cms"


class UnsupportedAlgorithmError(EnvelopeError):
    step = "cms-algorithm"


class KeyReleaseError(NitrovaultError):
    step = "key-release"
    #: The KMS error code (``__type``) when KMS answered, else ``None``.
    code: str | None = None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class KeyAccessDeniedError(KeyReleaseError):
    code = "AccessDeniedException"
    hint = "the key policy did not allow this principal with these measurements (PCRs)"


class KeyNotFoundError(KeyReleaseError):
    code = "NotFoundException"


class KeyUnavailableError(KeyReleaseError):
    code = "DisabledException"


class InvalidCiphertextError(KeyReleaseError):
    code = "InvalidCiphertextException"


class KmsTransportError(KeyReleaseError):
    step = "kms-transport"


class KmsTlsError(KmsTransportError):
    """TLS to KMS failed verification: the certificate is not from the trusted CA bundle or not for the
    KMS host name (a parent answering on the KMS leg itself ends here)."""

    step = "kms-tls"


# -- sealed models, policies, NSM -----------------------------------------------------------------------


class SealedModelError(NitrovaultError):
    """The one opaque failure of the sealed format: which check failed is deliberately not said."""

    step = "unseal"

    def __init__(self, message: str = "sealed model is invalid or was tampered with") -> None:
        super().__init__(message)


class KeyCommitmentError(SealedModelError):
    """The sealed header's key commitment does not match the data key: the file was not sealed under the
    released key. Raised before any chunk is decrypted. Not an oracle: the caller chose the key."""

    step = "key-commitment"

    def __init__(self) -> None:
        super().__init__("sealed model was not sealed under the released key (key commitment mismatch)")


class LegacySealedFormatError(SealedModelError):
    """A version-1 sealed file: its header does not commit to the data key, so it is refused unless the
    caller opts in (``SealedModel.open(path, allow_legacy_v1=True)``, for inspection and migration)."""

    def __init__(self) -> None:
        super().__init__("sealed format version 1 is not key-committing: re-seal the model "
                         "(nitrovault seal writes version 2)")


class NetworkSetupError(NitrovaultError):
    """The enclave could not set up its network (bring the loopback interface up for its KMS forwarder)."""

    step = "network"


class PolicyError(NitrovaultError):
    step = "policy"


class EifError(NitrovaultError):
    step = "eif"


class NsmError(NitrovaultError):
    step = "nsm"

    def __init__(self, message: str, *, code: str = "InternalError") -> None:
        super().__init__(message)
        #: the NSM error name (InvalidArgument, InvalidIndex, ReadOnlyIndex, ...)
        self.code = code


# -- access control, receipts, audit ----------------------------------------------------------------------


class AccessError(NitrovaultError):
    """A caller was refused. ``str(err)`` is generic on purpose (it may reach the peer as a status
    message); ``reason`` says which check failed and goes to the audit log only, never to the peer."""

    step = "access"
    generic_message = "access denied"

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or self.generic_message)
        #: short machine-readable cause for the audit log ("expired", "unknown-kid", "scope", ...)
        self.reason = reason


class AuthenticationError(AccessError):
    step = "authentication"
    generic_message = "invalid token"


class PermissionDeniedError(AccessError):
    step = "authorization"
    generic_message = "permission denied"


class QuotaExceededError(AccessError):
    step = "quota"
    generic_message = "quota exceeded"

    def __init__(self, reason: str, *, retry_after_s: float) -> None:
        super().__init__(reason)
        #: seconds after which the same call would be accepted (the retry-after hint)
        self.retry_after_s = retry_after_s


class ProtectionUnavailableError(AccessError):
    """A protected call cannot be served because a protection cannot be enforced right now: the shared
    state store is unreachable (reason ``state-store-unavailable``) or the audit log has been withheld
    beyond the measured bound (``audit-withheld``). Fail closed: the caller gets UNAVAILABLE, never
    unlimited or unaudited service."""

    step = "protection"
    generic_message = "service temporarily unavailable; retry later"


class StateStoreError(NitrovaultError):
    """The shared state store (Valkey/Redis) could not be reached, refused our credential or answered
    something unexpected. The message names no secret."""

    step = "state-store"


class StateStoreCredentialError(StateStoreError):
    """The state store refused the credential sealed with the model (or its user lacks a permission)."""


class ReceiptError(NitrovaultError):
    step = "receipt"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        #: which check failed: malformed, attestation, no-key, other-key, signature, pcr0, response, request
        self.reason = reason


class AuditError(NitrovaultError):
    step = "audit"


# -- client ------------------------------------------------------------------------------------------------


class BindingError(NitrovaultError):
    """An attestation document's ``user_data`` does not hold the enclave bindings (nitrovault.bindings)."""

    step = "user-data"


class TlsIdentityError(NitrovaultError):
    """A TLS identity (key + chain) is malformed or inconsistent, or a server's TLS session does not meet
    the client's floor (TLS 1.3, ALPN h2, a certificate chaining to the given CA)."""

    step = "tls"


class ClientError(NitrovaultError):
    """A call made by :mod:`nitrovault.client` failed: the gRPC status ``code`` name (``UNAVAILABLE``,
    ``INVALID_ARGUMENT``, ...) and the server's ``details``, which by the enclave's contract never hold
    exception text or secrets (internal errors carry only a correlation id)."""

    step = "rpc"

    def __init__(self, code: str, details: str, *, correlation_id: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(f"{code}: {details}" if details else code)
        #: the gRPC status code name, e.g. ``RESOURCE_EXHAUSTED``
        self.code = code
        #: the status details as the server sent them
        self.details = details
        #: the enclave's correlation id for an INTERNAL error (look it up in the enclave's log), if sent
        self.correlation_id = correlation_id
        #: for a quota refusal (RESOURCE_EXHAUSTED): whole seconds after which the call would be accepted
        self.retry_after_s = retry_after_s
