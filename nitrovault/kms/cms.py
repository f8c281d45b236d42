"""KMS ``CiphertextForRecipient``: a CMS ContentInfo(EnvelopedData) (RFC 5652), opened and built.

When an enclave calls KMS with ``Recipient``, KMS does not return ``Plaintext``; it returns the
plaintext encrypted to the RSA key from the attestation document, wrapped as CMS EnvelopedData:
one KeyTransRecipientInfo with RSAES-OAEP (SHA-256, MGF1-SHA-256) key transport and AES-256-CBC
content encryption with PKCS#7 padding (aws-nitro-enclaves-sdk-c ``source/cms.c``).

Invariants of :func:`open_ciphertext_for_recipient` (and of :func:`parse_enveloped_data`, its pure
parsing half):

* input is bounded (:data:`MAX_ENVELOPE_SIZE`); BER or DER, definite or indefinite lengths; no
  trailing bytes after the ContentInfo;
* exactly one RecipientInfo, and it is a KeyTransRecipientInfo; the rid may be a
  subjectKeyIdentifier (version 2, what KMS sends) or issuerAndSerialNumber (version 0). The rid is
  *not* matched against our key: how KMS derives its 32-byte SKI is undocumented, and sdk-c ignores
  it too. The OAEP decryption is what binds the envelope to our key;
* fail closed on algorithms: only RSAES-OAEP with SHA-256, MGF1-SHA-256 (hash parameters NULL or
  absent) and an empty label, and only AES-256-CBC with a 16-byte IV. Anything else raises
  :class:`~nitrovault.errors.UnsupportedAlgorithmError`;
* a wrong key, a corrupted key or content and bad padding all raise the *same*
  :class:`~nitrovault.errors.EnvelopeError` message, and the content step runs (with a dummy key)
  even when the key step failed, so neither text nor control flow tell a padding oracle which step
  failed. Plaintext never appears in an exception.

Why hand-written: pyca/cryptography's ``pkcs7_decrypt_*`` supports neither OAEP key transport nor a
subjectKeyIdentifier rid and wants a certificate; its ``PKCS7EnvelopeBuilder`` emits only PKCS#1 v1.5
(docs/design.md, "Environment decisions"). So asn1crypto parses (it reads BER) and cryptography
supplies the primitives.

Example::

    >>> from nitrovault.kms.recipient import RecipientKey
    >>> key = RecipientKey.generate()
    >>> blob = build_ciphertext_for_recipient(b"k" * 32, key.public_key_der)
    >>> open_ciphertext_for_recipient(blob, key.private_key) == b"k" * 32
    True
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from asn1crypto import algos, cms, core
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nitrovault.errors import EnvelopeError, UnsupportedAlgorithmError

__all__ = [
    "CONTENT_ALGORITHM",
    "KEY_ALGORITHM",
    "MAX_ENVELOPE_SIZE",
    "MAX_PLAINTEXT_SIZE",
    "EnvelopeParts",
    "build_ciphertext_for_recipient",
    "open_ciphertext_for_recipient",
    "parse_enveloped_data",
]

#: Largest envelope we parse. KMS answers are at most 6144 bytes; we allow headroom, not unbounded input.
MAX_ENVELOPE_SIZE = 64 * 1024
#: Largest plaintext the builder wraps (KMS plaintexts are at most 4096 bytes; data key pairs a bit more).
MAX_PLAINTEXT_SIZE = 16 * 1024
#: The only key transport accepted (KMS ``KeyEncryptionAlgorithm`` name).
KEY_ALGORITHM = "RSAES_OAEP_SHA_256"
#: The only content encryption accepted.
CONTENT_ALGORITHM = "AES_256_CBC"
MIN_RSA_BITS = 2048

_AES_KEY_LEN = 32
_IV_LEN = 16
_EOC = b"\x00\x00"
# One message for every failure that depends on the private key, so the exception is no oracle.
_OPEN_FAILED = "could not open the envelope: wrong key, or the envelope is corrupted"

RidKind = Literal["subject_key_identifier", "issuer_and_serial_number"]


@dataclass(frozen=True)
class EnvelopeParts:
    """The fields of a supported CiphertextForRecipient, as parsed (nothing decrypted yet).

    Only envelopes whose algorithms passed the checks are ever represented, so ``key_algorithm`` is
    always :data:`KEY_ALGORITHM` and ``content_algorithm`` always :data:`CONTENT_ALGORITHM`.
    """

    #: EnvelopedData version (2 from KMS; 0 for issuerAndSerialNumber-only envelopes).
    version: int
    #: How the recipient is named.
    rid_kind: RidKind
    #: The SKI bytes, or the DER of IssuerAndSerialNumber.
    rid_value: bytes
    key_algorithm: str
    #: RSA-OAEP ciphertext of the content-encryption key (256 bytes for RSA-2048).
    encrypted_key: bytes
    content_algorithm: str
    iv: bytes
    #: AES-256-CBC ciphertext, chunks of a constructed [0] already concatenated.
    encrypted_content: bytes


# -- parsing -------------------------------------------------------------------------------------------


def parse_enveloped_data(data: bytes) -> EnvelopeParts:
    """Parse and check a CMS ContentInfo(EnvelopedData); raise on anything unsupported or malformed.

    :raises UnsupportedAlgorithmError: a recipient kind or algorithm other than the KMS ones.
    :raises EnvelopeError: too large, not BER, not EnvelopedData, or a field of the wrong shape.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EnvelopeError("envelope must be bytes")
    data = bytes(data)
    if not data:
        raise EnvelopeError("envelope is empty")
    if len(data) > MAX_ENVELOPE_SIZE:
        raise EnvelopeError(f"envelope is larger than {MAX_ENVELOPE_SIZE} bytes")
    try:
        return _parse(data)
    except (EnvelopeError, UnsupportedAlgorithmError):
        raise
    except Exception as exc:  # asn1crypto parses lazily and raises ValueError/TypeError/KeyError/...
        raise EnvelopeError(f"malformed CMS envelope ({type(exc).__name__})") from None


