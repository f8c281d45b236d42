"""The emulator's ciphertext blob: round trip, and every bound field fails alone when changed."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nitrovault.errors import InvalidCiphertextError
from nitrovault.local.kms import blob

KEY = uuid.UUID("0f0e0d0c-0b0a-4908-8706-050403020100")
ARN = f"arn:aws:kms:us-east-1:111122223333:key/{KEY}"
MATERIAL = bytes(range(32))
CTX = {"model": "m1", "version": "2"}


def sealed(plaintext: bytes = b"data key bytes", *, version: int = 3) -> bytes:
    return blob.seal(MATERIAL, key_id=KEY, material_version=version, key_arn=ARN, context=CTX,
                     plaintext=plaintext, nonce=b"\x07" * 12)


def test_round_trip_and_header() -> None:
    data = sealed()
    parsed = blob.parse(data)
    assert (parsed.key_id, parsed.material_version, parsed.nonce) == (KEY, 3, b"\x07" * 12)
    assert data[0] == blob.VERSION and len(data) == blob.HEADER_LEN + len(b"data key bytes") + blob.TAG_LEN
    reordered = dict(reversed(CTX.items()))
    assert blob.open_blob(MATERIAL, parsed, key_arn=ARN, context=reordered) == b"data key bytes"


@pytest.mark.parametrize("context", [{}, {"model": "m2", "version": "2"}, {**CTX, "extra": ""},
                                     {"model": "m1"}])
def test_other_encryption_context_fails(context: dict[str, str]) -> None:
    with pytest.raises(InvalidCiphertextError):
        blob.open_blob(MATERIAL, blob.parse(sealed()), key_arn=ARN, context=context)


def test_other_key_arn_fails() -> None:
    with pytest.raises(InvalidCiphertextError):
        blob.open_blob(MATERIAL, blob.parse(sealed()), key_arn=ARN.replace("111122223333", "444455556666"),
                       context=CTX)


def test_other_material_fails() -> None:
    with pytest.raises(InvalidCiphertextError):
        blob.open_blob(bytes(32), blob.parse(sealed()), key_arn=ARN, context=CTX)


@pytest.mark.parametrize("index,what", [(5, "key id"), (20, "material version"), (25, "nonce"),
                                        (blob.HEADER_LEN, "ciphertext"), (-1, "tag")])
def test_each_flipped_byte_fails(index: int, what: str) -> None:
    data = bytearray(sealed())
    data[index] ^= 0x01
    parsed = blob.parse(bytes(data))
    with pytest.raises(InvalidCiphertextError):
        blob.open_blob(MATERIAL, parsed, key_arn=ARN, context=CTX)


def test_unknown_version_is_refused_at_parse() -> None:
    data = bytearray(sealed())
    data[0] = 2
    with pytest.raises(InvalidCiphertextError):
        blob.parse(bytes(data))


def test_truncated_is_refused_at_parse() -> None:
    with pytest.raises(InvalidCiphertextError):
        blob.parse(sealed(b"")[:-1])


def test_canonical_context_is_injective_on_boundaries() -> None:
    assert blob.canonical_context({"a": "bc"}) != blob.canonical_context({"ab": "c"})
    assert blob.canonical_context({"a": "", "b": ""}) != blob.canonical_context({"a": "\x00\x00\x00\x00b"})
    assert blob.canonical_context({"b": "1", "a": "2"}) == blob.canonical_context({"a": "2", "b": "1"})


@given(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4),
       st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4))
def test_canonical_context_distinguishes_contexts(a: dict[str, str], b: dict[str, str]) -> None:
    assert (blob.canonical_context(a) == blob.canonical_context(b)) == (a == b)


def test_error_does_not_echo_plaintext() -> None:
    data = bytearray(sealed(b"TOP-SECRET"))
    data[-1] ^= 1
    with pytest.raises(InvalidCiphertextError) as exc:
        blob.open_blob(MATERIAL, blob.parse(bytes(data)), key_arn=ARN, context=CTX)
    assert "TOP-SECRET" not in exc.value.diagnostics()
