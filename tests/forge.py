"""Forge synthetic Nitro attestation documents with a throwaway P-384 PKI, for negative tests.

The shape copies AWS's: root -> intermediate -> leaf (the leaf, like AWS's, has no AuthorityKeyIdentifier),
cabundle root first, all nine payload fields in NSM order, untagged COSE_Sign1 with protected {1: -35}.
Every knob breaks one thing: a field override, a dropped field, another protected header, a tag, the
signing key, certificate validity windows, an intermediate that is not a CA.

    pki = make_pki(AT)
    raw = forge(pki, AT, nonce=b"n")              # valid at AT with root=pki.root
    raw = forge(pki, AT, digest=DROP)             # InvalidPayloadError
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.x509.oid import NameOID

PROTECTED_ES384 = b"\xa1\x01\x38\x22"
FIELD_ORDER = (
    "module_id",
    "digest",
    "timestamp",
    "pcrs",
    "certificate",
    "cabundle",
    "public_key",
    "user_data",
    "nonce",
)


@functools.cache
def key(name: str) -> ec.EllipticCurvePrivateKey:
    """A P-384 key per name, made once per test session (keeps the tests fast)."""
    return ec.generate_private_key(ec.SECP384R1())


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.COUNTRY_NAME, "US"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def make_cert(
    cn: str,
    subject_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    not_after: datetime,
    *,
    ca: bool,
    key_cert_sign: bool | None = None,
    digital_signature: bool = True,
    aki: bool | None = None,
) -> x509.Certificate:
    """One certificate. ``issuer=None`` makes it self-signed. ``aki`` defaults to "CA and not self-signed"."""
    key_cert_sign = ca if key_cert_sign is None else key_cert_sign
    public = subject_key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn) if issuer is None else issuer.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=digital_signature,
                content_commitment=not ca,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=ca,
        )
    )
    if ca:
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    if (ca and issuer is not None) if aki is None else aki:
        issuer_public = issuer_key.public_key()
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA384())


@dataclass(frozen=True)
class Pki:
    root: x509.Certificate
    intermediate: x509.Certificate
    leaf: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey

    @property
    def cabundle(self) -> list[bytes]:
        return [c.public_bytes(_DER) for c in (self.root, self.intermediate)]


_DER = serialization.Encoding.DER


def make_pki(
    at: datetime,
    *,
    prefix: str = "forge",
    intermediate_ca: bool = True,
    intermediate_window: tuple[timedelta, timedelta] = (timedelta(days=1), timedelta(days=5)),
    leaf_window: tuple[timedelta, timedelta] = (timedelta(seconds=3), timedelta(hours=3)),
) -> Pki:
    """A chain valid at ``at``: windows are (before ``at``, after ``at``)."""
    root_key, int_key, leaf_key = key(f"{prefix}-root"), key(f"{prefix}-int"), key(f"{prefix}-leaf")
    root = make_cert(
        f"{prefix}.nitro-enclaves",
        root_key,
        None,
        root_key,
        at - timedelta(days=365),
        at + timedelta(days=3650),
        ca=True,
    )
    intermediate = make_cert(
        f"{prefix}-int.nitro-enclaves",
        int_key,
        root,
        root_key,
        at - intermediate_window[0],
        at + intermediate_window[1],
        ca=intermediate_ca,
        key_cert_sign=True,
    )
    leaf = make_cert(
        f"i-0123-enc{prefix}.aws",
        leaf_key,
        intermediate,
        int_key,
        at - leaf_window[0],
        at + leaf_window[1],
        ca=False,
    )
    return Pki(root=root, intermediate=intermediate, leaf=leaf, leaf_key=leaf_key)


def pcr_value(index: int) -> bytes:
    """A deterministic non-zero 48-byte PCR (PCR0/1/2/4 set, like a production enclave)."""
    return hashlib.sha384(b"forge-pcr-%d" % index).digest() if index in (0, 1, 2, 4) else bytes(48)


DROP = object()  #: pass as a field value to leave the field out


def payload_fields(pki: Pki, at: datetime, **overrides: Any) -> dict[str, Any]:
    """The nine payload fields in NSM order; ``overrides`` replace values (``DROP`` removes one)."""
    fields: dict[str, Any] = {
        "module_id": "i-0123456789abcdef0-enc0123456789abcdef",
        "digest": "SHA384",
        "timestamp": int(at.timestamp() * 1000),
        "pcrs": {i: pcr_value(i) for i in range(16)},
        "certificate": pki.leaf.public_bytes(_DER),
        "cabundle": pki.cabundle,
        "public_key": None,
        "user_data": b"",
        "nonce": None,
    }
    fields.update(overrides)
    return {k: v for k, v in fields.items() if v is not DROP}


def sign1(
    payload: bytes,
    signing_key: ec.EllipticCurvePrivateKey,
    *,
    protected: bytes = PROTECTED_ES384,
    unprotected: Any = None,
    tag: int | None = None,
) -> bytes:
    """A COSE_Sign1 over ``payload`` (raw r||s ES384 signature); ``tag`` wraps it (18 = COSE_Sign1)."""
    sig_structure = cbor2.dumps(["Signature1", protected, b"", payload])
    r, s = utils.decode_dss_signature(signing_key.sign(sig_structure, ec.ECDSA(hashes.SHA384())))
    signature = r.to_bytes(48, "big") + s.to_bytes(48, "big")
    item: Any = [protected, {} if unprotected is None else unprotected, payload, signature]
    if tag is not None:
        item = cbor2.CBORTag(tag, item)
    return cbor2.dumps(item)


def forge(
    pki: Pki,
    at: datetime,
    *,
    signing_key: ec.EllipticCurvePrivateKey | None = None,
    protected: bytes = PROTECTED_ES384,
    unprotected: Any = None,
    tag: int | None = None,
    **overrides: Any,
) -> bytes:
    """A whole document: payload fields (with ``overrides``) signed by the leaf key (or ``signing_key``)."""
    payload = cbor2.dumps(payload_fields(pki, at, **overrides))
    return sign1(payload, signing_key or pki.leaf_key, protected=protected, unprotected=unprotected, tag=tag)
