"""The sealed model format, version 2: pure encoding and decoding (spec: ``docs/sealed-format.md``).

Everything here takes bytes and returns values; file and torch I/O live in ``stream`` and ``torch_load``.

Invariants:

* A sealed file is ``header || chunk_0 || ... || chunk_{n-1}``; every chunk is
  ``AES-256-GCM(stream_key, nonce_i, plaintext_i, aad=SHA-256(header))`` (ciphertext then 16-byte tag).
* ``stream_key = HKDF-SHA256(ikm=data_key, salt=header.salt, info=KDF_INFO[version])``; the salt is
  random per file, so a data key reused across files never reuses a (key, nonce) pair.
* Version 2 headers end with ``commitment = HMAC-SHA256(HKDF(data_key, salt, COMMIT_INFO), header bytes
  before it)``: :func:`check_commitment` compares it in constant time before any chunk is decrypted
  (:class:`ChunkCipher` checks it on construction), so no chunk is ever opened under a key the header
  does not commit to (:class:`KeyCommitmentError`). Version 1 has no commitment and is legacy.
* ``nonce_i = nonce_prefix(7) || i (u32 BE) || last(1)``: Tink's AES-GCM-HKDF streaming AEAD segment
  nonce, i.e. the STREAM construction (nonce-based online AE, Hoang et al. 2015).
* Every chunk but the last holds exactly ``chunk_size`` plaintext bytes; the header fixes all sizes,
  so the sealed file's length is known from the header alone.
* Chunks ``0 .. metadata_chunks-1`` hold the encrypted tensor index (names, dtypes, shapes, byte
  ranges; the architecture is IP), padded with zeros to whole chunks; the rest hold the safetensors
  data region copied as is, so payload chunk ``j`` covers payload bytes ``[j*chunk_size, ...)``.
* Every failure to decode or authenticate raises :class:`SealedModelError` with its default message
  (a commitment mismatch is its subclass :class:`KeyCommitmentError`: the caller chose the key, so
  saying so is no oracle).

The header and the safetensors header are parsed by hand: the header is our own fixed binary layout
(canonical bytes are needed because their hash is bound into every chunk), and the ``safetensors``
library exposes names, dtypes and shapes but not the ``data_offsets`` we need to copy the data region
byte for byte without loading it.

Example::

    >>> h = SealedHeader.build(key_id="k", encryption_context={"model": "m"}, wrapped_key=b"w",
    ...     chunk_size=64, metadata_chunks=1, payload_size=100, salt=bytes(32), nonce_prefix=bytes(7),
    ...     data_key=bytes(32))
    >>> decode_header(h.raw) == h, h.chunk_count, h.version
    (True, 3, 2)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nitrovault.errors import ConfigError, KeyCommitmentError, SealedModelError

MAGIC = b"NVSEALED"
#: the version written; readers accept :data:`VERSIONS`
VERSION = 2
#: version 1: no key commitment (read only behind ``allow_legacy_v1``)
LEGACY_VERSION = 1
VERSIONS = (LEGACY_VERSION, VERSION)
KDF_INFOS: Mapping[int, bytes] = MappingProxyType({
    1: b"nitrovault sealed model v1 stream key",
    2: b"nitrovault sealed model v2 stream key",
})
KDF_INFO = KDF_INFOS[VERSION]
COMMIT_INFO = b"nitrovault sealed model v2 key commitment"
COMMITMENT_LEN = 32
DATA_KEY_LEN = 32
SALT_LEN = 32
NONCE_PREFIX_LEN = 7
TAG_LEN = 16
#: magic(8) version(2) header_length(4)
PREFIX_LEN = 14
#: PREFIX + chunk_size(4) metadata_chunks(4) payload_size(8) salt(32) nonce_prefix(7)
FIXED_LEN = PREFIX_LEN + 4 + 4 + 8 + SALT_LEN + NONCE_PREFIX_LEN
MAX_HEADER_LEN = 64 * 1024
MIN_CHUNK_SIZE = 16
MAX_CHUNK_SIZE = 64 * 1024 * 1024
#: the reader allocates the whole metadata segment; bound it against a hostile header
MAX_METADATA_LEN = 64 * 1024 * 1024
MAX_CHUNKS = 1 << 32
MAX_KEY_ID_LEN = 2048  # KMS KeyId limit
MAX_WRAPPED_KEY_LEN = 6144  # KMS CiphertextBlob limit
DEFAULT_CHUNK_SIZE = 1 << 20

#: safetensors dtype name -> element size in bytes
DTYPE_SIZES: Mapping[str, int] = MappingProxyType(
    {
        "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
        "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
        "I32": 4, "U32": 4, "F32": 4,
        "I64": 8, "U64": 8, "F64": 8,
    }
)  # fmt: skip


def _fail() -> SealedModelError:
    """The one opaque failure: callers ``raise _fail() from None`` so no cause leaks."""
    return SealedModelError()


# -- header -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SealedHeader:
    """The plain (authenticated, not encrypted) header: nothing here is secret.

    ``digest`` is SHA-256 of the exact header bytes; it is bound into every chunk's AAD, so it names
    the sealed model for anyone who does not hold the data key (pin it in the enclave config).
    """

    version: int
    key_id: str
    encryption_context: Mapping[str, str] = field(hash=False)
    wrapped_key: bytes = field(repr=False)
    chunk_size: int
    metadata_chunks: int
    payload_size: int
    salt: bytes = field(repr=False)
    nonce_prefix: bytes = field(repr=False)
    raw: bytes = field(repr=False, compare=False)
    #: HMAC-SHA256 over the header bytes before it, under a key derived from the data key (v2; b"" in v1)
    commitment: bytes = field(default=b"", repr=False)

    @staticmethod
    def build(
        *,
        key_id: str,
        encryption_context: Mapping[str, str],
        wrapped_key: bytes,
        chunk_size: int,
        metadata_chunks: int,
        payload_size: int,
        salt: bytes,
        nonce_prefix: bytes,
        data_key: bytes | bytearray | None = None,
        version: int = VERSION,
    ) -> SealedHeader:
        """Encode and validate a header (raises ConfigError on bad parameters). Version 2 commits to
        ``data_key``, which it then needs."""
        fields = dict(key_id=key_id, encryption_context=encryption_context, wrapped_key=wrapped_key,
                      chunk_size=chunk_size, metadata_chunks=metadata_chunks, payload_size=payload_size,
                      salt=salt, nonce_prefix=nonce_prefix)
        if version == VERSION:
            if data_key is None or len(data_key) != DATA_KEY_LEN:
                raise ConfigError("a version-2 header commits to the data key: pass the 32-byte data_key")
            body = encode_header(**fields, version=VERSION)  # type: ignore[arg-type]
            raw = body + key_commitment(data_key, salt, body)
        elif version == LEGACY_VERSION:
            raw = encode_header(**fields, version=LEGACY_VERSION)  # type: ignore[arg-type]
        else:
            raise ConfigError(f"sealed format version must be one of {VERSIONS}")
        return decode_header(raw)

    @property
    def header_length(self) -> int:
        return len(self.raw)

    @property
    def digest(self) -> bytes:
        """SHA-256 of the header bytes (the sealed model's identity)."""
        return hashlib.sha256(self.raw).digest()

    @property
    def payload_chunks(self) -> int:
        return math.ceil(self.payload_size / self.chunk_size)

    @property
    def chunk_count(self) -> int:
        return self.metadata_chunks + self.payload_chunks

    def chunk_plain_len(self, index: int) -> int:
        """Plaintext length of chunk ``index`` (all chunks but the last are full)."""
        if index < self.metadata_chunks:
            return self.chunk_size
        j = index - self.metadata_chunks
        return min(self.chunk_size, self.payload_size - j * self.chunk_size)

    def chunk_offset(self, index: int) -> int:
        """Byte offset of chunk ``index`` in the sealed file."""
        return self.header_length + index * (self.chunk_size + TAG_LEN)

    @property
    def sealed_size(self) -> int:
        last = self.chunk_count - 1
        return self.chunk_offset(last) + self.chunk_plain_len(last) + TAG_LEN

    def payload_chunk_range(self, begin: int, end: int) -> range:
        """Global chunk indices holding payload bytes ``[begin, end)`` (empty for an empty range)."""
        if end <= begin:
            return range(0)
        first = begin // self.chunk_size
        last = (end - 1) // self.chunk_size
        return range(self.metadata_chunks + first, self.metadata_chunks + last + 1)


def _check_text(value: str, what: str, limit: int) -> bytes:
    data = value.encode("utf-8")
    if not data or len(data) > limit:
        raise ConfigError(f"{what} must be 1..{limit} UTF-8 bytes")
    return data


def encode_header(
    *,
    key_id: str,
    encryption_context: Mapping[str, str],
    wrapped_key: bytes,
    chunk_size: int,
    metadata_chunks: int,
    payload_size: int,
    salt: bytes,
    nonce_prefix: bytes,
    version: int = VERSION,
) -> bytes:
    """Canonical header bytes (context pairs sorted by key bytes; see the spec's layout table). For
    version 2 this is everything but the trailing commitment, whose length ``header_length`` counts."""
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ConfigError(f"chunk size must be {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes")
    if len(salt) != SALT_LEN or len(nonce_prefix) != NONCE_PREFIX_LEN:
        raise ConfigError("salt must be 32 bytes and nonce prefix 7 bytes")
    if not 1 <= len(wrapped_key) <= MAX_WRAPPED_KEY_LEN:
        raise ConfigError(f"wrapped key must be 1..{MAX_WRAPPED_KEY_LEN} bytes")
    if metadata_chunks < 1 or payload_size < 0:
        raise ConfigError("bad segment sizes")
    if metadata_chunks + math.ceil(payload_size / chunk_size) > MAX_CHUNKS:
        raise ConfigError("too many chunks for a 32-bit chunk index: use a larger chunk size")
    parts = [
        MAGIC,
        b"",  # version + header_length, filled below
        struct.pack(">IIQ", chunk_size, metadata_chunks, payload_size),
        bytes(salt),
        bytes(nonce_prefix),
    ]
    kid = _check_text(key_id, "key id", MAX_KEY_ID_LEN)
    parts += [struct.pack(">H", len(kid)), kid, struct.pack(">H", len(wrapped_key)), bytes(wrapped_key)]
    pairs = sorted(
        (_check_text(k, "context key", 0xFFFF), _check_text(v, "context value", 0xFFFF))
        for k, v in encryption_context.items()
    )
    if len(pairs) > 0xFFFF:
        raise ConfigError("too many encryption context pairs")
    parts.append(struct.pack(">H", len(pairs)))
    for k, v in pairs:
        parts += [struct.pack(">H", len(k)), k, struct.pack(">H", len(v)), v]
    if version not in VERSIONS:
        raise ConfigError(f"sealed format version must be one of {VERSIONS}")
    length = sum(len(p) for p in parts) + 6 + (COMMITMENT_LEN if version == VERSION else 0)
    if length > MAX_HEADER_LEN:
        raise ConfigError(f"header would exceed {MAX_HEADER_LEN} bytes")
    parts[1] = struct.pack(">HI", version, length)
    return b"".join(parts)


def key_commitment(data_key: bytes | bytearray, salt: bytes, body: bytes) -> bytes:
    """``HMAC-SHA256(HKDF-SHA256(data_key, salt, COMMIT_INFO), body)``: the v2 header's last field."""
    if len(data_key) != DATA_KEY_LEN:
        raise _fail()
    commit_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=COMMIT_INFO).derive(data_key)
    return hmac.new(commit_key, body, hashlib.sha256).digest()


