"""Parse and verify AWS Nitro Enclaves attestation documents (pure: bytes in, values out).

The procedure mirrors AWS's own text, step by step (aws/aws-nitro-enclaves-nsm-api
``docs/attestation_process.md`` §3, mirrored at https://docs.aws.amazon.com/enclaves/latest/user/verify-root.html);
the numbered comments in :func:`verify_document` and :func:`parse_document` cite those steps:

1. decode the CBOR as COSE_Sign1 (tagged 18 or untagged) -> :class:`MalformedDocumentError`
2. check the payload syntax (§3.2.2.2, with the 0..1024 / null relaxations real NSM output needs)
   -> :class:`InvalidPayloadError`
3. every certificate valid at ``at`` -> :class:`CertificateExpiredError`; the chain reaches the given
   (or pinned) root -> :class:`UntrustedRootError`
4. critical extensions: CA certificates basicConstraints CA + keyCertSign, the leaf digitalSignature
5. PKIX path validation to the root (no CRLs) -> :class:`CertificateChainError`
6. the COSE ES384 signature with the leaf key -> :class:`SignatureError`

then our own policy: 7. debug mode (all-zero PCR0) -> :class:`DebugModeError` unless
``unsafe_allow_debug``; 8. the caller's :class:`Expectations` -> :class:`ExpectationError` subclasses.

Invariants:

* Input is bounded (:data:`MAX_DOCUMENT_SIZE`) before any decoding; no CBOR tag is accepted inside the
  document (NSM emits none), so cbor2's semantic decoders (datetimes, bignums, shared references) never
  run on untrusted input; duplicate map keys and trailing bytes are rejected.
* ``cabundle[0]`` is never trusted: the chain must end at the root passed in, or at the AWS Nitro
  Enclaves Root G1 shipped with the package and pinned by its DER SHA-256.
* Verification time is a required, timezone-aware parameter: recorded documents only verify at a
  pinned ``at`` (their leaf certificate lives about three hours).
* Only :func:`verify_document` constructs :class:`VerifiedAttestation`.
* Every failure raises one typed :class:`~nitrovault.errors.AttestationError` subclass; messages name
  fields and sizes, never the secret-bearing contents.

Why hand-written rather than a COSE library: COSE_Sign1 with one fixed algorithm is four CBOR items and
one ECDSA call; pycose would add a dependency and accept more (other algorithms, headers) than AWS
documents. Path validation itself is delegated to ``cryptography.x509.verification``.

Example::

    >>> from datetime import datetime, UTC
    >>> from nitrovault.attestation import verify_document, Expectations
    >>> verified = verify_document(raw, at=datetime.now(UTC),
    ...                            expect=Expectations(pcrs={0: expected_pcr0}))  # doctest: +SKIP
    >>> verified.document.module_id  # doctest: +SKIP
"""

from __future__ import annotations

import hmac
import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, NoReturn

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

from nitrovault.errors import (
    CertificateChainError,
    CertificateExpiredError,
    ConfigError,
    DebugModeError,
    DocumentTooOldError,
    InvalidPayloadError,
    MalformedDocumentError,
    NonceMismatchError,
    PCRMismatchError,
    PublicKeyMismatchError,
    SignatureError,
    UntrustedRootError,
    UserDataMismatchError,
)

__all__ = [
    "AWS_NITRO_ROOT_G1_SHA256",
    "MAX_DOCUMENT_SIZE",
    "MAX_FUTURE_SKEW",
    "PCR_LEN",
    "AttestationDocument",
    "Expectations",
    "VerifiedAttestation",
    "aws_nitro_root",
    "is_debug",
    "load_root",
    "parse_document",
    "parse_pcr_arg",
    "pcr_hex",
    "verify_document",
]

log = logging.getLogger(__name__)

