"""The KMS emulator's TLS: a local CA standing in for Amazon's public CA, and a server certificate for
the regions' real KMS host names.

The point is that a local enclave reaches the emulator exactly as a real enclave reaches KMS: boto3 asks
for ``https://kms.<region>.amazonaws.com``, sends that name as SNI, and verifies the certificate against
the CA bundle in its measured config. The local stack bakes :attr:`KmsTls.ca_pem` into that config and the
owner's tools trust it too (the server certificate also names ``localhost`` and ``127.0.0.1``, where
they reach the emulator: ``aws --endpoint-url https://127.0.0.1:PORT --ca-bundle ca.pem``).

Files in ``directory`` (0700), made once by :meth:`KmsTls.ensure` and reused:

* ``ca.pem`` (0644) / ``ca.key`` (0600): the CA, ECDSA P-256, ten years; re-made when it has 30 days or
  less left or its key does not match (a new CA voids the server certificate).
* ``server.pem`` (0644, the leaf only) / ``server.key`` (0600): ECDSA P-256, one year (never past the
  CA); re-issued when it has 30 days or less left, does not chain to ``ca.pem``, does not match its key,
  or does not name every requested region's KMS host, ``localhost`` and ``127.0.0.1``.

Every file is written atomically (temp file, fsync, rename), so a crash or a concurrent ``ensure`` never
leaves a torn PEM behind. The CA key is AWS's secret in this play (it lives under ``HOME/aws``): a parent
that had it could impersonate KMS, which is exactly what the measured CA bundle is there to prevent.

Example::

    tls = KmsTls.ensure(home / "aws" / "kms-tls", ["us-east-1", "eu-west-1"])
    running = emulator.serve("127.0.0.1", 0, tls=tls.server_context())
    boto3.client("kms", endpoint_url=running.endpoint_url, verify=str(tls.ca_path), ...)
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nitrovault.clock import utc_now
from nitrovault.errors import ConfigError
from nitrovault.files import write_atomic
from nitrovault.kms.endpoints import kms_hostname
from nitrovault.local.files import key_pem

__all__ = ["CA_LIFETIME", "LOOPBACK", "RENEW_BEFORE", "SERVER_LIFETIME", "KmsTls", "server_names"]

CA_LIFETIME = timedelta(days=3650)
SERVER_LIFETIME = timedelta(days=365)
#: a certificate with this little validity left is replaced
RENEW_BEFORE = timedelta(days=30)
#: where owner tools on this machine reach the emulator
LOOPBACK = ipaddress.ip_address("127.0.0.1")


def server_names(regions: Sequence[str]) -> list[str]:
    """The DNS names the server certificate must carry: each region's KMS host, and ``localhost``."""
    if isinstance(regions, str):  # a bare "us-east-1" would be iterated letter by letter
        raise ConfigError("regions must be a sequence of region names, not one string")
    return sorted({kms_hostname(r) for r in regions} | {"localhost"})


@dataclass(frozen=True)
class KmsTls:
    """The CA and server certificate files in ``directory``; make them with :meth:`ensure`."""

    directory: Path
    #: the CA certificate, PEM: the bundle clients verify the emulator against
    ca_pem: bytes

    @property
    def ca_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key_path(self) -> Path:
        return self.directory / "ca.key"

    @property
    def cert_path(self) -> Path:
        return self.directory / "server.pem"

    @property
    def key_path(self) -> Path:
        return self.directory / "server.key"

    def server_context(self) -> ssl.SSLContext:
        """A server context, TLS 1.2 and up, presenting the server certificate (the leaf; clients hold
        the CA)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        return context

    @classmethod
    def ensure(cls, directory: Path | str, regions: Sequence[str], *, now: datetime | None = None,
               extra_names: Sequence[str] = ()) -> KmsTls:
        """Make (or reuse) the CA and a server certificate naming every region's KMS host, and
        ``extra_names`` (the local state store uses this class with its own host name and no region).

        ``now`` (timezone-aware; default: the current time) decides validity and renewal.
        """
        if isinstance(extra_names, str):
            raise ConfigError("extra_names must be a sequence of host names, not one string")
        names = sorted(set(server_names(regions)) | set(extra_names))
        directory = Path(directory)
        now = now or utc_now()
        if now.tzinfo is None:
            raise ConfigError("now must be timezone-aware")
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        ca_key, ca_cert = cls._ensure_ca(directory, now)
        tls = cls(directory, ca_cert.public_bytes(serialization.Encoding.PEM))
        if not cls._server_current(tls, ca_cert, names, now):
            cls._issue_server(tls, ca_key, ca_cert, names, now)
        return tls

    @staticmethod
    def _ensure_ca(directory: Path, now: datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        cert_path, key_path = directory / "ca.pem", directory / "ca.key"
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        except (OSError, ValueError, TypeError):
            pass
        else:
            if (isinstance(key, ec.EllipticCurvePrivateKey) and key.public_key() == cert.public_key()
                    and cert.not_valid_before_utc <= now
                    and cert.not_valid_after_utc - now > RENEW_BEFORE):
                return key, cert
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nitrovault local"),
                          x509.NameAttribute(NameOID.COMMON_NAME, "nitrovault local KMS CA")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        (directory / "server.pem").unlink(missing_ok=True)  # a new CA: the old server certificate is void
        write_atomic(key_path, key_pem(key), 0o600)
        write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return key, cert

    @staticmethod
    def _server_current(tls: KmsTls, ca: x509.Certificate, names: list[str], now: datetime) -> bool:
        try:
            cert = x509.load_pem_x509_certificate(tls.cert_path.read_bytes())
            key = serialization.load_pem_private_key(tls.key_path.read_bytes(), None)
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            cert.verify_directly_issued_by(ca)
        except Exception:  # unreadable, mismatched or not issued by this CA: make a new one
            return False
        return (key.public_key() == cert.public_key()
                and set(names) <= set(sans.get_values_for_type(x509.DNSName))
                and LOOPBACK in sans.get_values_for_type(x509.IPAddress)
                and cert.not_valid_before_utc <= now
                and cert.not_valid_after_utc - now > RENEW_BEFORE)

    @staticmethod
    def _issue_server(tls: KmsTls, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate,
                      names: list[str], now: datetime) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(min(now + SERVER_LIFETIME, ca.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in names] + [x509.IPAddress(LOOPBACK)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=False, crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write_atomic(tls.key_path, key_pem(key), 0o600)
        write_atomic(tls.cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