def check_commitment(header: SealedHeader, data_key: bytes | bytearray) -> None:
    """Raise :class:`KeyCommitmentError` unless ``header`` commits to ``data_key`` (constant time).
    Version 1 headers commit to nothing: they pass (callers refuse them unless opted in)."""
    if header.version == LEGACY_VERSION:
        return
    if len(data_key) != DATA_KEY_LEN:
        raise KeyCommitmentError()
    body = header.raw[: header.header_length - COMMITMENT_LEN]
    if not hmac.compare_digest(key_commitment(data_key, header.salt, body), header.commitment):
        raise KeyCommitmentError()


def header_length_from_prefix(prefix: bytes) -> int:
    """Total header length from the first :data:`PREFIX_LEN` bytes (magic, version, length)."""
    if len(prefix) != PREFIX_LEN or prefix[:8] != MAGIC:
        raise _fail()
    version, length = struct.unpack(">HI", prefix[8:])
    minimum = FIXED_LEN + 8 + (COMMITMENT_LEN if version == VERSION else 0)
    if version not in VERSIONS or not minimum <= length <= MAX_HEADER_LEN:
        raise _fail()
    return int(length)


class _Cursor:
    """Bounds-checked reads over the header bytes; any overrun is the opaque failure."""

    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise _fail()
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def text(self) -> str:
        raw = self.take(self.u16())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _fail() from None