#: Length of a SHA-384 PCR, the only kind nitrovault expects to match.
PCR_LEN: Final = 48
#: Documents larger than this are rejected before decoding (real ones are 4-8 KiB).
MAX_DOCUMENT_SIZE: Final = 64 * 1024
#: SHA-256 of the DER of the AWS Nitro Enclaves Root G1 certificate, as published by AWS.
AWS_NITRO_ROOT_G1_SHA256: Final = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
#: With ``Expectations.max_age``, a document timestamp this far after ``at`` is rejected too.
MAX_FUTURE_SKEW: Final = timedelta(seconds=60)

_ROOT_RESOURCE: Final = "aws_nitro_enclaves_root_g1.pem"
#: The only protected header NSM emits: the 4-byte map {1: -35} (alg ES384). Comparing bytes rather than
#: decoded values avoids CBOR aliasing (``True == 1``, non-minimal integer encodings).
_PROTECTED_ES384: Final = b"\xa1\x01\x38\x22"
_COSE_SIGN1_TAG: Final = 0xD2  # tag 18 in its one-byte form
_SIG_LEN: Final = 96  # ES384: raw r || s, 48 bytes each
_FIELD_MAX: Final = 1024
_OPTIONAL_MAX: Final = 1024  # AWS says 512 in prose and 1024 in the CDDL; real documents carry 1024
_MAX_TIMESTAMP_MS: Final = 253402300799999  # 9999-12-31T23:59:59.999Z, the last instant datetime holds
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_DER: Final = serialization.Encoding.DER
#: What cryptography raises for a malformed certificate (several are not ValueError subclasses).
_CERT_ERRORS: Final = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)
_REQUIRED = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")
_OPTIONAL = ("public_key", "user_data", "nonce")
#: Tags cbor2 decodes itself (found by probing cbor2 6.3); each is overridden to fail.
_CBOR2_SEMANTIC_TAGS: Final = (
    0,
    1,
    2,
    3,
    4,
    5,
    25,
    28,
    29,
    30,
    35,
    36,
    37,
    52,
    54,
    100,
    256,
    258,
    260,
    261,
    1004,
    43000,
    55799,
)


# -- types --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttestationDocument:
    """A syntactically valid attestation document: parsed, **not** verified.

    Byte fields are exactly what the payload carries; ``public_key``/``user_data``/``nonce`` are ``None``
    when absent or CBOR null and may be ``b""``. ``pcrs`` is read-only and ordered by index.
    """

    module_id: str
    digest: str
    timestamp: datetime  #: aware, UTC
    timestamp_ms: int
    pcrs: Mapping[int, bytes] = field(hash=False)
    certificate: bytes  #: leaf, DER
    cabundle: tuple[bytes, ...]  #: DER, root first as NSM sends it (never trusted as such)
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None
    protected: bytes  #: the COSE protected header bstr contents
    payload: bytes  #: the COSE payload bstr contents (the signed bytes)
    signature: bytes  #: raw r || s
    raw: bytes = field(repr=False)  #: the whole document as received


_VERIFIER_TOKEN: Final = object()


@dataclass(frozen=True)
class VerifiedAttestation:
    """A document that passed every step of :func:`verify_document`. Only that function makes these."""

    document: AttestationDocument
    root_fingerprint: str  #: hex SHA-256 of the DER of the trust root the chain ended at
    verified_at: datetime
    _token: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._token is not _VERIFIER_TOKEN:
            raise TypeError(
                "VerifiedAttestation is only constructed by nitrovault.attestation.verify_document"
            )

    @property
    def pcrs(self) -> Mapping[int, bytes]:
        return self.document.pcrs

    @property
    def public_key(self) -> bytes | None:
        return self.document.public_key

    @property
    def user_data(self) -> bytes | None:
        return self.document.user_data

    @property
    def nonce(self) -> bytes | None:
        return self.document.nonce