def _parse(data: bytes) -> EnvelopeParts:
    info = cms.ContentInfo.load(data, strict=True)
    if info["content_type"].native != "enveloped_data":
        raise EnvelopeError(f"CMS content type is {info['content_type'].native!r}, not envelopedData")
    env = info["content"]
    version = _version(env["version"])
    if version not in (0, 2):
        raise EnvelopeError(f"unsupported EnvelopedData version {version}")

    # Exactly one recipient, and it must be key transport (what KMS sends).
    recipients = env["recipient_infos"]
    if len(recipients) != 1:
        raise EnvelopeError(f"expected exactly one RecipientInfo, found {len(recipients)}")
    recipient = recipients[0]
    if recipient.name != "ktri":
        raise UnsupportedAlgorithmError(
            f"unsupported RecipientInfo kind {recipient.name!r}; only KeyTransRecipientInfo (ktri)"
        )
    ktri = recipient.chosen
    rid_kind, rid_value = _rid(ktri)
    _check_key_algorithm(ktri["key_encryption_algorithm"])
    encrypted_key = ktri["encrypted_key"].native
    if not isinstance(encrypted_key, bytes) or not encrypted_key:
        raise EnvelopeError("encryptedKey is empty")

    eci = env["encrypted_content_info"]
    if eci["content_type"].native != "data":
        raise EnvelopeError("encrypted content type is not id-data")
    iv = _check_content_algorithm(eci["content_encryption_algorithm"])
    content = eci["encrypted_content"].native
    if content is None:
        raise EnvelopeError("encryptedContent is absent (detached content is not supported)")
    if not isinstance(content, bytes) or not content or len(content) % _IV_LEN:
        raise EnvelopeError("encryptedContent is not a whole, non-zero number of AES blocks")

    return EnvelopeParts(
        version=version,
        rid_kind=rid_kind,
        rid_value=rid_value,
        key_algorithm=KEY_ALGORITHM,
        encrypted_key=encrypted_key,
        content_algorithm=CONTENT_ALGORITHM,
        iv=iv,
        encrypted_content=content,
    )


def _version(value: Any) -> int:
    # asn1crypto maps CMSVersion to "v0".."v5"; out-of-range integers come back as int.
    native = value.native
    if isinstance(native, str) and native.startswith("v"):
        return int(native[1:])
    return int(native)


def _rid(ktri: Any) -> tuple[RidKind, bytes]:
    version = _version(ktri["version"])
    rid = ktri["rid"]
    # RFC 5652 §6.2.1: version 0 with issuerAndSerialNumber, version 2 with subjectKeyIdentifier.
    if rid.name == "subject_key_identifier":
        if version != 2:
            raise EnvelopeError("KeyTransRecipientInfo with subjectKeyIdentifier must be version 2")
        value = rid.chosen.native
        if not isinstance(value, bytes) or not value:
            raise EnvelopeError("empty subjectKeyIdentifier")
        return "subject_key_identifier", value
    if rid.name == "issuer_and_serial_number":
        if version != 0:
            raise EnvelopeError("KeyTransRecipientInfo with issuerAndSerialNumber must be version 0")
        _ = rid.chosen.native  # force the lazy parse so malformed contents fail here
        return "issuer_and_serial_number", rid.chosen.dump()
    raise EnvelopeError(f"unknown recipient identifier {rid.name!r}")