def decode_header(data: bytes) -> SealedHeader:
    """Parse exactly one header (``data`` must be the header bytes and nothing else)."""
    data = bytes(data)
    if header_length_from_prefix(data[:PREFIX_LEN]) != len(data):
        raise _fail()
    (version,) = struct.unpack(">H", data[8:10])
    cur = _Cursor(data, PREFIX_LEN)
    chunk_size, metadata_chunks, payload_size = struct.unpack(">IIQ", cur.take(16))
    salt = cur.take(SALT_LEN)
    nonce_prefix = cur.take(NONCE_PREFIX_LEN)
    key_id = cur.text()
    wrapped_key = cur.take(cur.u16())
    context: dict[str, str] = {}
    previous: bytes | None = None
    for _ in range(cur.u16()):
        key = cur.text()
        value = cur.text()
        encoded = key.encode("utf-8")
        if previous is not None and encoded <= previous:  # canonical: strictly sorted, unique
            raise _fail()
        previous = encoded
        context[key] = value
    commitment = cur.take(COMMITMENT_LEN) if version == VERSION else b""
    if cur.pos != len(data):
        raise _fail()
    header = SealedHeader(
        version=version,
        key_id=key_id,
        encryption_context=MappingProxyType(context),
        wrapped_key=wrapped_key,
        chunk_size=chunk_size,
        metadata_chunks=metadata_chunks,
        payload_size=payload_size,
        salt=salt,
        nonce_prefix=nonce_prefix,
        raw=data,
        commitment=commitment,
    )
    try:  # re-encoding must give the same bytes, which also re-applies every limit
        canonical = encode_header(
            key_id=key_id,
            encryption_context=context,
            wrapped_key=wrapped_key,
            chunk_size=chunk_size,
            metadata_chunks=metadata_chunks,
            payload_size=payload_size,
            salt=salt,
            nonce_prefix=nonce_prefix,
            version=version,
        ) + commitment
    except ConfigError:
        raise _fail() from None
    if canonical != data or metadata_chunks * chunk_size > MAX_METADATA_LEN:
        raise _fail()
    return header


