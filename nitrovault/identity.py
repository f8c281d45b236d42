"""The enclave's TLS identity: one key pair for the whole fleet, whose private key only attested enclaves
(and the owner who made it) ever hold.

The identity travels **sealed with the model** (``docs/confidential-serving.md``): ``nitrovault seal``
puts the private key and the certificate chain into the encrypted safetensors metadata (keys
:data:`SEALED_KEY` and :data:`SEALED_CHAIN`), so KMS releases it together with the data key, to an enclave
whose PCRs are in the key policy, and to nobody else. Every instance behind the load balancer unseals
the same file and presents the same certificate: a client pins it once. The parent only ever relays the
sealed file, never the key.

Certificates are self-signed by default (:meth:`TlsIdentity.generate`, ECDSA P-256, ``serverAuth``, one
DNS name that clients use as the TLS server name); an owner-supplied chain (leaf first, then the owner
CA's intermediates) works the same (:meth:`TlsIdentity.from_pem`), as long as the leaf carries the key.

What is bound where: the SHA-256 of the leaf's SubjectPublicKeyInfo (DER) is :attr:`TlsIdentity.spki_sha256`;
the enclave binds it in every served attestation document's ``user_data`` (:mod:`nitrovault.bindings`),
and :class:`nitrovault.client.NitrovaultClient` compares it with the key of the connection it opened.

Pure: no sockets, no files. Written on ``cryptography``'s x509 builder (no library makes and checks
this particular identity).

Example::

    identity = TlsIdentity.generate("enclave.example.internal", now=datetime.now(UTC))
    metadata = identity.sealed_metadata()            # merged into the plain model before sealing
    again = TlsIdentity.from_sealed_metadata(metadata)
    assert again.spki_sha256 == identity.spki_sha256
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nitrovault.errors import TlsIdentityError

__all__ = [
    "DEFAULT_SERVER_NAME",
    "SEALED_CHAIN",
    "SEALED_KEY",
    "TlsIdentity",
    "certificate_fingerprint",
    "dns_names",
    "load_certificates",
    "spki_sha256",
]

#: sealed metadata: the TLS private key (PKCS#8 PEM, unencrypted: the whole metadata is encrypted)
SEALED_KEY = "nitrovault.tls.key"
#: sealed metadata: the certificate chain (PEM, leaf first)
SEALED_CHAIN = "nitrovault.tls.chain"
#: the DNS name of a self-signed identity when the owner names none
DEFAULT_SERVER_NAME = "enclave.nitrovault.internal"
#: default validity of a self-signed certificate
DEFAULT_VALIDITY = timedelta(days=397)
_MAX_CHAIN = 8
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")


def spki_sha256(certificate: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's SubjectPublicKeyInfo (DER): what ``user_data`` binds."""
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def dns_names(certificate: x509.Certificate) -> list[str]:
    """The certificate's subjectAltName DNS names, in order (empty when it has none)."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(names.get_values_for_type(x509.DNSName))


def certificate_fingerprint(certificate: x509.Certificate) -> str:
    """Hex SHA-256 of the whole certificate (DER), as ``openssl x509 -fingerprint -sha256`` shows it."""
    return certificate.fingerprint(hashes.SHA256()).hex()


def load_certificates(pem: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle, in order; :class:`TlsIdentityError` when there is none."""
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise TlsIdentityError("the certificate chain is not PEM certificates") from None
    if not chain:
        raise TlsIdentityError("the certificate chain is empty")
    if len(chain) > _MAX_CHAIN:
        raise TlsIdentityError(f"the certificate chain has more than {_MAX_CHAIN} certificates")
    return chain


@dataclass(frozen=True)
class TlsIdentity:
    """A private key and the certificate chain that carries its public key (leaf first)."""

    private_key_pem: bytes = field(repr=False)
    chain_pem: bytes
    leaf: x509.Certificate = field(compare=False)
    #: the leaf's DNS name (its first DNS subjectAltName): the TLS server name clients ask for
    server_name: str

    @property
    def spki_sha256(self) -> bytes:
        return spki_sha256(self.leaf)

    @property
    def fingerprint(self) -> str:
        return certificate_fingerprint(self.leaf)

    @property
    def leaf_pem(self) -> bytes:
        return self.leaf.public_bytes(serialization.Encoding.PEM)

    # -- making and reading ----------------------------------------------------------------------------

    @classmethod
    def generate(cls, server_name: str = DEFAULT_SERVER_NAME, *, now: datetime,
                 validity: timedelta = DEFAULT_VALIDITY) -> TlsIdentity:
        """A fresh ECDSA P-256 key and a self-signed ``serverAuth`` certificate for ``server_name``."""
        if not _DNS_NAME.fullmatch(server_name):
            raise TlsIdentityError("the TLS server name must be a DNS name")
        if validity <= timedelta(0):
            raise TlsIdentityError("the certificate validity must be positive")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)])
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=False,
                              crl_sign=False, encipher_only=False, decipher_only=False),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cls.from_pem(key_pem, certificate.public_bytes(serialization.Encoding.PEM))

    @classmethod
    def from_pem(cls, private_key_pem: bytes, chain_pem: bytes) -> TlsIdentity:
        """Check that the key is usable for TLS and is the leaf's, and that the leaf names a DNS host."""
        try:
            key = serialization.load_pem_private_key(private_key_pem, password=None)
        except (ValueError, TypeError):
            raise TlsIdentityError("the TLS private key is not an unencrypted PEM private key") from None
        if isinstance(key, ec.EllipticCurvePrivateKey):
            if key.curve.name not in ("secp256r1", "secp384r1"):
                raise TlsIdentityError("the TLS key's curve must be P-256 or P-384")
        elif isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < 2048:
                raise TlsIdentityError("an RSA TLS key must have at least 2048 bits")
        elif not isinstance(key, ed25519.Ed25519PrivateKey):
            raise TlsIdentityError("the TLS key must be ECDSA P-256/P-384 or RSA >= 2048")
        chain = load_certificates(chain_pem)
        leaf = chain[0]
        der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
            raise TlsIdentityError("the TLS private key does not belong to the chain's first certificate")
        dns = dns_names(leaf)
        if not dns:
            raise TlsIdentityError("the TLS certificate has no subjectAltName DNS name")
        canonical = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
        return cls(private_key_pem=private_key_pem, chain_pem=canonical, leaf=leaf, server_name=dns[0])

    # -- sealed with the model ---------------------------------------------------------------------------

    def sealed_metadata(self) -> dict[str, str]:
        """The two metadata entries ``nitrovault seal`` merges into the plain model before sealing."""
        return {SEALED_KEY: self.private_key_pem.decode(), SEALED_CHAIN: self.chain_pem.decode()}

    @classmethod
    def from_sealed_metadata(cls, metadata: Mapping[str, str]) -> TlsIdentity | None:
        """The identity a sealed model carries, or None when it carries none (both keys or neither)."""
        key, chain = metadata.get(SEALED_KEY), metadata.get(SEALED_CHAIN)
        if key is None and chain is None:
            return None
        if key is None or chain is None:
            raise TlsIdentityError(f"the sealed model has only one of {SEALED_KEY} and {SEALED_CHAIN}")
        return cls.from_pem(key.encode(), chain.encode())

    def valid_at(self, when: datetime) -> bool:
        return self.leaf.not_valid_before_utc <= when <= self.leaf.not_valid_after_utc