def _is_null_or_absent(params: Any) -> bool:
    return isinstance(params, core.Void) or bytes(params.dump()) == b"\x05\x00"


def _check_sha256(alg: Any, where: str) -> None:
    name = alg["algorithm"].native
    if name != "sha256":
        raise UnsupportedAlgorithmError(f"{where} is {name!r}; only sha256 is supported")
    if not _is_null_or_absent(alg["parameters"]):
        raise UnsupportedAlgorithmError(f"{where} sha256 has parameters other than NULL")


def _check_key_algorithm(alg: Any) -> None:
    name = alg["algorithm"].native
    if name != "rsaes_oaep":
        # e.g. "rsaes_pkcs1v15" (rsaEncryption): refused, it is the Bleichenbacher-prone one.
        raise UnsupportedAlgorithmError(
            f"key transport {name!r} is not supported; only RSAES-OAEP with SHA-256"
        )
    params = alg["parameters"]
    if isinstance(params, core.Void):
        # All-default RSAES-OAEP-params mean SHA-1 / MGF1-SHA-1.
        raise UnsupportedAlgorithmError("RSAES-OAEP with default (SHA-1) parameters is not supported")
    _check_sha256(params["hash_algorithm"], "OAEP hash")
    mgf = params["mask_gen_algorithm"]
    if mgf["algorithm"].native != "mgf1":
        raise UnsupportedAlgorithmError(f"OAEP mask generation {mgf['algorithm'].native!r} is not MGF1")
    _check_sha256(mgf["parameters"], "MGF1 hash")
    p_source = params["p_source_algorithm"]
    if p_source["algorithm"].native != "p_specified" or p_source["parameters"].native not in (b"", None):
        raise UnsupportedAlgorithmError("OAEP with a non-empty label (pSource) is not supported")


def _check_content_algorithm(alg: Any) -> bytes:
    name = alg["algorithm"].native
    if name != "aes256_cbc":
        raise UnsupportedAlgorithmError(f"content encryption {name!r} is not supported; only AES-256-CBC")
    iv = alg["parameters"].native
    if not isinstance(iv, bytes) or len(iv) != _IV_LEN:
        raise EnvelopeError("AES-256-CBC IV must be 16 bytes")
    return iv


# -- opening -------------------------------------------------------------------------------------------


