"""Real AWS Nitro attestation documents (../shared/vectors/nitro) against nitrovault.attestation.

They guard against our own misreading of the spec: every one must verify at its suggested time with the
pinned AWS root, and each must fail exactly the right step when the time, the signature, the payload or
the expected PCRs are wrong. A hypothesis fuzz test checks that nothing but AttestationError escapes.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from nitrovault.attestation import (
    Expectations,
    aws_nitro_root,
    is_debug,
    parse_document,
    pcr_hex,
    verify_document,
)
from nitrovault.errors import (
    AttestationError,
    CertificateExpiredError,
    DebugModeError,
    PCRMismatchError,
    SignatureError,
    UntrustedRootError,
)

VECTOR_FILES = [
    "blocky-nitrite_2024-09-07_nitro.b64",
    "blocky-nitrite_2024-09-07_debug.b64",
    "blocky-nitrite_2024-05-07_nitro.b64",
    "blocky-nitrite_2023-07-10_stag.b64",
    "evervault_2022-10-13_pcr8-signed.cose",
    "evervault_2022-10-12_debug.cose",
    "evervault_2023-09-18_debug.b64",
    "evervault_2023-01-18_nondebug_from-cert-san.cose",
    "evervault_2023-01-18_debug_from-cert-san.cose",
    "brave-nitriding_2022-07-27_initiator.b64",
    "brave-nitriding_2022-08-04_responder.b64",
]


@pytest.fixture(params=VECTOR_FILES)
def vector(request: pytest.FixtureRequest, nitro_vectors: list[dict[str, Any]]) -> dict[str, Any]:
    matches = [v for v in nitro_vectors if v["file"] == request.param]
    assert len(matches) == 1, request.param
    return matches[0]


def test_every_vector_is_covered(nitro_vectors: list[dict[str, Any]]) -> None:
    assert sorted(v["file"] for v in nitro_vectors) == sorted(VECTOR_FILES)


def _verify(vector: dict[str, Any], raw: bytes | None = None, **kwargs: Any) -> Any:
    kwargs.setdefault("at", vector["at"])
    kwargs.setdefault("unsafe_allow_debug", vector["debug_mode"])
    return verify_document(vector["cose"] if raw is None else raw, **kwargs)


def _hex_or_none(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def test_accepted_at_suggested_time_with_pinned_root(vector: dict[str, Any]) -> None:
    verified = _verify(vector)
    assert verified.root_fingerprint == "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
    assert verified.document.module_id == vector["module_id"]
    assert verified.verified_at == vector["at"]


def test_parsed_fields_match_vectors_json(vector: dict[str, Any]) -> None:
    doc = parse_document(vector["cose"])
    assert doc.module_id == vector["module_id"]
    assert doc.digest == vector["digest"] == "SHA384"
    assert doc.timestamp_ms == vector["timestamp_ms"]
    assert doc.timestamp.isoformat() == vector["timestamp_utc"]
    assert {str(i): h for i, h in pcr_hex(doc).items()} == vector["pcrs"]
    assert is_debug(doc) is vector["debug_mode"]
    # vectors.json writes an absent (CBOR null) field as JSON null and an empty one as "".
    assert _hex_or_none(doc.user_data) == vector["user_data"]
    assert _hex_or_none(doc.nonce) == vector["nonce"]
    assert _hex_or_none(doc.public_key) == vector["public_key"]
    assert len(doc.certificate) == vector["certificate_len"]
    assert [len(c) for c in doc.cabundle] == vector["cabundle_lens"]
    assert len(doc.signature) == vector["signature_len"]
    assert doc.cabundle[0] == aws_nitro_root().public_bytes(serialization.Encoding.DER)


def test_tagged_form_is_accepted(vector: dict[str, Any]) -> None:
    assert vector["cose"][0] == 0x84 and not vector["tagged"]
    assert _verify(vector, b"\xd2" + vector["cose"]).document.module_id == vector["module_id"]


def test_debug_documents_need_the_opt_in(vector: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    if vector["debug_mode"]:
        with pytest.raises(DebugModeError):
            _verify(vector, unsafe_allow_debug=False)
        with caplog.at_level(logging.WARNING, logger="nitrovault.attestation"):
            _verify(vector, unsafe_allow_debug=True)
        assert any("DEBUG-MODE" in r.getMessage() for r in caplog.records)
    else:
        assert _verify(vector, unsafe_allow_debug=False)


def test_rejected_one_second_after_leaf_not_after(vector: dict[str, Any]) -> None:
    leaf = x509.load_der_x509_certificate(parse_document(vector["cose"]).certificate)
    with pytest.raises(CertificateExpiredError):
        _verify(vector, at=leaf.not_valid_after_utc + timedelta(seconds=1))


def test_rejected_with_a_flipped_signature_byte(vector: dict[str, Any]) -> None:
    raw = bytearray(vector["cose"])
    raw[-1] ^= 0x01  # the signature is the last item
    with pytest.raises(SignatureError):
        _verify(vector, bytes(raw))


def test_rejected_with_a_flipped_payload_byte(vector: dict[str, Any]) -> None:
    raw = bytearray(vector["cose"])
    # the first occurrence of module_id is its payload value (the leaf certificate's CN comes later)
    position = bytes(raw).index(vector["module_id"].encode()) + len(vector["module_id"]) - 1
    raw[position] ^= 0x01  # an ASCII letter/digit stays ASCII: the payload still parses
    with pytest.raises(SignatureError):
        _verify(vector, bytes(raw))


def test_rejected_with_a_wrong_expected_pcr(vector: dict[str, Any]) -> None:
    pcrs = {int(i): bytes.fromhex(h) for i, h in vector["pcrs"].items()}
    assert _verify(vector, expect=Expectations(pcrs=pcrs))
    for index in (0, 1, 2, 8):
        wrong = bytearray(pcrs[index])
        wrong[-1] ^= 0x80
        with pytest.raises(PCRMismatchError):
            _verify(vector, expect=Expectations(pcrs={**pcrs, index: bytes(wrong)}))


def test_rejected_with_another_root(vector: dict[str, Any]) -> None:
    from forge import make_pki

    with pytest.raises(UntrustedRootError):
        _verify(vector, root=make_pki(vector["at"], prefix="vector-other").root)


# -- fuzzing: only AttestationError may escape -----------------------------------------------------


def _only_attestation_errors(raw: bytes, vector: dict[str, Any]) -> None:
    with contextlib.suppress(AttestationError):
        verify_document(raw, at=vector["at"], unsafe_allow_debug=True)


def test_fuzz_arbitrary_bytes(nitro_vectors: list[dict[str, Any]]) -> None:
    vector = nitro_vectors[0]

    @settings(max_examples=300, deadline=None)
    @given(data=st.binary(max_size=2048))
    def run(data: bytes) -> None:
        _only_attestation_errors(data, vector)
        _only_attestation_errors(b"\x84" + data, vector)
        _only_attestation_errors(b"\x84\x44\xa1\x01\x38\x22\xa0" + data, vector)

    run()


EDIT = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
    st.integers(0, 10_000),
    st.integers(0, 255),
)


def test_fuzz_mutated_real_documents(nitro_vectors: list[dict[str, Any]]) -> None:
    @settings(max_examples=400, deadline=None)
    @given(which=st.integers(0, len(nitro_vectors) - 1), edits=st.lists(EDIT, min_size=1, max_size=4))
    def run(which: int, edits: list[tuple[str, int, int]]) -> None:
        vector = nitro_vectors[which]
        raw = bytearray(vector["cose"])
        for op, position, value in edits:
            if not raw:
                break
            i = position % len(raw)
            if op == "flip":
                raw[i] ^= 1 << (value % 8)
            elif op == "set":
                raw[i] = value
            elif op == "insert":
                raw.insert(i, value)
            elif op == "delete":
                del raw[i]
            else:
                del raw[i:]
        _only_attestation_errors(bytes(raw), vector)

    run()
