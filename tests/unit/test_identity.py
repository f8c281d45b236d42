"""The enclave's TLS identity (``nitrovault.identity``) and the boot step that takes it out of the sealed
metadata (``enclave_app.boot.take_tls_identity``): each check gets a case that fails only it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from enclave_app.boot import take_tls_identity
from nitrovault.errors import TlsIdentityError
from nitrovault.identity import SEALED_KEY, TlsIdentity, dns_names, spki_sha256

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def certificate(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, *, san: bool = True) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "e.example")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(1).not_valid_before(NOW).not_valid_after(NOW + timedelta(days=1)))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("e.example")]), False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_a_generated_identity_round_trips_through_the_sealed_metadata() -> None:
    identity = TlsIdentity.generate("enclave.example.internal", now=NOW)
    again = TlsIdentity.from_sealed_metadata(identity.sealed_metadata())
    assert again == identity and again.spki_sha256 == spki_sha256(identity.leaf)
    assert identity.server_name == "enclave.example.internal" == dns_names(identity.leaf)[0]
    assert "PRIVATE" not in repr(identity)
    assert identity.valid_at(NOW) and not identity.valid_at(NOW + timedelta(days=400))


def test_an_owner_supplied_key_and_chain_are_accepted() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    identity = TlsIdentity.from_pem(pem_key(key), certificate(key))
    assert identity.server_name == "e.example"


@pytest.mark.parametrize("case, says", [
    ("other-key", "does not belong"),
    ("no-san", "no subjectAltName"),
    ("weak-rsa", "at least 2048"),
    ("not-pem", "not an unencrypted PEM"),
    ("no-chain", "not PEM certificates"),
    ("bad-name", "must be a DNS name"),
])
def test_a_bad_identity_is_refused(case: str, says: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(TlsIdentityError, match=says):
        if case == "other-key":
            TlsIdentity.from_pem(pem_key(key), certificate(ec.generate_private_key(ec.SECP256R1())))
        elif case == "no-san":
            TlsIdentity.from_pem(pem_key(key), certificate(key, san=False))
        elif case == "weak-rsa":
            weak = rsa.generate_private_key(65537, 1024)  # noqa: S505 - the weak key it must refuse
            TlsIdentity.from_pem(pem_key(weak), certificate(weak))
        elif case == "not-pem":
            TlsIdentity.from_pem(b"nope", certificate(key))
        elif case == "no-chain":
            TlsIdentity.from_pem(pem_key(key), b"not a certificate")
        else:
            TlsIdentity.generate("not a name!", now=NOW)


def test_boot_takes_the_identity_out_of_the_metadata() -> None:
    identity = TlsIdentity.generate("enclave.example.internal", now=NOW)
    metadata = {"nitrovault.config": "{}", **identity.sealed_metadata()}
    assert take_tls_identity(metadata, now=NOW).spki_sha256 == identity.spki_sha256
    assert metadata == {"nitrovault.config": "{}"}  # the model handler never sees the key


@pytest.mark.parametrize("case, says", [
    ("missing", "carries no TLS identity"),
    ("half", "only one of"),
    ("expired", "outside its validity"),
])
def test_boot_refuses_a_model_without_a_usable_identity(case: str, says: str) -> None:
    identity = TlsIdentity.generate("enclave.example.internal", now=NOW)
    metadata: dict[str, str] = {}
    when = NOW
    if case == "half":
        metadata = {SEALED_KEY: identity.sealed_metadata()[SEALED_KEY]}
    elif case == "expired":
        metadata, when = identity.sealed_metadata(), NOW + timedelta(days=400)
    with pytest.raises(TlsIdentityError, match=says) as refused:
        take_tls_identity(metadata, now=when)
    key_body = identity.private_key_pem.decode().splitlines()[1]
    assert "PRIVATE" not in str(refused.value) and key_body not in str(refused.value)
