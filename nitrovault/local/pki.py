"""A local stand-in for the AWS Nitro Enclaves PKI: P-384 root -> intermediate -> short-lived leaf.

The shapes mirror what real attestation documents carry (AWS, "Verifying the root of trust"), so the
production verifier in ``nitrovault.attestation`` checks local documents with exactly the code path it
uses for AWS ones:

* root: self-signed P-384, 30 years, BasicConstraints CA (critical), KeyUsage keyCertSign+cRLSign
  (critical), SKI; ``CN=local.nitro-enclaves,OU=nitrovault-test,O=nitrovault,C=US``.
* intermediate (stands in for AWS's regional/zonal/instance chain, collapsed to one): P-384, CA with
  pathLen 0, KeyUsage digitalSignature+keyCertSign+cRLSign (critical), AKI+SKI; re-issued automatically
  when it would expire within a day.
* leaf (one per document): P-384, valid 3 h from 3 s before the document time, BasicConstraints
  CA:FALSE (critical), KeyUsage digitalSignature+contentCommitment (non-critical) and *no* AKI, exactly
  like AWS's leaves; ``CN=<module_id>.local.aws``.

Layout of the directory (created 0700; private keys 0600, PKCS#8 PEM, unencrypted: this is test PKI)::

    DIR/root.pem           the trust root other tools take as --root
    DIR/root.key
    DIR/intermediate.pem
    DIR/intermediate.key

Creation is guarded by an advisory ``flock`` on ``DIR/.lock`` and every file is written atomically, so
two processes calling :meth:`LocalPki.ensure` at once agree on one PKI. Time is a parameter (``clock``):
the CA certificates start one day before the time the PKI is created at, so documents made (``at``)
earlier than that do not verify against it; tests with pinned times create their PKI with the same clock.
A directory that already exists keeps its permissions (we never chmod a directory we did not create).

Example::

    pki = LocalPki.ensure(Path("/tmp/pki"))
    cert, key = pki.issue_leaf("i-0123-enc0123", at=datetime.now(UTC))
"""

from __future__ import annotations

import fcntl
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nitrovault.clock import Clock, utc_now
from nitrovault.errors import ConfigError
from nitrovault.files import write_atomic
from nitrovault.local.files import key_pem

__all__ = ["LEAF_LIFETIME", "LocalPki"]


ROOT_LIFETIME = timedelta(days=365 * 30)
INTERMEDIATE_LIFETIME = timedelta(days=365 * 5)
#: Real leaves live about 3 hours and start about 3 seconds before the document's timestamp.
LEAF_LIFETIME = timedelta(hours=3)
LEAF_BACKDATE = timedelta(seconds=3)
_BACKDATE_CA = timedelta(days=1)  # so a freshly made CA also verifies documents a little in the past
_REISSUE_MARGIN = timedelta(days=1)

ROOT_SUBJECT = x509.Name([
    x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nitrovault"),
    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "nitrovault-test"),
    x509.NameAttribute(NameOID.COMMON_NAME, "local.nitro-enclaves"),
])
INTERMEDIATE_SUBJECT = x509.Name([
    x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nitrovault"),
    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "nitrovault-test"),
    x509.NameAttribute(NameOID.COMMON_NAME, "instance.local.nitro-enclaves"),
])


def _aware(at: datetime) -> datetime:
    if at.tzinfo is None:
        raise ConfigError("times must be timezone-aware")
    return at.astimezone(UTC)