def _oaep() -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def open_ciphertext_for_recipient(data: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """Open a KMS ``CiphertextForRecipient`` with the enclave's RSA private key; return the plaintext.

    :raises UnsupportedAlgorithmError: see :func:`parse_enveloped_data`.
    :raises EnvelopeError: malformed input, or (one message for all) wrong key / corrupted / bad padding.
    """
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise EnvelopeError("the recipient key must be an RSA private key")
    parts = parse_enveloped_data(data)

    failed = False
    try:
        cek = private_key.decrypt(parts.encrypted_key, _oaep())
    except ValueError:
        cek = b""
    if len(cek) != _AES_KEY_LEN:
        # Keep going with a dummy key so the content step runs either way (no timing shortcut that
        # tells "key step failed" from "padding failed"); the result is discarded below.
        failed = True
        cek = bytes(_AES_KEY_LEN)

    decryptor = Cipher(algorithms.AES(cek), modes.CBC(parts.iv)).decryptor()
    padded = decryptor.update(parts.encrypted_content) + decryptor.finalize()
    unpadder = sym_padding.PKCS7(algorithms.AES.block_size).unpadder()
    try:
        plaintext = unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        failed = True
        plaintext = b""
    if failed:
        raise EnvelopeError(_OPEN_FAILED)
    return plaintext


# -- building (for the KMS emulator) -------------------------------------------------------------------


def build_ciphertext_for_recipient(
    plaintext: bytes,
    recipient_public_key_der: bytes,
    *,
    rng: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """Wrap ``plaintext`` for the holder of an RSA key the way real KMS does; return the BER bytes.

    The layout copies the real KMS samples structure for structure::

        30 80  ContentInfo                               indefinite
          06 09 envelopedData
          a0 80  [0]                                     indefinite
            30 80  EnvelopedData                         indefinite
              02 01 02                                   version 2
              31 82 ..  RecipientInfos { ktri v2, rid [0] SKI (32 bytes),
                        rsaesOaep { [0] sha256 NULL, [1] mgf1 { sha256 NULL } }, encryptedKey }
              30 80  EncryptedContentInfo                indefinite
                06 09 data
                30 1d { aes256-CBC, OCTET STRING IV(16) }
                a0 80  [0] encryptedContent              indefinite, constructed
                  04 .. one OCTET STRING
                00 00
              00 00
            00 00
          00 00
        00 00

    Why hand-framed: asn1crypto (like every DER encoder) only writes definite lengths, but the sdk-c
    client parser (``aws_cms_parse_enveloped_data``) walks these four outer elements expecting
    indefinite-length BER headers and would reject a DER envelope. So the definite inner parts (the
    RecipientInfos SET, the AlgorithmIdentifiers, the OCTET STRING) are encoded by asn1crypto and only
    the indefinite headers and their end-of-contents octets are written by hand.

    The rid is SHA-256 of the recipient's DER SubjectPublicKeyInfo (32 bytes like KMS's; how KMS
    derives its value is undocumented and decoders ignore it). ``rng`` supplies the content key and IV;
    the OAEP seed comes from OpenSSL (cryptography offers no hook for it).

    :raises EnvelopeError: the key is not a DER SPKI of an RSA key of at least 2048 bits, or the
        plaintext is larger than :data:`MAX_PLAINTEXT_SIZE`.
    """
    plaintext = bytes(plaintext)
    if len(plaintext) > MAX_PLAINTEXT_SIZE:
        raise EnvelopeError(f"plaintext is larger than {MAX_PLAINTEXT_SIZE} bytes")
    public_key = _load_rsa_spki(recipient_public_key_der)
    spki = bytes(recipient_public_key_der)

    cek = rng(_AES_KEY_LEN)
    iv = rng(_IV_LEN)
    if len(cek) != _AES_KEY_LEN or len(iv) != _IV_LEN:
        raise EnvelopeError("rng returned the wrong number of bytes")

    padder = sym_padding.PKCS7(algorithms.AES.block_size).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(cek), modes.CBC(iv)).encryptor()
    content = encryptor.update(padded) + encryptor.finalize()
    encrypted_key = public_key.encrypt(cek, _oaep())

    sha256_null = {"algorithm": "sha256", "parameters": core.Null()}
    key_algorithm = cms.KeyEncryptionAlgorithm(
        {
            "algorithm": "rsaes_oaep",
            "parameters": algos.RSAESOAEPParams(
                {
                    "hash_algorithm": algos.DigestAlgorithm(sha256_null),
                    "mask_gen_algorithm": algos.MaskGenAlgorithm(
                        {"algorithm": "mgf1", "parameters": algos.DigestAlgorithm(sha256_null)}
                    ),
                }
            ),
        }
    )
    ktri = cms.KeyTransRecipientInfo(
        {
            "version": "v2",
            "rid": cms.RecipientIdentifier(
                name="subject_key_identifier", value=hashlib.sha256(spki).digest()
            ),
            "key_encryption_algorithm": key_algorithm,
            "encrypted_key": encrypted_key,
        }
    )
    recipient_infos = cms.RecipientInfos([cms.RecipientInfo(name="ktri", value=ktri)])
    content_algorithm = algos.EncryptionAlgorithm({"algorithm": "aes256_cbc", "parameters": iv})

    return b"".join(
        [
            b"\x30\x80",  # ContentInfo SEQUENCE
            cms.ContentType("enveloped_data").dump(),
            b"\xa0\x80",  # [0] EXPLICIT content
            b"\x30\x80",  # EnvelopedData SEQUENCE
            core.Integer(2).dump(),
            recipient_infos.dump(),
            b"\x30\x80",  # EncryptedContentInfo SEQUENCE
            cms.ContentType("data").dump(),
            content_algorithm.dump(),
            b"\xa0\x80",  # [0] IMPLICIT encryptedContent, constructed
            core.OctetString(content).dump(),
            _EOC,  # end of [0] encryptedContent
            _EOC,  # end of EncryptedContentInfo
            _EOC,  # end of EnvelopedData
            _EOC,  # end of [0]
            _EOC,  # end of ContentInfo
        ]
    )


def _load_rsa_spki(der: bytes) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_der_public_key(bytes(der))
    except (ValueError, TypeError):
        raise EnvelopeError("recipient public key is not a DER SubjectPublicKeyInfo") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise EnvelopeError("recipient public key is not an RSA key")
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if spki != bytes(der):
        # load_der_public_key also takes a bare PKCS#1 RSAPublicKey; KMS requires a DER SPKI.
        raise EnvelopeError("recipient public key is not a DER SubjectPublicKeyInfo")
    if key.key_size < MIN_RSA_BITS:
        raise EnvelopeError(f"recipient RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} required")
    return key