def _empty_pcrs() -> Mapping[int, bytes]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Expectations:
    """What the caller requires of a verified document. ``None``/empty means "not checked".

    * ``pcrs``: index (0..31) -> exact 48-byte value; only the listed PCRs are compared.
    * ``nonce``, ``public_key``, ``user_data``: exact bytes (an absent field never matches).
    * ``max_age``: reject when ``at - timestamp > max_age``, or the timestamp is more than
      :data:`MAX_FUTURE_SKEW` after ``at``.

    Invalid expectations (wrong PCR size or index) raise :class:`~nitrovault.errors.ConfigError`.
    """

    pcrs: Mapping[int, bytes] = field(default_factory=_empty_pcrs, hash=False)
    nonce: bytes | None = None
    public_key: bytes | None = None
    user_data: bytes | None = None
    max_age: timedelta | None = None

    def __post_init__(self) -> None:
        checked: dict[int, bytes] = {}
        for index, value in dict(self.pcrs).items():
            if type(index) is not int or not 0 <= index < 32:
                raise ConfigError(f"expected PCR index must be an integer 0..31, got {index!r}")
            if not isinstance(value, bytes) or len(value) != PCR_LEN:
                raise ConfigError(f"expected PCR{index} must be exactly {PCR_LEN} bytes")
            checked[index] = value
        object.__setattr__(self, "pcrs", MappingProxyType(dict(sorted(checked.items()))))
        for name in ("nonce", "public_key", "user_data"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bytes):
                raise ConfigError(f"expected {name} must be bytes")
        if self.max_age is not None and self.max_age < timedelta(0):
            raise ConfigError("max_age must not be negative")


# -- trust roots --------------------------------------------------------------------------------------


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def aws_nitro_root() -> x509.Certificate:
    """The AWS Nitro Enclaves Root G1 shipped as package data, checked against its pinned fingerprint."""
    try:
        pem = resources.files("nitrovault").joinpath("data", _ROOT_RESOURCE).read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
    except (OSError, ValueError) as exc:
        raise UntrustedRootError("the packaged AWS Nitro root certificate could not be loaded") from exc
    if not hmac.compare_digest(_fingerprint(cert), AWS_NITRO_ROOT_G1_SHA256):
        raise UntrustedRootError("the packaged AWS Nitro root certificate does not match its pinned SHA-256")
    return cert


def load_root(path_or_pem: str | Path | bytes) -> x509.Certificate:
    """Load a trust root from a file path, PEM text or PEM/DER bytes. Raises ConfigError if unreadable."""
    if isinstance(path_or_pem, bytes):
        data = path_or_pem
    elif isinstance(path_or_pem, str) and "-----BEGIN" in path_or_pem:
        data = path_or_pem.encode()
    else:
        try:
            data = Path(path_or_pem).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read trust root {str(path_or_pem)!r}: {exc.strerror}") from exc
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError("trust root is not a PEM or DER X.509 certificate") from exc


# -- step 1 and 2: parse --------------------------------------------------------------------------------


def _reject_tag(*_args: Any) -> NoReturn:
    raise cbor2.CBORDecodeError("CBOR tags are not allowed in an attestation document")


def _decode_strict(data: bytes) -> Any:
    """Decode exactly one CBOR item: no tags, no duplicate keys, no trailing bytes."""
    fp = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(
        fp,
        tag_hook=_reject_tag,
        semantic_decoders=dict.fromkeys(_CBOR2_SEMANTIC_TAGS, _reject_tag),
        allow_duplicate_keys=False,
        max_depth=16,
    )
    value = decoder.decode()
    if fp.tell() != len(data):
        raise cbor2.CBORDecodeError(f"{len(data) - fp.tell()} trailing bytes after the CBOR item")
    return value