# -- keys, nonces, chunks -------------------------------------------------------------------------------


def derive_stream_key(data_key: bytes | bytearray, salt: bytes, version: int = VERSION) -> bytes:
    """HKDF-SHA256(ikm=data_key, salt=salt, info=KDF_INFOS[version]) -> 32-byte AES-256-GCM key."""
    if len(data_key) != DATA_KEY_LEN or version not in KDF_INFOS:
        raise _fail()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=KDF_INFOS[version]).derive(data_key)


def chunk_nonce(nonce_prefix: bytes, index: int, last: bool) -> bytes:
    """``nonce_prefix(7) || index (u32 BE) || last (0x01 for the final chunk, else 0x00)``."""
    return nonce_prefix + struct.pack(">IB", index, 1 if last else 0)


@dataclass(frozen=True)
class ChunkCipher:
    """AES-256-GCM under the stream key, with the header digest as every chunk's AAD."""

    aead: AESGCM = field(repr=False)
    header: SealedHeader = field(repr=False)
    aad: bytes = field(repr=False)

    @staticmethod
    def for_header(header: SealedHeader, data_key: bytes | bytearray) -> ChunkCipher:
        """The cipher for ``header`` under ``data_key``; a v2 header must commit to the key first
        (:class:`KeyCommitmentError`), so no chunk can be decrypted under another key."""
        check_commitment(header, data_key)
        key = derive_stream_key(data_key, header.salt, header.version)
        return ChunkCipher(AESGCM(key), header, header.digest)

    def nonce(self, index: int) -> bytes:
        return chunk_nonce(self.header.nonce_prefix, index, index == self.header.chunk_count - 1)

    def seal_into(self, index: int, plaintext: memoryview, out: memoryview) -> None:
        """Encrypt chunk ``index``: ``out`` must be ``len(plaintext) + 16`` bytes."""
        self.aead.encrypt_into(self.nonce(index), plaintext, self.aad, out)

    def open_into(self, index: int, sealed: memoryview, out: memoryview) -> None:
        """Decrypt and authenticate chunk ``index`` into ``out`` (``len(sealed) - 16`` bytes).

        On failure ``out`` may hold unauthenticated bytes: the caller must discard it.
        """
        try:
            self.aead.decrypt_into(self.nonce(index), sealed, self.aad, out)
        except (InvalidTag, ValueError):
            raise _fail() from None