@dataclass(frozen=True)
class LocalPki:
    """A loaded local PKI. Make one with :meth:`ensure`; the keys never leave this object or ``directory``."""

    directory: Path
    root: x509.Certificate
    root_key: ec.EllipticCurvePrivateKey
    intermediate: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey

    @property
    def root_path(self) -> Path:
        return self.directory / "root.pem"

    @property
    def cabundle(self) -> list[bytes]:
        """The DER CA bundle as it goes into a document: root first, then the intermediate."""
        return [
            self.root.public_bytes(serialization.Encoding.DER),
            self.intermediate.public_bytes(serialization.Encoding.DER),
        ]

    @classmethod
    def ensure(cls, directory: Path | str, *, clock: Clock = utc_now) -> LocalPki:
        """Load the PKI in ``directory``, creating it (or a lapsing intermediate) on first use."""
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, mode=0o700)
        except FileExistsError:
            pass
        else:
            os.chmod(directory, 0o700)  # mkdir's mode is narrowed by the umask, never widened: make it exact
        lock_fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            return cls._ensure_locked(directory, _aware(clock()))
        finally:
            os.close(lock_fd)  # releases the flock

    @classmethod
    def _ensure_locked(cls, directory: Path, now: datetime) -> LocalPki:
        root_pem, root_key_path = directory / "root.pem", directory / "root.key"
        int_pem, int_key_path = directory / "intermediate.pem", directory / "intermediate.key"
        if root_pem.exists() and root_key_path.exists():
            root = x509.load_pem_x509_certificate(root_pem.read_bytes())
            root_key = _load_key(root_key_path)
        else:
            root_key = ec.generate_private_key(ec.SECP384R1())
            root = _root_cert(root_key, now)
            # key first, certificate last: root.pem existing means the pair is complete.
            write_atomic(root_key_path, key_pem(root_key), 0o600)
            write_atomic(root_pem, root.public_bytes(serialization.Encoding.PEM), 0o644)
        intermediate = intermediate_key = None
        if int_pem.exists() and int_key_path.exists():
            intermediate = x509.load_pem_x509_certificate(int_pem.read_bytes())
            intermediate_key = _load_key(int_key_path)
            if (intermediate.issuer != root.subject
                    or intermediate.not_valid_after_utc < now + _REISSUE_MARGIN):
                intermediate = intermediate_key = None
        if intermediate is None or intermediate_key is None:
            intermediate_key = ec.generate_private_key(ec.SECP384R1())
            intermediate = _intermediate_cert(intermediate_key, root, root_key, now)
            write_atomic(int_key_path, key_pem(intermediate_key), 0o600)
            write_atomic(int_pem, intermediate.public_bytes(serialization.Encoding.PEM), 0o644)
        return cls(directory, root, root_key, intermediate, intermediate_key)

    def issue_leaf(self, module_id: str, at: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A fresh P-384 leaf for one document made at ``at`` (valid ``at - 3 s`` .. ``+ 3 h``)."""
        if not module_id:
            raise ConfigError("module_id must not be empty")
        at = _aware(at)
        key = ec.generate_private_key(ec.SECP384R1())
        not_before = at.replace(microsecond=0) - LEAF_BACKDATE
        subject = x509.Name([
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nitrovault"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "nitrovault-test"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{module_id}.local.aws"),
        ])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.intermediate.subject)
            .public_key(key.public_key())
            .serial_number(_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_before + LEAF_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True, content_commitment=True), critical=False)
            .sign(self.intermediate_key, hashes.SHA384())
        )
        return cert, key


def _serial() -> int:
    return secrets.randbits(127) | (1 << 126)  # positive, 16 bytes, never zero


def _key_usage(*, digital_signature: bool = False, content_commitment: bool = False,
               key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=content_commitment,
        key_encipherment=False, data_encipherment=False, key_agreement=False,
        key_cert_sign=key_cert_sign, crl_sign=crl_sign, encipher_only=False, decipher_only=False,
    )


def _root_cert(key: ec.EllipticCurvePrivateKey, now: datetime) -> x509.Certificate:
    not_before = now.replace(microsecond=0) - _BACKDATE_CA
    return (
        x509.CertificateBuilder()
        .subject_name(ROOT_SUBJECT)
        .issuer_name(ROOT_SUBJECT)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_before + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .sign(key, hashes.SHA384())
    )


def _intermediate_cert(key: ec.EllipticCurvePrivateKey, root: x509.Certificate,
                       root_key: ec.EllipticCurvePrivateKey, now: datetime) -> x509.Certificate:
    not_before = max(now.replace(microsecond=0) - _BACKDATE_CA, root.not_valid_before_utc)
    not_after = min(not_before + INTERMEDIATE_LIFETIME, root.not_valid_after_utc)
    ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(INTERMEDIATE_SUBJECT)
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .add_extension(_key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
        .sign(root_key, hashes.SHA384())
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise ConfigError(f"{path.name} in the local PKI directory is not a P-384 key")
    return key
