"""The sealed model format: header codec, KDF/nonce/AAD binding, tensor index, round trips, tampering."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from nitrovault.envelope import SealedModel, seal_file, zeroize
from nitrovault.envelope import stream as stream_mod
from nitrovault.envelope.format import (
    KDF_INFO,
    MAGIC,
    TAG_LEN,
    ChunkCipher,
    SealedHeader,
    TensorInfo,
    chunk_nonce,
    decode_header,
    decode_metadata,
    derive_stream_key,
    encode_metadata,
    parse_safetensors_header,
)
from nitrovault.errors import ConfigError, KeyCommitmentError, SealedModelError

KEY = bytes(range(32))
OPAQUE = str(SealedModelError())


def _header(**over: object) -> SealedHeader:
    args: dict[str, object] = {
        "key_id": "alias/models",
        "encryption_context": {"version": "2", "model": "m"},
        "wrapped_key": b"\x01" * 40,
        "chunk_size": 64,
        "metadata_chunks": 2,
        "payload_size": 200,
        "salt": bytes(range(32)),
        "nonce_prefix": b"\xaa" * 7,
        "data_key": KEY,
    }
    args.update(over)
    return SealedHeader.build(**args)  # type: ignore[arg-type]


def _opaque(exc: pytest.ExceptionInfo[SealedModelError]) -> None:
    assert str(exc.value) == OPAQUE
    assert exc.value.__cause__ is None


def _seal(tmp_path: Path, tensors: dict[str, torch.Tensor], chunk_size: int = 64, **kw: object) -> Path:
    src, dst = tmp_path / "m.safetensors", tmp_path / "m.sealed"
    save_file(tensors, str(src))
    seal_file(
        src,
        dst,
        data_key=KEY,
        wrapped_key=b"wrapped",
        key_id="k",
        encryption_context={"model": "m"},
        chunk_size=chunk_size,
        **kw,  # type: ignore[arg-type]
    )
    return dst


ALL_DTYPES = {
    "f32": torch.randn(3, 5),
    "f16": torch.randn(7).half(),
    "bf16": torch.randn(2, 9).bfloat16(),
    "f64": torch.randn(4, dtype=torch.float64),
    "i64": torch.arange(-5, 6, dtype=torch.int64),
    "i32": torch.arange(13, dtype=torch.int32) * -7,
    "i16": torch.arange(5, dtype=torch.int16),
    "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
    "u8": torch.arange(200, dtype=torch.uint8),
    "bool": torch.tensor([[True, False], [False, True]]),
    "empty": torch.empty(0, 3),
    "scalar": torch.tensor(3.5),
}


# -- header ----------------------------------------------------------------------------------------------


def test_header_round_trip_and_layout() -> None:
    h = _header()
    assert decode_header(h.raw) == h
    assert h.raw[:8] == MAGIC == b"NVSEALED"
    assert struct.unpack(">HI", h.raw[8:14]) == (2, len(h.raw))
    assert h.raw[-32:] == h.commitment and len(h.commitment) == 32
    assert struct.unpack(">IIQ", h.raw[14:30]) == (64, 2, 200)
    assert h.raw[30:62] == bytes(range(32)) and h.raw[62:69] == b"\xaa" * 7
    assert list(h.encryption_context) == ["model", "version"]  # canonical: sorted
    assert h.digest == hashlib.sha256(h.raw).digest()
    assert h.chunk_count == 2 + 4 and h.chunk_plain_len(5) == 200 - 3 * 64
    assert h.sealed_size == len(h.raw) + 5 * (64 + 16) + 8 + 16


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda b: b"NVSEALEX" + b[8:], id="magic"),
        pytest.param(lambda b: b[:8] + b"\x00\x03" + b[10:], id="version"),
        pytest.param(lambda b: b[:8] + b"\x00\x01" + b[10:], id="v2-body-as-v1"),
        pytest.param(lambda b: b + b"\x00", id="trailing-byte"),
        pytest.param(lambda b: b[:-1], id="short"),
        pytest.param(lambda b: b[:10] + struct.pack(">I", len(b) + 1) + b[14:] + b"\x00", id="length-field"),
        pytest.param(lambda b: b[:14] + struct.pack(">I", 8) + b[18:], id="chunk-size-too-small"),
        pytest.param(lambda b: b[:18] + struct.pack(">I", 0) + b[22:], id="no-metadata-chunk"),
    ],
)
def test_malformed_header_is_opaque(mutate: object) -> None:
    raw = _header().raw
    with pytest.raises(SealedModelError) as exc:
        decode_header(mutate(raw))  # type: ignore[operator]
    _opaque(exc)


def test_non_canonical_context_order_is_rejected() -> None:
    raw = _header(encryption_context={"a": "1", "b": "2"}).raw
    swapped = raw.replace(b"\x00\x01a\x00\x011\x00\x01b\x00\x012", b"\x00\x01b\x00\x012\x00\x01a\x00\x011")
    assert swapped != raw
    with pytest.raises(SealedModelError):
        decode_header(swapped)


@pytest.mark.parametrize(
    "over",
    [
        {"chunk_size": 8},
        {"key_id": ""},
        {"wrapped_key": b""},
        {"salt": b"short"},
        {"nonce_prefix": bytes(8)},
        {"encryption_context": {"": "v"}},
        {"chunk_size": 16, "payload_size": 16 << 32},
    ],
)
def test_encode_rejects_bad_parameters(over: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        _header(**over)


# -- KDF, nonces, AAD ------------------------------------------------------------------------------------


def test_stream_key_is_hkdf_sha256_of_data_key_and_salt() -> None:
    salt = os.urandom(32)
    expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=KDF_INFO).derive(KEY)
    assert KDF_INFO == b"nitrovault sealed model v2 stream key"
    assert derive_stream_key(KEY, salt) == expected
    assert derive_stream_key(bytearray(KEY), salt) == expected
    assert derive_stream_key(KEY, os.urandom(32)) != expected
    with pytest.raises(SealedModelError):
        derive_stream_key(KEY[:16], salt)


def test_nonce_layout() -> None:
    assert chunk_nonce(b"P" * 7, 0x01020304, False) == b"PPPPPPP\x01\x02\x03\x04\x00"
    assert chunk_nonce(b"P" * 7, 7, True) == b"PPPPPPP\x00\x00\x00\x07\x01"


def _sealed_chunk(h: SealedHeader, index: int) -> tuple[ChunkCipher, memoryview]:
    cipher = ChunkCipher.for_header(h, KEY)
    n = h.chunk_plain_len(index)
    out = bytearray(n + TAG_LEN)
    cipher.seal_into(index, memoryview(bytes(n)), memoryview(out))
    return cipher, memoryview(out)


def test_chunk_opens_at_its_own_position() -> None:
    h = _header()
    cipher, sealed = _sealed_chunk(h, 3)
    out = bytearray(len(sealed) - TAG_LEN)
    cipher.open_into(3, sealed, memoryview(out))
    assert out == bytes(len(out))


def test_chunk_moved_to_another_index_fails() -> None:
    h = _header()
    cipher, sealed = _sealed_chunk(h, 3)
    with pytest.raises(SealedModelError) as exc:
        cipher.open_into(4, sealed, memoryview(bytearray(len(sealed) - TAG_LEN)))
    _opaque(exc)


def test_last_flag_is_bound() -> None:
    """A full chunk sealed as non-final does not open as the final chunk (only the flag differs)."""
    h = _header(payload_size=256)  # every chunk full; chunk 5 is the last
    stream_key = derive_stream_key(KEY, h.salt)
    sealed = AESGCM(stream_key).encrypt(chunk_nonce(h.nonce_prefix, 5, False), bytes(64), h.digest)
    cipher = ChunkCipher.for_header(h, KEY)
    with pytest.raises(SealedModelError):
        cipher.open_into(5, memoryview(sealed), memoryview(bytearray(64)))
    good = AESGCM(stream_key).encrypt(chunk_nonce(h.nonce_prefix, 5, True), bytes(64), h.digest)
    cipher.open_into(5, memoryview(good), memoryview(bytearray(64)))


def test_header_digest_is_the_aad() -> None:
    h = _header()
    other = _header(encryption_context={"model": "other"}, salt=h.salt, nonce_prefix=h.nonce_prefix)
    _, sealed = _sealed_chunk(h, 1)
    wrong = ChunkCipher.for_header(other, KEY)  # same salt and key: only the AAD differs
    with pytest.raises(SealedModelError):
        wrong.open_into(1, sealed, memoryview(bytearray(len(sealed) - TAG_LEN)))


# -- tensor index ----------------------------------------------------------------------------------------


def test_metadata_round_trip_and_padding() -> None:
    tensors = {"a": TensorInfo("F32", (2, 2), (0, 16)), "b": TensorInfo("BF16", (0,), (16, 16))}
    raw = encode_metadata(tensors, {"format": "pt"}, 64)
    assert len(raw) % 64 == 0
    assert decode_metadata(raw, 16) == (tensors, {"format": "pt"})
    with pytest.raises(SealedModelError):
        decode_metadata(raw[:-1] + b"\x01", 16)  # padding must be zeros
    with pytest.raises(SealedModelError):
        decode_metadata(raw, 15)  # a range beyond the payload


@pytest.mark.parametrize(
    "entry",
    [
        {"name": "x", "dtype": "F99", "shape": [1], "offsets": [0, 4]},
        {"name": "x", "dtype": "F32", "shape": [2], "offsets": [0, 4]},
        {"name": "x", "dtype": "F32", "shape": [-1], "offsets": [0, 4]},
        {"name": 1, "dtype": "F32", "shape": [1], "offsets": [0, 4]},
        {"name": "x", "dtype": "F32", "shape": [1], "offsets": [0, 4], "extra": 1},
    ],
)
def test_bad_metadata_entry_is_opaque(entry: dict[str, object]) -> None:
    body = json.dumps({"tensors": [entry], "safetensors_metadata": None}).encode()
    raw = struct.pack(">I", len(body)) + body
    with pytest.raises(SealedModelError):
        decode_metadata(raw, 64)


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8),  # hole
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            8,
        ),  # overlap
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 8),  # trailing bytes
        ({"a": {"dtype": "X", "shape": [1], "data_offsets": [0, 4]}}, 4),
    ],
)
def test_safetensors_header_must_tile_data(header: dict[str, object], size: int) -> None:
    with pytest.raises(ConfigError):
        parse_safetensors_header(json.dumps(header).encode(), size)


# -- round trips -----------------------------------------------------------------------------------------


def test_round_trip_all_dtypes(tmp_path: Path) -> None:
    dst = _seal(tmp_path, ALL_DTYPES, chunk_size=48)
    model = SealedModel.open(dst)
    out = model.load_tensors(bytearray(KEY))
    assert out.keys() == ALL_DTYPES.keys()
    for name, t in ALL_DTYPES.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(out[name], t), name
    index = model.tensor_index(KEY)
    assert index["bf16"].dtype == "BF16" and index["bf16"].shape == (2, 9)
    assert index["empty"].nbytes == 0


def test_iter_plaintext_is_the_data_region(tmp_path: Path) -> None:
    dst = _seal(tmp_path, ALL_DTYPES, chunk_size=40)
    src = (tmp_path / "m.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", src[:8])
    chunks = list(SealedModel.open(dst).iter_plaintext(KEY))
    assert b"".join(chunks) == src[8 + n :]
    assert all(len(c) == 40 for c in chunks[:-1])


def test_tensor_spanning_chunk_boundaries_and_only_its_chunks_are_decrypted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = {"a": torch.arange(40, dtype=torch.float32), "b": torch.arange(100, dtype=torch.int64)}
    dst = _seal(tmp_path, tensors, chunk_size=64)
    model = SealedModel.open(dst)
    index = model.tensor_index(KEY)
    calls: list[int] = []
    real = stream_mod._open_chunk_into

    def spy(cipher: ChunkCipher, i: int, sealed: memoryview, out: memoryview) -> None:
        calls.append(i)
        real(cipher, i, sealed, out)

    monkeypatch.setattr(stream_mod, "_open_chunk_into", spy)
    out = model.load_tensors(KEY, ["a"])
    assert torch.equal(out["a"], tensors["a"]) and list(out) == ["a"]
    h = model.header
    expected = list(range(h.metadata_chunks)) + list(h.payload_chunk_range(*index["a"].offsets))
    assert calls == expected
    assert len(h.payload_chunk_range(*index["a"].offsets)) >= 3  # it does span chunk boundaries
    assert len(calls) < h.chunk_count
    calls.clear()
    assert torch.equal(model.load_tensors(KEY, ["b"])["b"], tensors["b"])
    assert calls[h.metadata_chunks :] == list(h.payload_chunk_range(*index["b"].offsets))


def test_unknown_tensor_name_is_a_key_error_without_the_name(tmp_path: Path) -> None:
    dst = _seal(tmp_path, {"a": torch.ones(3)})
    with pytest.raises(KeyError) as exc:
        SealedModel.open(dst).load_tensors(KEY, ["secret-layer-name"])
    assert "secret-layer-name" not in str(exc.value)


def test_misaligned_tensor_is_copied_aligned(tmp_path: Path) -> None:
    header = {
        "u": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "f": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]},
    }
    hjson = json.dumps(header).encode()
    src = tmp_path / "odd.safetensors"
    src.write_bytes(struct.pack("<Q", len(hjson)) + hjson + b"\x01\x02\x03" + struct.pack("<2f", 1.5, -2))
    dst = tmp_path / "odd.sealed"
    seal_file(src, dst, data_key=KEY, wrapped_key=b"w", key_id="k", encryption_context={}, chunk_size=16)
    out = SealedModel.open(dst).load_tensors(KEY)
    assert out["f"].tolist() == [1.5, -2.0] and out["u"].tolist() == [1, 2, 3]


def test_same_key_twice_gives_unrelated_ciphertexts(tmp_path: Path) -> None:
    a = _seal(tmp_path, {"a": torch.zeros(64)}).read_bytes()
    b = _seal(tmp_path, {"a": torch.zeros(64)}).read_bytes()
    assert a[30:69] != b[30:69]  # salt and nonce prefix are fresh per file
    assert a[-16:] != b[-16:]


def test_progress_reports_every_payload_byte(tmp_path: Path) -> None:
    seen: list[int] = []
    dst = _seal(tmp_path, ALL_DTYPES, chunk_size=32, progress=seen.append)
    assert sum(seen) == SealedModel.open(dst).header.payload_size
    assert max(seen) == 32


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shapes=st.lists(
        st.tuples(
            st.sampled_from(["F32", "BF16", "I64", "U8", "F16"]), st.lists(st.integers(0, 6), max_size=3)
        ),
        min_size=1,
        max_size=5,
    ),
    chunk_size=st.integers(16, 200),
    subset=st.integers(0, 4),
)
def test_property_round_trip(
    tmp_path_factory: pytest.TempPathFactory,
    shapes: list[tuple[str, list[int]]],
    chunk_size: int,
    subset: int,
) -> None:
    dtypes = {
        "F32": torch.float32,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "U8": torch.uint8,
        "F16": torch.float16,
    }
    gen = torch.Generator().manual_seed(chunk_size)
    tensors = {
        f"t{i}": torch.randint(0, 100, shape, generator=gen).to(dtypes[dt])
        for i, (dt, shape) in enumerate(shapes)
    }
    dst = _seal(tmp_path_factory.mktemp("p"), tensors, chunk_size=chunk_size)
    model = SealedModel.open(dst)
    out = model.load_tensors(KEY)
    assert all(torch.equal(out[n], t) for n, t in tensors.items())
    name = f"t{subset % len(tensors)}"
    assert torch.equal(model.load_tensors(KEY, [name])[name], tensors[name])


# -- tampering and failures ------------------------------------------------------------------------------


def _unseal(path: Path, key: bytes = KEY) -> dict[str, torch.Tensor]:
    return SealedModel.open(path).load_tensors(key)


def test_tamper_anywhere_fails(tmp_path: Path) -> None:
    dst = _seal(tmp_path, {"a": torch.arange(20, dtype=torch.float32), "b": torch.ones(3, dtype=torch.int8)})
    good = dst.read_bytes()
    assert _unseal(dst)["b"].tolist() == [1, 1, 1]
    bad = tmp_path / "bad.sealed"
    header_length = SealedModel.open(dst).header.header_length
    for pos in range(len(good)):
        bad.write_bytes(good[:pos] + bytes([good[pos] ^ 0x80]) + good[pos + 1 :])
        with pytest.raises(SealedModelError) as exc:
            _unseal(bad)
        if pos < header_length and isinstance(exc.value, KeyCommitmentError):
            assert exc.value.__cause__ is None  # a parsed header whose bytes no longer commit to the key
        else:
            _opaque(exc)
    for cut in range(0, len(good), 7):
        bad.write_bytes(good[:cut])
        with pytest.raises(SealedModelError):
            _unseal(bad)


def test_wrong_key_fails_the_commitment(tmp_path: Path) -> None:
    dst = _seal(tmp_path, {"a": torch.ones(3)})
    with pytest.raises(KeyCommitmentError) as exc:
        _unseal(dst, bytes(32))
    assert exc.value.__cause__ is None and exc.value.step == "key-commitment"
    with pytest.raises(SealedModelError):
        _unseal(dst, KEY[:31])


class _SpyAESGCM:
    """Stands in for AESGCM in the format module and records every decryption."""

    decrypted: ClassVar[list[bytes]] = []

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def encrypt_into(self, *args: object) -> None:
        self._aead.encrypt_into(*args)  # type: ignore[arg-type]

    def decrypt_into(self, nonce: bytes, *args: object) -> None:
        _SpyAESGCM.decrypted.append(nonce)
        self._aead.decrypt_into(nonce, *args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(lambda m, k: m.load_tensors(k), id="load_tensors"),
        pytest.param(lambda m, k: m.load_tensors(k, ["a"]), id="load_tensors-subset"),
        pytest.param(lambda m, k: m.metadata(k), id="metadata"),
        pytest.param(lambda m, k: m.tensor_index(k), id="tensor_index"),
        pytest.param(lambda m, k: list(m.iter_plaintext(k)), id="iter_plaintext"),
        pytest.param(lambda m, k: m.unsealer(k), id="unsealer"),
        pytest.param(lambda m, k: m.verify_key(k), id="verify_key"),
    ],
)
def test_wrong_key_is_refused_before_any_chunk_is_decrypted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: object
) -> None:
    from nitrovault.envelope import format as format_mod

    dst = _seal(tmp_path, {"a": torch.arange(40, dtype=torch.float32)})
    monkeypatch.setattr(format_mod, "AESGCM", _SpyAESGCM)
    monkeypatch.setattr(_SpyAESGCM, "decrypted", [])
    model = SealedModel.open(dst)
    with pytest.raises(KeyCommitmentError, match="key commitment mismatch") as exc:
        entry(model, bytearray(32))  # type: ignore[operator]
    assert exc.value.__cause__ is None and _SpyAESGCM.decrypted == []
    model.verify_key(KEY)  # the right key passes, and then chunks are decrypted
    assert model.load_tensors(KEY)["a"].tolist() == list(range(40)) and _SpyAESGCM.decrypted


def test_version_1_is_refused_by_default_and_readable_with_the_switch(tmp_path: Path) -> None:
    from nitrovault.errors import LegacySealedFormatError

    tensors = {"a": torch.arange(30, dtype=torch.int16), "b": torch.ones(2, 3)}
    v1 = _seal(tmp_path, tensors, version=1)
    with pytest.raises(LegacySealedFormatError, match="not key-committing") as exc:
        SealedModel.open(v1)
    assert isinstance(exc.value, SealedModelError)
    model = SealedModel.open(v1, allow_legacy_v1=True)
    h = model.header
    assert (h.version, h.commitment, struct.unpack(">H", h.raw[8:10])[0]) == (1, b"", 1)
    assert decode_header(h.raw) == h and h.header_length == len(h.raw)
    out = model.load_tensors(KEY)
    assert all(torch.equal(out[k], v) for k, v in tensors.items())
    # the v1 body and the v2 body differ only in the version field and the trailing commitment
    (tmp_path / "v2").mkdir()
    v2 = _seal(tmp_path / "v2", tensors)
    h2 = SealedModel.open(v2).header
    assert h2.header_length == h.header_length + 32 and h2.version == 2


def test_file_swapped_after_open_fails(tmp_path: Path) -> None:
    dst = _seal(tmp_path, {"a": torch.ones(3)})
    model = SealedModel.open(dst)
    _seal(tmp_path, {"a": torch.ones(3)})  # same name, same key, same shape: a different file
    with pytest.raises(SealedModelError):
        model.load_tensors(KEY)


def test_failed_load_zeroes_its_buffers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nitrovault.envelope import torch_load

    dst = _seal(tmp_path, {"a": torch.ones(64)}, chunk_size=64)
    seen: list[torch.Tensor] = []
    real_alloc = torch_load._alloc

    def spy_alloc(nbytes: int) -> torch.Tensor:
        t = real_alloc(nbytes)
        seen.append(t)
        return t

    h = SealedModel.open(dst).header
    data = bytearray(dst.read_bytes())
    data[h.chunk_offset(h.chunk_count - 1) + 2] ^= 1  # the last chunk fails after the others decrypted
    dst.write_bytes(bytes(data))
    monkeypatch.setattr(torch_load, "_alloc", spy_alloc)
    with pytest.raises(SealedModelError):
        _unseal(dst)
    assert len(seen) == 1 and seen[0].numel() == 256 and int(seen[0].count_nonzero()) == 0


def test_large_load_uses_the_mmap_buffer(tmp_path: Path) -> None:
    big = {"w": torch.randn(1 << 20), "b": torch.randn(3).bfloat16()}  # 4 MiB: above the mmap threshold
    out = _unseal(_seal(tmp_path, big, chunk_size=1 << 16))
    assert torch.equal(out["w"], big["w"]) and torch.equal(out["b"], big["b"])
    out["w"].add_(1)  # writable, like any tensor
    assert torch.equal(out["w"], big["w"] + 1)


def test_bad_input_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "bad.safetensors"
    src.write_bytes(struct.pack("<Q", 2) + b"{]")
    with pytest.raises(ConfigError):
        seal_file(
            src, tmp_path / "out.sealed", data_key=KEY, wrapped_key=b"w", key_id="k", encryption_context={}
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_failure_mid_stream_leaves_no_partial_file(tmp_path: Path) -> None:
    src = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(1000)}, str(src))
    calls = 0

    def boom(n: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        seal_file(
            src,
            tmp_path / "out.sealed",
            data_key=KEY,
            wrapped_key=b"w",
            key_id="k",
            encryption_context={},
            chunk_size=256,
            progress=boom,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_bad_data_key_length_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(4)}, str(src))
    with pytest.raises(ConfigError):
        seal_file(src, tmp_path / "o", data_key=KEY[:16], wrapped_key=b"w", key_id="k", encryption_context={})


def test_zeroize() -> None:
    buf = bytearray(b"secret key material")
    zeroize(buf)
    assert buf == bytes(19)


def test_parallel_unseal_matches_serial_and_still_authenticates_every_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nitrovault.envelope import torch_load

    tensors = {"a": torch.randn(64, 33), "b": torch.arange(500, dtype=torch.int64)}
    dst = _seal(tmp_path, tensors, chunk_size=128)
    model = SealedModel.open(dst)
    h = model.header
    payload = range(h.metadata_chunks, h.chunk_count)
    assert len(payload) >= 4 * 8  # enough chunks for 4 workers
    with model.unsealer(KEY) as u:
        serial = bytearray(h.payload_size)
        u.open_chunks_into(payload, memoryview(serial))
        parallel = bytearray(h.payload_size)
        u.open_chunks_into(payload, memoryview(parallel), workers=4)
    assert parallel == serial
    monkeypatch.setattr(torch_load, "_WORKERS", 4)
    loaded = SealedModel.open(dst).load_tensors(KEY)
    assert torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])

    good = dst.read_bytes()
    bad = tmp_path / "bad.sealed"
    for chunk in (payload.start, payload.start + len(payload) // 2, payload.stop - 1):  # three slices
        at = h.chunk_offset(chunk) + 3
        bad.write_bytes(good[:at] + bytes([good[at] ^ 0x01]) + good[at + 1 :])
        with pytest.raises(SealedModelError) as exc:
            SealedModel.open(bad).load_tensors(KEY)
        _opaque(exc)