def _decode_cose_sign1(data: bytes) -> tuple[bytes, bytes, bytes]:
    """Step 1 (AWS §3.2.1): COSE_Sign1 = [protected bstr, unprotected map, payload bstr, signature bstr]."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedDocumentError("attestation document must be bytes")
    data = bytes(data)
    if len(data) > MAX_DOCUMENT_SIZE:
        raise MalformedDocumentError(f"document is {len(data)} bytes, more than {MAX_DOCUMENT_SIZE}")
    if not data:
        raise MalformedDocumentError("document is empty")
    # "can be encoded as either tagged or untagged": tag 18 is the single byte 0xd2; no other tag.
    body = data[1:] if data[0] == _COSE_SIGN1_TAG else data
    try:
        outer = _decode_strict(body)
    except Exception as exc:  # cbor2 raises CBORDecodeError, ValueError, RecursionError, ...
        raise MalformedDocumentError(f"not a CBOR COSE_Sign1 document ({type(exc).__name__})") from exc
    # cbor2 6 decodes the contents of tags (and immutable contexts) as tuples: accept both.
    if not isinstance(outer, list | tuple) or len(outer) != 4:
        raise MalformedDocumentError("COSE_Sign1 must be a CBOR array of 4 items")
    protected, unprotected, payload, signature = outer
    if not isinstance(protected, bytes) or protected != _PROTECTED_ES384:
        raise MalformedDocumentError("protected header must be exactly {1: -35} (alg ES384)")
    if not isinstance(unprotected, Mapping):
        raise MalformedDocumentError("unprotected header must be a CBOR map")
    if not isinstance(payload, bytes) or not payload:
        raise MalformedDocumentError("payload must be a non-empty byte string")
    if not isinstance(signature, bytes) or len(signature) != _SIG_LEN:
        raise MalformedDocumentError(f"signature must be a {_SIG_LEN}-byte ES384 r||s byte string")
    return protected, payload, signature


def _payload_error(message: str) -> NoReturn:
    raise InvalidPayloadError(message)


def _check_optional(payload: Mapping[Any, Any], name: str) -> bytes | None:
    value = payload.get(name)
    if value is None:  # absent or CBOR null: real NSM output encodes absent fields as null
        return None
    if not isinstance(value, bytes):
        _payload_error(f"{name} must be a byte string or null")
    if len(value) > _OPTIONAL_MAX:
        _payload_error(f"{name} is {len(value)} bytes, more than {_OPTIONAL_MAX}")
    return value


def _parse_certificate(der: bytes) -> x509.Certificate:
    """Load a DER certificate and touch every part verification uses.

    cryptography parses lazily: a malformed name, validity, extension or key only raises when first
    read, so reading them here keeps those failures in the syntax step instead of deep in the chain.
    """
    cert = x509.load_der_x509_certificate(der)
    cert.subject.rfc4514_string()
    cert.issuer.rfc4514_string()
    _ = cert.not_valid_before_utc, cert.not_valid_after_utc, cert.signature_hash_algorithm
    for _extension_value in cert.extensions:
        pass
    cert.public_key()
    return cert


def _check_der(value: Any, name: str) -> bytes:
    if not isinstance(value, bytes) or not 1 <= len(value) <= _FIELD_MAX:
        _payload_error(f"{name} must be a byte string of 1..{_FIELD_MAX} bytes")
    try:
        _parse_certificate(value)
    except _CERT_ERRORS:
        _payload_error(f"{name} is not a well-formed DER X.509 certificate")
    return value


def _check_payload(payload_bytes: bytes) -> dict[str, Any]:
    """Step 2 (AWS §3.2.2.2): every field present, of the right type and size."""
    try:
        payload = _decode_strict(payload_bytes)
    except Exception as exc:
        raise InvalidPayloadError(f"payload is not a single CBOR map ({type(exc).__name__})") from exc
    if not isinstance(payload, Mapping):
        _payload_error("payload must be a CBOR map")
    unknown = [k for k in payload if k not in _REQUIRED + _OPTIONAL]
    if unknown:
        _payload_error(f"payload has {len(unknown)} unknown key(s)")
    for name in _REQUIRED:
        if name not in payload:
            _payload_error(f"payload field {name} is missing")

    module_id = payload["module_id"]
    if not isinstance(module_id, str) or not module_id:
        _payload_error("module_id must be non-empty text")
    digest = payload["digest"]
    if not isinstance(digest, str) or digest != "SHA384":
        _payload_error('digest must be "SHA384"')
    timestamp = payload["timestamp"]
    if type(timestamp) is not int or not 0 < timestamp <= _MAX_TIMESTAMP_MS:
        _payload_error("timestamp must be a positive integer of milliseconds since the epoch")

    pcrs = payload["pcrs"]
    if not isinstance(pcrs, Mapping) or not 1 <= len(pcrs) <= 32:
        _payload_error("pcrs must be a map of 1..32 entries")
    checked_pcrs: dict[int, bytes] = {}
    for index, value in pcrs.items():
        if type(index) is not int or not 0 <= index < 32:
            _payload_error("pcrs keys must be integers 0..31")
        if not isinstance(value, bytes) or len(value) not in (32, 48, 64):
            _payload_error(f"PCR{index} must be a byte string of 32, 48 or 64 bytes")
        checked_pcrs[index] = value

    certificate = _check_der(payload["certificate"], "certificate")
    cabundle = payload["cabundle"]
    if not isinstance(cabundle, list | tuple) or not cabundle:
        _payload_error("cabundle must be a non-empty array")
    checked_bundle = tuple(_check_der(c, f"cabundle[{i}]") for i, c in enumerate(cabundle))

    return {
        "module_id": module_id,
        "digest": digest,
        "timestamp": _EPOCH + timedelta(milliseconds=timestamp),
        "timestamp_ms": timestamp,
        "pcrs": MappingProxyType(dict(sorted(checked_pcrs.items()))),
        "certificate": certificate,
        "cabundle": checked_bundle,
        **{name: _check_optional(payload, name) for name in _OPTIONAL},
    }


def parse_document(data: bytes) -> AttestationDocument:
    """Steps 1-2: decode the COSE_Sign1 envelope and check the payload syntax. Nothing is verified."""
    protected, payload, signature = _decode_cose_sign1(data)
    fields = _check_payload(payload)
    return AttestationDocument(
        **fields, protected=protected, payload=payload, signature=signature, raw=bytes(data)
    )


# -- steps 3 to 6: chain and signature -----------------------------------------------------------------


def _load(der: bytes) -> x509.Certificate:
    try:
        return _parse_certificate(der)
    except _CERT_ERRORS as exc:  # parse_document checked this; a hand-built document may not have been
        raise InvalidPayloadError("a certificate is not well-formed DER X.509") from exc


def _extension(cert: x509.Certificate, oid_class: type[Any]) -> Any | None:
    try:
        return cert.extensions.get_extension_for_class(oid_class).value
    except x509.ExtensionNotFound:
        return None
    except _CERT_ERRORS as exc:  # malformed extension encoding
        raise CertificateChainError(
            f"certificate {cert.subject.rfc4514_string()!r} has bad extensions"
        ) from exc


def _check_validity(certs: list[x509.Certificate], at: datetime) -> None:
    """Step 3: "Ensure that the current date and time is within the validity period" (every cert)."""
    for cert in certs:
        if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
            raise CertificateExpiredError(
                f"certificate {cert.subject.rfc4514_string()!r} is valid "
                f"{cert.not_valid_before_utc.isoformat()} to {cert.not_valid_after_utc.isoformat()}, "
                f"not at {at.isoformat()}"
            )


def _check_anchor(root: x509.Certificate, leaf: x509.Certificate, bundle: list[x509.Certificate]) -> None:
    """The chain must reach *our* root: some certificate of the document is the root or is issued by it."""
    root_der = root.public_bytes(_DER)
    for cert in [leaf, *bundle]:
        if cert.public_bytes(_DER) == root_der:
            return
        if cert.issuer == root.subject:
            try:
                cert.verify_directly_issued_by(root)
            except (InvalidSignature, *_CERT_ERRORS):
                continue
            return
    raise UntrustedRootError(
        f"the certificate chain does not reach the trust root (SHA-256 {_fingerprint(root)})"
    )


def _check_extensions(root: x509.Certificate, leaf: x509.Certificate, bundle: list[x509.Certificate]) -> None:
    """Step 4: CA certificates need basicConstraints CA and keyCertSign; the leaf digitalSignature."""
    for cert in [root, *bundle]:
        name = cert.subject.rfc4514_string()
        constraints = _extension(cert, x509.BasicConstraints)
        if constraints is None or not constraints.ca:
            raise CertificateChainError(f"CA certificate {name!r} lacks basicConstraints CA:TRUE")
        usage = _extension(cert, x509.KeyUsage)
        if usage is None or not usage.key_cert_sign:
            raise CertificateChainError(f"CA certificate {name!r} lacks keyUsage keyCertSign")
    usage = _extension(leaf, x509.KeyUsage)
    if usage is None or not usage.digital_signature:
        raise CertificateChainError("leaf certificate lacks keyUsage digitalSignature")
    constraints = _extension(leaf, x509.BasicConstraints)
    if constraints is not None and (constraints.ca or constraints.path_length is not None):
        raise CertificateChainError("leaf certificate must not be a CA or carry a pathLen")


def _check_path(
    root: x509.Certificate, leaf: x509.Certificate, bundle: list[x509.Certificate], at: datetime
) -> None:
    """Step 5: PKIX path validation to the root, CRLs not checked (as AWS documents).

    The leaf has no AuthorityKeyIdentifier, so the default end-entity policy rejects it; CA certificates
    keep the WebPKI defaults.
    """
    verifier = (
        PolicyBuilder()
        .store(Store([root]))
        .time(at)
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all()
        )
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, bundle)
    except (VerificationError, *_CERT_ERRORS) as exc:
        raise CertificateChainError(f"certificate path validation failed: {exc}") from exc


def _check_signature(doc: AttestationDocument, leaf: x509.Certificate) -> None:
    """Step 6: ES384 over Sig_structure = ["Signature1", protected, external_aad = b"", payload]."""
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise SignatureError("leaf certificate key is not ECDSA P-384")
    sig_structure = cbor2.dumps(["Signature1", doc.protected, b"", doc.payload])
    half = _SIG_LEN // 2
    der = utils.encode_dss_signature(
        int.from_bytes(doc.signature[:half], "big"), int.from_bytes(doc.signature[half:], "big")
    )
    try:
        key.verify(der, sig_structure, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise SignatureError("COSE signature does not verify with the leaf certificate key") from None


# -- steps 7 and 8: our policy ---------------------------------------------------------------------------


def is_debug(doc: AttestationDocument) -> bool:
    """True when PCR0 is all zeros: the enclave runs in debug mode and its measurements prove nothing."""
    pcr0 = doc.pcrs.get(0)
    return pcr0 is not None and not any(pcr0)


def pcr_hex(doc: AttestationDocument) -> dict[int, str]:
    return {index: value.hex() for index, value in doc.pcrs.items()}


def parse_pcr_arg(text: str) -> tuple[int, bytes]:
    """Parse ``"N=HEX"`` (N in 0..31, exactly 96 hex digits). Raises ConfigError."""
    index_text, sep, hex_text = text.partition("=")
    if not sep or not index_text.strip().isdecimal():
        raise ConfigError(f"expected N=HEX, got {text[:20]!r}")
    index = int(index_text)
    if not 0 <= index < 32:
        raise ConfigError(f"PCR index must be 0..31, got {index}")
    hex_text = hex_text.strip()
    if len(hex_text) != 2 * PCR_LEN:
        raise ConfigError(f"PCR{index} must be {2 * PCR_LEN} hex digits, got {len(hex_text)}")
    try:
        return index, bytes.fromhex(hex_text)
    except ValueError:
        raise ConfigError(f"PCR{index} is not hexadecimal") from None


def _same(actual: bytes | None, expected: bytes) -> bool:
    return actual is not None and hmac.compare_digest(actual, expected)


def _check_expectations(doc: AttestationDocument, expect: Expectations, at: datetime) -> None:
    for index, expected in expect.pcrs.items():
        if not _same(doc.pcrs.get(index), expected):
            raise PCRMismatchError(f"PCR{index} does not match the expected value")
    if expect.nonce is not None and not _same(doc.nonce, expect.nonce):
        raise NonceMismatchError("nonce does not match the expected nonce")
    if expect.public_key is not None and not _same(doc.public_key, expect.public_key):
        raise PublicKeyMismatchError("public_key does not match the expected key")
    if expect.user_data is not None and not _same(doc.user_data, expect.user_data):
        raise UserDataMismatchError("user_data does not match the expected value")
    if expect.max_age is not None:
        age = at - doc.timestamp
        if age > expect.max_age:
            raise DocumentTooOldError(f"document is {age} old, more than {expect.max_age}")
        if -age > MAX_FUTURE_SKEW:
            raise DocumentTooOldError(f"document timestamp is {-age} after the verification time")


def verify_document(
    data: bytes | AttestationDocument,
    *,
    at: datetime,
    root: x509.Certificate | None = None,
    expect: Expectations | None = None,
    unsafe_allow_debug: bool = False,
) -> VerifiedAttestation:
    """Run every verification step (module docstring) at time ``at``; return the verified document.

    ``root=None`` means the pinned AWS Nitro Enclaves Root G1.
    """
    if not isinstance(at, datetime) or at.tzinfo is None or at.utcoffset() is None:
        raise TypeError("at must be a timezone-aware datetime")
    at = at.astimezone(UTC)
    trust_root = aws_nitro_root() if root is None else root
    if not isinstance(trust_root, x509.Certificate):
        raise TypeError("root must be an x509.Certificate or None")

    # Steps 1-2: decode COSE_Sign1, check payload syntax. A parsed document is re-parsed from its raw
    # bytes, so fields that were not signed (a hand-built AttestationDocument) can never be "verified".
    doc = parse_document(data.raw if isinstance(data, AttestationDocument) else data)
    leaf = _load(doc.certificate)
    bundle = [_load(der) for der in doc.cabundle]

    # Step 3: every certificate of [leaf, INTERM_N..INTERM_1, ROOT] valid now; the chain ends at our root.
    _check_validity([leaf, *bundle, trust_root], at)
    _check_anchor(trust_root, leaf, bundle)
    # Step 4: critical extensions of the CA certificates and of the target certificate.
    _check_extensions(trust_root, leaf, bundle)
    # Step 5: PKIX path validation to the pinned root (CRL checking disabled).
    _check_path(trust_root, leaf, bundle, at)
    # Step 6: the COSE_Sign1 signature with the leaf key.
    _check_signature(doc, leaf)

    # Step 7 (ours): debug-mode enclaves have all-zero PCRs and prove nothing.
    if is_debug(doc):
        if not unsafe_allow_debug:
            raise DebugModeError("PCR0 is all zeros: the enclave runs in debug mode")
        log.warning("unsafe_allow_debug: accepting a DEBUG-MODE attestation document (PCR0 all zeros)")
    elif unsafe_allow_debug:
        log.warning("unsafe_allow_debug is set (this document is not in debug mode)")

    # Step 8 (ours): the caller's expectations.
    if expect is not None:
        _check_expectations(doc, expect, at)

    return VerifiedAttestation(
        document=doc, root_fingerprint=_fingerprint(trust_root), verified_at=at, _token=_VERIFIER_TOKEN
    )
