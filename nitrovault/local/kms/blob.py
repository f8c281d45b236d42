"""The KMS emulator's ciphertext blob: which key, which key material, and an AES-256-GCM box.

Layout (all integers big-endian)::

    version (1 byte, = 1) || key id (16-byte UUID) || material version (4 bytes) || nonce (12 bytes)
    || AES-256-GCM(material, plaintext, aad) ciphertext || 16-byte tag

    aad = header (the first 33 bytes above) || canonical(encryption context) || key ARN
    canonical(ctx) = count (4) || for each (key, value) sorted by UTF-8 key: len(key) (4) || key
                     || len(value) (4) || value

Invariants:

* The blob names its key, so ``Decrypt`` without ``KeyId`` works (like real KMS), but the key id, the
  material version, the encryption context and the key ARN are all authenticated: changing any of them,
  or any ciphertext byte, fails with one opaque :class:`~nitrovault.errors.InvalidCiphertextError`.
* Old material versions stay usable after rotation: the blob says which one sealed it.
* Real KMS blobs are opaque and differ from these; nothing outside the emulator may parse them.

Hand-written (not a library format) because it is the emulator's private wire format; it is the
smallest layout that binds the key, the material version and the encryption context.

Example::

    >>> import uuid
    >>> kid = uuid.UUID(int=1); arn = "arn:aws:kms:us-east-1:111122223333:key/" + str(kid)
    >>> box = seal(b"k" * 32, key_id=kid, material_version=0, key_arn=arn,
    ...            context={"model": "m"}, plaintext=b"hi", nonce=b"n" * 12)
    >>> parse(box).key_id == kid
    True
    >>> open_blob(b"k" * 32, parse(box), key_arn=arn, context={"model": "m"})
    b'hi'
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nitrovault.errors import InvalidCiphertextError

VERSION = 1
NONCE_LEN = 12
TAG_LEN = 16
_HEADER = struct.Struct(">B16sI")
HEADER_LEN = _HEADER.size + NONCE_LEN
_INVALID = "The ciphertext is invalid or was not encrypted under this key and encryption context."


@dataclass(frozen=True)
class ParsedBlob:
    """A blob's public header; ``box`` is the GCM ciphertext with its tag."""

    key_id: uuid.UUID
    material_version: int
    nonce: bytes
    box: bytes
    header: bytes


def canonical_context(context: Mapping[str, str]) -> bytes:
    """Length-prefixed, key-sorted encoding: no two different contexts share an encoding."""
    items = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items())
    out = [struct.pack(">I", len(items))]
    for key, value in items:
        out += [struct.pack(">I", len(key)), key, struct.pack(">I", len(value)), value]
    return b"".join(out)


def _aad(header: bytes, key_arn: str, context: Mapping[str, str]) -> bytes:
    return header + canonical_context(context) + key_arn.encode("utf-8")


def seal(
    material: bytes,
    *,
    key_id: uuid.UUID,
    material_version: int,
    key_arn: str,
    context: Mapping[str, str],
    plaintext: bytes,
    nonce: bytes,
) -> bytes:
    """Encrypt ``plaintext`` under one version of a key's material; ``nonce`` must be fresh random."""
    if len(material) != 32 or len(nonce) != NONCE_LEN:
        raise ValueError("material must be 32 bytes and nonce 12 bytes")
    header = _HEADER.pack(VERSION, key_id.bytes, material_version) + nonce
    return header + AESGCM(material).encrypt(nonce, plaintext, _aad(header, key_arn, context))


def parse(blob: bytes) -> ParsedBlob:
    """Read the header; raises :class:`InvalidCiphertextError` when it cannot be one of our blobs."""
    if len(blob) < HEADER_LEN + TAG_LEN:
        raise InvalidCiphertextError(_INVALID)
    version, key_bytes, material_version = _HEADER.unpack_from(blob)
    if version != VERSION:
        raise InvalidCiphertextError(_INVALID)
    return ParsedBlob(
        key_id=uuid.UUID(bytes=key_bytes),
        material_version=material_version,
        nonce=blob[_HEADER.size : HEADER_LEN],
        box=blob[HEADER_LEN:],
        header=blob[:HEADER_LEN],
    )


def open_blob(material: bytes, blob: ParsedBlob, *, key_arn: str, context: Mapping[str, str]) -> bytes:
    """Authenticate and decrypt; one opaque :class:`InvalidCiphertextError` for every failure."""
    try:
        return AESGCM(material).decrypt(blob.nonce, blob.box, _aad(blob.header, key_arn, context))
    except InvalidTag:
        raise InvalidCiphertextError(_INVALID) from None
