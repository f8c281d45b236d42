#!/usr/bin/env python3
"""Generate the sealed-format test vectors into ``tests/vectors/sealed/`` (``--check``: fail on drift).

Deterministic: a fixed data key, a fixed "random" source (SHA-256 in counter mode over a label) for
the salt and nonce prefix, and a plain model written byte by byte here (not with the safetensors
library, whose exact output could change between versions and cause false drift).

The positive vector ``model.sealed`` (format version 2, key-committing) decodes to the tensors of
``model-plain.st`` (safetensors bytes; named so that no model-file pattern ignores or flags it). Each
negative vector breaks one thing and must fail with SealedModelError; ``error`` in the manifest says which
check catches it: ``commitment`` (KeyCommitmentError, before any chunk is decrypted) or ``opaque``:

* ``header_byte_flipped``: one byte of the wrapped key flipped (the header still parses; it no longer
  commits to the key, and its digest, the AAD of every chunk, changes).
* ``commitment_flipped``: one byte of the header's key commitment flipped.
* ``other_key_chunks``: the genuine header byte for byte, every chunk re-encrypted under another key
  with the header's own salt, nonces and AAD (the forgery a holder of another key can make).
* ``chunk_byte_flipped``: one ciphertext byte of a payload chunk flipped.
* ``swapped_chunks``: two full payload chunks exchanged.
* ``truncated``: the last chunk dropped.
* ``appended_data``: 16 bytes appended.
* ``wrong_encryption_context``: the header re-encoded with an edited context value and a valid commitment
  (well-formed, committing): the chunks' AAD no longer matches.
* ``wrong_key``: the positive file opened with another data key.

``legacy_v1.sealed`` is the same model in format version 1 (no commitment): refused by default
(LegacySealedFormatError), readable with ``allow_legacy_v1=True``.

Usage: ``python scripts/gen_sealed_vectors.py [--check] [--out DIR]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nitrovault.envelope import SealedModel, seal_file  # noqa: E402
from nitrovault.envelope.format import (  # noqa: E402
    LEGACY_VERSION,
    TAG_LEN,
    ChunkCipher,
    SealedHeader,
    encode_header,
    key_commitment,
)

OUT = REPO / "tests" / "vectors" / "sealed"
CHUNK_SIZE = 64
DATA_KEY = bytes(range(32))
WRONG_KEY = bytes(range(1, 33))
WRAPPED_KEY = b"test-vector-wrapped-data-key (a stand-in for a KMS CiphertextBlob)"
KEY_ID = "arn:aws:kms:eu-west-1:111122223333:key/00000000-0000-4000-8000-000000000000"
CONTEXT = {"model": "tiny-test", "version": "1"}

#: name -> (dtype, shape, raw little-endian bytes); the order is the data region's order
TENSORS: dict[str, tuple[str, list[int], bytes]] = {
    "embed.weight": ("F32", [4, 6], struct.pack("<24f", *[i / 8 - 1.5 for i in range(24)])),
    "layers.0.attn.qkv": ("F16", [3, 8], struct.pack("<24e", *[(i - 12) / 4 for i in range(24)])),
    "layers.0.norm.weight": ("BF16", [8], b"".join(struct.pack("<f", 1 + i / 4)[2:] for i in range(8))),
    "layers.0.norm.bias": ("F64", [3], struct.pack("<3d", 0.5, -0.25, 3.0)),
    "position_ids": ("I64", [5], struct.pack("<5q", 0, 1, 2, 3, -4)),
    "vocab.counts": ("I32", [4], struct.pack("<4i", 7, -1, 2**31 - 1, -(2**31))),
    "quant.scale": ("I8", [5], struct.pack("<5b", -128, -1, 0, 1, 127)),
    "bytes": ("U8", [3], bytes([0, 128, 255])),
    "mask": ("BOOL", [2, 3], bytes([1, 0, 1, 1, 0, 0])),
    "empty": ("F32", [0, 4], b""),
}


def make_safetensors() -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    data, pos = [], 0
    for name, (dtype, shape, raw) in TENSORS.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(raw)]}
        data.append(raw)
        pos += len(raw)
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)  # the library pads the header to 8 bytes; so do we
    return struct.pack("<Q", len(hjson)) + hjson + b"".join(data)


def fixed_rng(label: bytes) -> Callable[[int], bytes]:
    counter = 0

    def rng(n: int) -> bytes:
        nonlocal counter
        out = b""
        while len(out) < n:
            out += hashlib.sha256(label + counter.to_bytes(8, "big")).digest()
            counter += 1
        return out[:n]

    return rng


def _flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1 :]


def generate() -> dict[str, bytes]:
    """All vector files, name -> bytes (in memory)."""
    plain = make_safetensors()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "model.safetensors", Path(tmp) / "model.sealed"
        src.write_bytes(plain)
        header = seal_file(
            src,
            dst,
            data_key=DATA_KEY,
            wrapped_key=WRAPPED_KEY,
            key_id=KEY_ID,
            encryption_context=CONTEXT,
            chunk_size=CHUNK_SIZE,
            rng=fixed_rng(b"nitrovault sealed vectors v2"),
        )
        sealed = dst.read_bytes()
        assert SealedModel.open(dst).header == header
        legacy_path = Path(tmp) / "legacy.sealed"
        seal_file(src, legacy_path, data_key=DATA_KEY, wrapped_key=WRAPPED_KEY, key_id=KEY_ID,
                  encryption_context=CONTEXT, chunk_size=CHUNK_SIZE,
                  rng=fixed_rng(b"nitrovault sealed vectors v1"), version=LEGACY_VERSION)
        legacy = legacy_path.read_bytes()
        plaintexts = _plaintext_chunks(dst, header)
    h = header
    first_payload = h.metadata_chunks
    assert h.payload_chunks >= 4, "need several full payload chunks"
    wrapped_at = sealed.index(WRAPPED_KEY)
    a, b = h.chunk_offset(first_payload + 1), h.chunk_offset(first_payload + 2)
    step = h.chunk_size + TAG_LEN
    swapped = sealed[:a] + sealed[b : b + step] + sealed[a : a + step] + sealed[b + step :]
    edited_body = encode_header(
        key_id=h.key_id,
        encryption_context={**CONTEXT, "model": "other-model"},
        wrapped_key=h.wrapped_key,
        chunk_size=h.chunk_size,
        metadata_chunks=h.metadata_chunks,
        payload_size=h.payload_size,
        salt=h.salt,
        nonce_prefix=h.nonce_prefix,
    )
    edited_ctx = edited_body + key_commitment(DATA_KEY, h.salt, edited_body)
    last = h.chunk_count - 1
    # the forgery: the genuine header, each chunk's plaintext sealed under WRONG_KEY at the same position
    # with the same AAD. It authenticates under WRONG_KEY; only the commitment refuses it.
    forger = ChunkCipher.for_header(
        SealedHeader.build(key_id=h.key_id, encryption_context=h.encryption_context,
                           wrapped_key=h.wrapped_key, chunk_size=h.chunk_size,
                           metadata_chunks=h.metadata_chunks,
                           payload_size=h.payload_size, salt=h.salt, nonce_prefix=h.nonce_prefix,
                           data_key=WRONG_KEY), WRONG_KEY)
    forged = bytearray(h.raw)
    for i, chunk in enumerate(plaintexts):
        out = bytearray(len(chunk) + TAG_LEN)
        forger.aead.encrypt_into(forger.nonce(i), chunk, h.digest, out)
        forged += out
    files = {
        "model-plain.st": plain,
        "model.sealed": sealed,
        "header_byte_flipped.sealed": _flip(sealed, wrapped_at + 3),
        "commitment_flipped.sealed": _flip(sealed, h.header_length - 1),
        "other_key_chunks.sealed": bytes(forged),
        "legacy_v1.sealed": legacy,
        "chunk_byte_flipped.sealed": _flip(sealed, h.chunk_offset(first_payload + 1) + 5),
        "swapped_chunks.sealed": swapped,
        "truncated.sealed": sealed[: h.chunk_offset(last)],
        "appended_data.sealed": sealed + bytes(16),
        "wrong_encryption_context.sealed": edited_ctx + sealed[h.header_length :],
    }
    negatives = [
        {"name": name, "file": f"{name}.sealed", "data_key": DATA_KEY.hex(), "error": error}
        for name, error in (
            ("header_byte_flipped", "commitment"),
            ("commitment_flipped", "commitment"),
            ("chunk_byte_flipped", "opaque"),
            ("swapped_chunks", "opaque"),
            ("truncated", "opaque"),
            ("appended_data", "opaque"),
            ("wrong_encryption_context", "opaque"),
        )
    ]
    # opened with the key its chunks were sealed under: the key a hostile KMS answer would release
    negatives.append({"name": "other_key_chunks", "file": "other_key_chunks.sealed",
                      "data_key": WRONG_KEY.hex(), "error": "commitment"})
    negatives.append({"name": "wrong_key", "file": "model.sealed", "data_key": WRONG_KEY.hex(),
                      "error": "commitment"})
    manifest = {
        "description": "nitrovault sealed format v2 vectors; generated by scripts/gen_sealed_vectors.py",
        "format_version": 2,
        "legacy_v1": {"file": "legacy_v1.sealed", "format_version": 1, "data_key": DATA_KEY.hex()},
        "chunk_size": CHUNK_SIZE,
        "data_key": DATA_KEY.hex(),
        "positive": {
            "file": "model.sealed",
            "plain": "model-plain.st",
            "digest": h.digest.hex(),
            "key_id": KEY_ID,
            "encryption_context": CONTEXT,
            "wrapped_key_hex": WRAPPED_KEY.hex(),
            "salt_hex": h.salt.hex(),
            "nonce_prefix_hex": h.nonce_prefix.hex(),
            "commitment_hex": h.commitment.hex(),
            "metadata_chunks": h.metadata_chunks,
            "chunk_count": h.chunk_count,
            "payload_size": h.payload_size,
            "tensors": {
                name: {"dtype": dt, "shape": shape, "sha256": hashlib.sha256(raw).hexdigest()}
                for name, (dt, shape, raw) in TENSORS.items()
            },
        },
        "negative": negatives,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
    }
    files["vectors.json"] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    return files


def _plaintext_chunks(path: Path, header: SealedHeader) -> list[bytes]:
    """Every chunk's plaintext (metadata and payload), opened with the vectors' data key."""
    model = SealedModel.open(path)
    out: list[bytes] = []
    with model.unsealer(DATA_KEY) as u:
        data = path.read_bytes()
        for i in range(header.chunk_count):
            start = header.chunk_offset(i)
            sealed = memoryview(data)[start:start + header.chunk_plain_len(i) + TAG_LEN]
            plain = bytearray(header.chunk_plain_len(i))
            u.cipher.open_into(i, sealed, memoryview(plain))
            out.append(bytes(plain))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="regenerate in memory; exit 1 on drift")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    files = generate()
    if args.check:
        expected = set(files) | {p.name for p in args.out.glob("*") if p.is_file()}
        drift = sorted(
            n for n in expected if not (args.out / n).is_file() or (args.out / n).read_bytes() != files.get(n)
        )
        for name in drift:
            print(f"drift: {name}", file=sys.stderr)
        return 1 if drift else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (args.out / name).write_bytes(data)
    print(f"wrote {len(files)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