# -- encrypted metadata (the tensor index) ----------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: safetensors dtype name, shape, and ``[begin, end)`` byte range in the payload."""

    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


def _valid_info(dtype: Any, shape: Any, offsets: Any, payload_size: int) -> TensorInfo | None:
    if dtype not in DTYPE_SIZES or not isinstance(shape, list) or not isinstance(offsets, list):
        return None
    ints = [*shape, *offsets]
    if len(offsets) != 2 or not all(type(x) is int and x >= 0 for x in ints):
        return None
    begin, end = offsets
    if not begin <= end <= payload_size or end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
        return None
    return TensorInfo(dtype, tuple(shape), (begin, end))


def parse_safetensors_header(header_json: bytes, data_size: int) -> tuple[dict[str, TensorInfo], Any]:
    """Validate a safetensors JSON header against its data region; returns (tensors, ``__metadata__``).

    Offsets must tile the data region exactly (the safetensors rule: no holes, no overlaps).
    Raises ConfigError (the input is the owner's file, not a sealed model).
    """
    try:
        doc = json.loads(header_json)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError("not a safetensors file: header is not JSON") from None
    if not isinstance(doc, dict):
        raise ConfigError("not a safetensors file: header is not a JSON object")
    extra = doc.pop("__metadata__", None)
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        info = None
        if isinstance(entry, dict):
            info = _valid_info(entry.get("dtype"), entry.get("shape"), entry.get("data_offsets"), data_size)
        if info is None:
            raise ConfigError("not a safetensors file: a tensor entry is malformed or out of range")
        tensors[name] = info
    position = 0
    for info in sorted(tensors.values(), key=lambda t: t.offsets):
        if info.offsets[0] != position:
            raise ConfigError("not a safetensors file: tensor data overlaps or leaves holes")
        position = info.offsets[1]
    if position != data_size:
        raise ConfigError("not a safetensors file: data region has trailing bytes")
    return tensors, extra


def encode_metadata(tensors: Mapping[str, TensorInfo], extra: Any, chunk_size: int) -> bytes:
    """``u32 BE json_length || canonical JSON || zero padding`` to a whole number of chunks."""
    doc = {
        "tensors": [
            {"name": name, "dtype": t.dtype, "shape": list(t.shape), "offsets": list(t.offsets)}
            for name, t in tensors.items()
        ],
        "safetensors_metadata": extra,
    }
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    total = max(1, math.ceil((4 + len(body)) / chunk_size)) * chunk_size
    if total > MAX_METADATA_LEN:
        raise ConfigError("tensor index too large")
    return struct.pack(">I", len(body)) + body + bytes(total - 4 - len(body))


def decode_metadata(
    data: bytes | bytearray | memoryview, payload_size: int
) -> tuple[dict[str, TensorInfo], Any]:
    """Inverse of :func:`encode_metadata`; any deviation is the opaque failure."""
    data = bytes(data)
    if len(data) < 4:
        raise _fail()
    (length,) = struct.unpack(">I", data[:4])
    if 4 + length > len(data) or any(data[4 + length :]):
        raise _fail()
    try:
        doc = json.loads(data[4 : 4 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _fail() from None
    if not isinstance(doc, dict) or set(doc) != {"tensors", "safetensors_metadata"}:
        raise _fail()
    if not isinstance(doc["tensors"], list):
        raise _fail()
    tensors: dict[str, TensorInfo] = {}
    for entry in doc["tensors"]:
        if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape", "offsets"}:
            raise _fail()
        name = entry["name"]
        info = _valid_info(entry["dtype"], entry["shape"], entry["offsets"], payload_size)
        if not isinstance(name, str) or name in tensors or info is None:
            raise _fail()
        tensors[name] = info
    return tensors, doc["safetensors_metadata"]
