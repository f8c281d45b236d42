"""Synthetic tests of nitrovault.attestation: one negative test per verification step (via tests/forge.py)."""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from forge import DROP, Pki, forge, key, make_cert, make_pki, payload_fields, pcr_value, sign1

from nitrovault import attestation as att
from nitrovault.attestation import (
    AttestationDocument,
    Expectations,
    VerifiedAttestation,
    aws_nitro_root,
    is_debug,
    load_root,
    parse_document,
    parse_pcr_arg,
    pcr_hex,
    verify_document,
)
from nitrovault.errors import (
    AttestationError,
    CertificateChainError,
    CertificateExpiredError,
    ConfigError,
    DebugModeError,
    DocumentTooOldError,
    InvalidPayloadError,
    MalformedDocumentError,
    NonceMismatchError,
    PCRMismatchError,
    PublicKeyMismatchError,
    SignatureError,
    UntrustedRootError,
    UserDataMismatchError,
)

AT = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki(AT)


def verify(pki: Pki, raw: bytes, **kwargs: Any) -> VerifiedAttestation:
    kwargs.setdefault("at", AT)
    kwargs.setdefault("root", pki.root)
    return verify_document(raw, **kwargs)


def raises_exactly(error: type[AttestationError], pki: Pki, raw: bytes, **kwargs: Any) -> AttestationError:
    """The document fails with exactly ``error`` (not a subclass or parent): only that step failed."""
    with pytest.raises(AttestationError) as info:
        verify(pki, raw, **kwargs)
    assert type(info.value) is error, info.value.diagnostics()
    assert info.value.diagnostics().startswith(f"{error.step}: ")
    return info.value


# -- the happy path --------------------------------------------------------------------------------


def test_forged_document_verifies_with_its_root(pki: Pki) -> None:
    raw = forge(pki, AT, nonce=b"n0", user_data=b"u", public_key=b"k")
    verified = verify(pki, raw)
    doc = verified.document
    assert doc.module_id == "i-0123456789abcdef0-enc0123456789abcdef"
    assert doc.digest == "SHA384"
    assert doc.timestamp == AT and doc.timestamp.tzinfo is not None
    assert doc.timestamp_ms == int(AT.timestamp() * 1000)
    assert list(doc.pcrs) == list(range(16)) and doc.pcrs[0] == pcr_value(0)
    assert (doc.nonce, doc.user_data, doc.public_key) == (b"n0", b"u", b"k")
    assert doc.raw == raw and doc.protected == b"\xa1\x01\x38\x22" and len(doc.signature) == 96
    assert verified.root_fingerprint == pki.root.fingerprint(hashes.SHA256()).hex()
    assert verified.verified_at == AT
    assert verified.pcrs is doc.pcrs and verified.nonce == b"n0"


def test_tagged_document_verifies(pki: Pki) -> None:
    raw = forge(pki, AT, tag=18)
    assert raw[0] == 0xD2
    assert verify(pki, raw).document.module_id


def test_at_in_another_timezone_is_normalised(pki: Pki) -> None:
    eastern = AT.astimezone(timezone(timedelta(hours=-5)))
    assert verify(pki, forge(pki, AT), at=eastern).verified_at == AT


@pytest.mark.parametrize("value", [None, b"", b"x" * 1024])
def test_optional_fields_accept_null_empty_and_max(pki: Pki, value: bytes | None) -> None:
    doc = verify(pki, forge(pki, AT, nonce=value, user_data=value, public_key=value)).document
    assert doc.nonce == doc.user_data == doc.public_key == value


def test_optional_fields_may_be_absent(pki: Pki) -> None:
    doc = verify(pki, forge(pki, AT, nonce=DROP, user_data=DROP, public_key=DROP)).document
    assert doc.nonce is doc.user_data is doc.public_key is None


def test_naive_time_is_refused(pki: Pki) -> None:
    with pytest.raises(TypeError):
        verify(pki, forge(pki, AT), at=AT.replace(tzinfo=None))


def test_types_are_frozen_and_verified_only_by_the_verifier(pki: Pki) -> None:
    verified = verify(pki, forge(pki, AT))
    with pytest.raises(dataclasses.FrozenInstanceError):
        verified.document.module_id = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        verified.document.pcrs[0] = bytes(48)  # type: ignore[index]
    with pytest.raises(TypeError):
        VerifiedAttestation(document=verified.document, root_fingerprint="00", verified_at=AT)
    assert isinstance(parse_document(forge(pki, AT)), AttestationDocument)


# -- step 1: decode --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "protected",
    [
        cbor2.dumps({1: -7}),  # ES256
        cbor2.dumps({1: -36}),  # ES512
        cbor2.dumps({1: -35, 4: b"kid"}),  # an extra header
        cbor2.dumps({}),
        b"\xa1\x18\x01\x38\x22",  # {1: -35} with a non-minimal key: not the NSM bytes
        cbor2.dumps({True: -35}),
    ],
)
def test_wrong_protected_header(pki: Pki, protected: bytes) -> None:
    raises_exactly(MalformedDocumentError, pki, forge(pki, AT, protected=protected))


@pytest.mark.parametrize("unprotected", [[], b"", 0, "x"])
def test_unprotected_header_not_a_map(pki: Pki, unprotected: Any) -> None:
    raises_exactly(MalformedDocumentError, pki, forge(pki, AT, unprotected=unprotected))


def test_unprotected_header_may_hold_entries(pki: Pki) -> None:
    assert verify(pki, forge(pki, AT, unprotected={4: b"kid"}))


@pytest.mark.parametrize("tag", [17, 98, 61, 24])
def test_wrong_tag(pki: Pki, tag: int) -> None:
    raises_exactly(MalformedDocumentError, pki, forge(pki, AT, tag=tag))


def test_double_tag(pki: Pki) -> None:
    raw = forge(pki, AT, tag=18)
    raises_exactly(MalformedDocumentError, pki, b"\xd2" + raw)


@pytest.mark.parametrize("trailer", [b"\x00", b"\xa0", b"\xff", b"\x84"])
def test_trailing_bytes(pki: Pki, trailer: bytes) -> None:
    raises_exactly(MalformedDocumentError, pki, forge(pki, AT) + trailer)


def test_truncated(pki: Pki) -> None:
    raises_exactly(MalformedDocumentError, pki, forge(pki, AT)[:-1])


def test_oversized_input_is_rejected_before_decoding(pki: Pki) -> None:
    raw = forge(pki, AT, user_data=DROP)
    padded = sign1(cbor2.dumps(payload_fields(pki, AT)), pki.leaf_key, unprotected={99: b"x" * (70 * 1024)})
    assert len(padded) > att.MAX_DOCUMENT_SIZE
    err = raises_exactly(MalformedDocumentError, pki, padded)
    assert "more than" in str(err)
    assert verify(pki, raw)


@pytest.mark.parametrize(
    "item",
    [
        [],
        {},
        b"",
        [b"\xa1\x01\x38\x22", {}, b"p"],  # 3 items
        [b"\xa1\x01\x38\x22", {}, b"p", b"s" * 96, b"extra"],
        [b"\xa1\x01\x38\x22", {}, b"", b"s" * 96],  # empty payload
        [b"\xa1\x01\x38\x22", {}, "text payload", b"s" * 96],
        [b"\xa1\x01\x38\x22", {}, b"p", b"s" * 95],  # signature not 96 bytes
        [b"\xa1\x01\x38\x22", {}, b"p", "s" * 96],
    ],
)
def test_not_cose_sign1(pki: Pki, item: Any) -> None:
    raises_exactly(MalformedDocumentError, pki, cbor2.dumps(item))


@pytest.mark.parametrize("data", [b"", b"\xff", b"not cbor at all", b"\x84"])
def test_garbage(pki: Pki, data: bytes) -> None:
    raises_exactly(MalformedDocumentError, pki, data)


# -- step 2: payload syntax ------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle"])
def test_missing_field(pki: Pki, field: str) -> None:
    err = raises_exactly(InvalidPayloadError, pki, forge(pki, AT, **{field: DROP}))
    assert field in str(err)


BAD_FIELDS: list[tuple[str, Any]] = [
    ("module_id", ""),
    ("module_id", b"i-0123"),
    ("module_id", None),
    ("digest", "SHA256"),
    ("digest", "sha384"),
    ("digest", b"SHA384"),
    ("timestamp", 0),
    ("timestamp", -1),
    ("timestamp", 1.5),
    ("timestamp", True),
    ("timestamp", "1725719859545"),
    ("timestamp", 2**64),
    ("pcrs", {}),
    ("pcrs", [bytes(48)]),
    ("pcrs", {i: bytes(48) for i in range(33)}),  # 33 PCRs
    ("pcrs", {0: bytes(47)}),  # PCR of 47 bytes
    ("pcrs", {0: bytes(65)}),
    ("pcrs", {0: "00" * 48}),
    ("pcrs", {"0": bytes(48)}),
    ("pcrs", {32: bytes(48)}),
    ("pcrs", {-1: bytes(48)}),
    ("pcrs", {True: bytes(48)}),
    ("certificate", b""),
    ("certificate", b"x" * 1025),
    ("certificate", b"not der"),
    ("certificate", "text"),
    ("cabundle", []),
    ("cabundle", b"x"),
    ("cabundle", [b""]),
    ("cabundle", [b"x" * 1025]),
    ("cabundle", ["text"]),
    ("public_key", b"x" * 1025),
    ("user_data", b"x" * 1025),
    ("nonce", b"x" * 1025),
    ("nonce", "text"),
    ("user_data", 0),
    ("public_key", []),
]


@pytest.mark.parametrize(
    ("field", "value"), BAD_FIELDS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_FIELDS)]
)
def test_wrong_field_type_or_size(pki: Pki, field: str, value: Any) -> None:
    raises_exactly(InvalidPayloadError, pki, forge(pki, AT, **{field: value}))


@pytest.mark.parametrize("size", [32, 48, 64])
def test_pcr_sizes_accepted(pki: Pki, size: int) -> None:
    pcrs = {0: b"\x01" * size, 31: bytes(size)}
    assert verify(pki, forge(pki, AT, pcrs=pcrs)).document.pcrs == pcrs


def test_thirty_two_pcrs_accepted(pki: Pki) -> None:
    assert len(verify(pki, forge(pki, AT, pcrs={i: b"\x01" * 48 for i in range(32)})).document.pcrs) == 32


def test_unknown_payload_key(pki: Pki) -> None:
    fields = payload_fields(pki, AT)
    fields["extra"] = b"x"
    raises_exactly(InvalidPayloadError, pki, sign1(cbor2.dumps(fields), pki.leaf_key))


@pytest.mark.parametrize("payload", [cbor2.dumps([1, 2]), cbor2.dumps("x"), b"\xff", b"\xa0\x00"])
def test_payload_not_a_map(pki: Pki, payload: bytes) -> None:
    raises_exactly(InvalidPayloadError, pki, sign1(payload, pki.leaf_key))


def test_cbor_tags_inside_payload_are_rejected(pki: Pki) -> None:
    tagged_ts = cbor2.CBORTag(2, (int(AT.timestamp() * 1000)).to_bytes(8, "big"))  # a bignum timestamp
    raises_exactly(InvalidPayloadError, pki, forge(pki, AT, timestamp=tagged_ts))
    raises_exactly(InvalidPayloadError, pki, forge(pki, AT, nonce=cbor2.CBORTag(1000, b"x")))


def test_duplicate_payload_keys_are_rejected(pki: Pki) -> None:
    payload = cbor2.dumps(payload_fields(pki, AT))
    # append a second "digest" entry by rewriting the map header (9 -> 10 entries)
    assert payload[0] == 0xA9
    duplicated = b"\xaa" + payload[1:] + cbor2.dumps("digest") + cbor2.dumps("SHA384")
    raises_exactly(InvalidPayloadError, pki, sign1(duplicated, pki.leaf_key))


# -- step 3: validity and root ---------------------------------------------------------------------


def test_chain_to_a_different_root(pki: Pki) -> None:
    other = make_pki(AT, prefix="other")
    raises_exactly(UntrustedRootError, pki, forge(other, AT))


def test_pinned_aws_root_is_default_and_rejects_forged_chain(pki: Pki) -> None:
    with pytest.raises(UntrustedRootError):
        verify_document(forge(pki, AT), at=AT)


def test_forged_bundle_cannot_pose_as_root(pki: Pki) -> None:
    """cabundle[0] is the forger's root; trusting it would accept the document."""
    assert pki.cabundle[0] == pki.root.public_bytes(serialization.Encoding.DER)
    raises_exactly(UntrustedRootError, pki, forge(pki, AT), root=make_pki(AT, prefix="third").root)


def test_expired_intermediate() -> None:
    pki = make_pki(AT, prefix="expint", intermediate_window=(timedelta(days=10), -timedelta(seconds=1)))
    err = raises_exactly(CertificateExpiredError, pki, forge(pki, AT))
    assert "expint-int" in str(err)


def test_leaf_not_yet_valid() -> None:
    pki = make_pki(AT, prefix="future", leaf_window=(-timedelta(seconds=1), timedelta(hours=3)))
    raises_exactly(CertificateExpiredError, pki, forge(pki, AT))


def test_leaf_expired_one_second_after_not_after(pki: Pki) -> None:
    raw = forge(pki, AT)
    assert verify(pki, raw, at=pki.leaf.not_valid_after_utc)
    raises_exactly(CertificateExpiredError, pki, raw, at=pki.leaf.not_valid_after_utc + timedelta(seconds=1))


def test_root_outside_validity(pki: Pki) -> None:
    raw = forge(pki, AT)
    root_key = key("forge-root")
    stale_root = make_cert(
        "forge.nitro-enclaves",
        root_key,
        None,
        root_key,
        AT - timedelta(days=9),
        AT - timedelta(days=1),
        ca=True,
    )
    raises_exactly(CertificateExpiredError, pki, raw, root=stale_root)


# -- step 4 and 5: extensions, path ----------------------------------------------------------------


def test_intermediate_that_is_not_a_ca() -> None:
    pki = make_pki(AT, prefix="notca", intermediate_ca=False)
    err = raises_exactly(CertificateChainError, pki, forge(pki, AT))
    assert "basicConstraints" in str(err)


def _pki_with_leaf(prefix: str, **leaf_kwargs: Any) -> Pki:
    base = make_pki(AT, prefix=prefix)
    leaf_key = leaf_kwargs.pop("leaf_key", base.leaf_key)
    signer = leaf_kwargs.pop("signer", key(f"{prefix}-int"))
    leaf = make_cert(
        f"leaf.{prefix}",
        leaf_key,
        base.intermediate,
        signer,
        AT - timedelta(seconds=3),
        AT + timedelta(hours=3),
        ca=False,
        **leaf_kwargs,
    )
    return Pki(root=base.root, intermediate=base.intermediate, leaf=leaf, leaf_key=leaf_key)


def test_intermediate_without_key_cert_sign() -> None:
    base = make_pki(AT, prefix="nokcs")
    root_key = key("nokcs-root")
    intermediate = make_cert(
        "nokcs-int.nitro-enclaves",
        key("nokcs-int"),
        base.root,
        root_key,
        AT - timedelta(days=1),
        AT + timedelta(days=5),
        ca=True,
        key_cert_sign=False,
    )
    pki = Pki(root=base.root, intermediate=intermediate, leaf=base.leaf, leaf_key=base.leaf_key)
    err = raises_exactly(CertificateChainError, pki, forge(pki, AT))
    assert "keyCertSign" in str(err)


def test_leaf_without_digital_signature() -> None:
    pki = _pki_with_leaf("nods", digital_signature=False)
    err = raises_exactly(CertificateChainError, pki, forge(pki, AT))
    assert "digitalSignature" in str(err)


def test_leaf_signed_by_the_wrong_key_fails_path_validation() -> None:
    """Validity, anchor and extensions pass; only PKIX path validation (step 5) can catch this."""
    pki = _pki_with_leaf("badlink", signer=key("stranger"))
    err = raises_exactly(CertificateChainError, pki, forge(pki, AT))
    assert "path validation" in str(err)


def test_leaf_with_aki_is_accepted() -> None:
    pki = _pki_with_leaf("withaki", aki=True)
    assert verify(pki, forge(pki, AT))


# -- step 6: signature -----------------------------------------------------------------------------


def test_signature_by_another_key(pki: Pki) -> None:
    raises_exactly(SignatureError, pki, forge(pki, AT, signing_key=key("stranger")))


def test_flipped_signature_byte(pki: Pki) -> None:
    raw = bytearray(forge(pki, AT))
    raw[-5] ^= 0x01
    raises_exactly(SignatureError, pki, bytes(raw))


def test_payload_changed_after_signing(pki: Pki) -> None:
    good = cbor2.loads(forge(pki, AT))
    other_payload = cbor2.dumps(payload_fields(pki, AT, nonce=b"replayed"))
    raises_exactly(SignatureError, pki, cbor2.dumps([good[0], good[1], other_payload, good[3]]))


def test_leaf_key_not_p384() -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    pki = _pki_with_leaf("p256", leaf_key=p256)
    err = raises_exactly(SignatureError, pki, forge(pki, AT))
    assert "P-384" in str(err)


# -- step 7: debug mode ----------------------------------------------------------------------------


def test_debug_pcr0_is_refused(pki: Pki) -> None:
    raw = forge(pki, AT, pcrs={i: bytes(48) for i in range(16)})
    raises_exactly(DebugModeError, pki, raw)


def test_debug_opt_in_logs_a_warning_every_time(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    raw = forge(pki, AT, pcrs={0: bytes(48), 4: b"\x04" * 48})
    with caplog.at_level(logging.WARNING, logger="nitrovault.attestation"):
        verified = verify(pki, raw, unsafe_allow_debug=True)
        verify(pki, raw, unsafe_allow_debug=True)
    assert is_debug(verified.document)
    warnings = [r for r in caplog.records if "unsafe_allow_debug" in r.getMessage()]
    assert len(warnings) == 2 and all(r.levelno == logging.WARNING for r in warnings)


def test_only_pcr0_decides_debug(pki: Pki) -> None:
    doc = verify(pki, forge(pki, AT, pcrs={0: b"\x01" * 48, 1: bytes(48), 2: bytes(48)})).document
    assert not is_debug(doc)


# -- step 8: expectations --------------------------------------------------------------------------


def test_matching_expectations_pass(pki: Pki) -> None:
    raw = forge(pki, AT, nonce=b"n", public_key=b"k", user_data=b"u")
    expect = Expectations(
        pcrs={0: pcr_value(0), 8: bytes(48)},
        nonce=b"n",
        public_key=b"k",
        user_data=b"u",
        max_age=timedelta(minutes=5),
    )
    assert verify(pki, raw, expect=expect, at=AT + timedelta(minutes=5))


@pytest.mark.parametrize(
    ("expect", "error"),
    [
        (Expectations(pcrs={0: pcr_value(1)}), PCRMismatchError),
        (Expectations(pcrs={0: pcr_value(0), 2: bytes(48)}), PCRMismatchError),
        (Expectations(pcrs={20: bytes(48)}), PCRMismatchError),  # not in the document
        (Expectations(nonce=b"other"), NonceMismatchError),
        (Expectations(nonce=b"n\x00"), NonceMismatchError),
        (Expectations(public_key=b"other"), PublicKeyMismatchError),
        (Expectations(user_data=b""), UserDataMismatchError),
        (Expectations(max_age=timedelta(seconds=59)), DocumentTooOldError),
    ],
)
def test_expectation_mismatch(pki: Pki, expect: Expectations, error: type[AttestationError]) -> None:
    raw = forge(pki, AT, nonce=b"n", public_key=b"k", user_data=b"u")
    raises_exactly(error, pki, raw, expect=expect, at=AT + timedelta(seconds=60))


def test_expected_field_absent_from_document(pki: Pki) -> None:
    raw = forge(pki, AT, nonce=None, public_key=None, user_data=DROP)
    raises_exactly(NonceMismatchError, pki, raw, expect=Expectations(nonce=b""))
    raises_exactly(PublicKeyMismatchError, pki, raw, expect=Expectations(public_key=b"k"))
    raises_exactly(UserDataMismatchError, pki, raw, expect=Expectations(user_data=b"u"))


def test_timestamp_in_the_future(pki: Pki) -> None:
    raw = forge(pki, AT, timestamp=int((AT + timedelta(minutes=2)).timestamp() * 1000))
    assert verify(pki, raw)  # no freshness expectation: the certificate window is the only bound
    raises_exactly(DocumentTooOldError, pki, raw, expect=Expectations(max_age=timedelta(hours=1)))
    skewed = forge(pki, AT, timestamp=int((AT + timedelta(seconds=30)).timestamp() * 1000))
    assert verify(pki, skewed, expect=Expectations(max_age=timedelta(hours=1)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"pcrs": {0: bytes(47)}},
        {"pcrs": {32: bytes(48)}},
        {"pcrs": {0: "00" * 48}},
        {"nonce": "abc"},
        {"max_age": timedelta(seconds=-1)},
    ],
)
def test_invalid_expectations(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Expectations(**kwargs)


def test_expectations_are_read_only() -> None:
    source = {0: bytes(48)}
    expect = Expectations(pcrs=source)
    source[1] = bytes(48)
    assert list(expect.pcrs) == [0]
    with pytest.raises(TypeError):
        expect.pcrs[2] = bytes(48)  # type: ignore[index]


# -- roots and small helpers -----------------------------------------------------------------------


def test_aws_root_is_pinned() -> None:
    root = aws_nitro_root()
    assert root.fingerprint(hashes.SHA256()).hex() == att.AWS_NITRO_ROOT_G1_SHA256
    assert root.subject.rfc4514_string() == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"


def test_aws_root_fingerprint_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(att, "AWS_NITRO_ROOT_G1_SHA256", "00" * 32)
    with pytest.raises(UntrustedRootError):
        aws_nitro_root()


def test_load_root_forms(pki: Pki, tmp_path: Any) -> None:
    pem = pki.root.public_bytes(serialization.Encoding.PEM)
    der = pki.root.public_bytes(serialization.Encoding.DER)
    path = tmp_path / "root.pem"
    path.write_bytes(pem)
    for form in (path, str(path), pem, pem.decode(), der):
        assert load_root(form) == pki.root
    for bad in (
        tmp_path / "missing.pem",
        b"junk",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ):
        with pytest.raises(ConfigError):
            load_root(bad)


def test_parse_pcr_arg() -> None:
    assert parse_pcr_arg("0=" + "ab" * 48) == (0, b"\xab" * 48)
    assert parse_pcr_arg("31=" + "AB" * 48) == (31, b"\xab" * 48)
    for bad in (
        "0",
        "=" + "ab" * 48,
        "x=" + "ab" * 48,
        "32=" + "ab" * 48,
        "-1=" + "ab" * 48,
        "0=abcd",
        "0=" + "zz" * 48,
        "0=" + "ab" * 49,
    ):
        with pytest.raises(ConfigError):
            parse_pcr_arg(bad)


def test_pcr_hex(pki: Pki) -> None:
    doc = parse_document(forge(pki, AT))
    hexes = pcr_hex(doc)
    assert hexes[0] == pcr_value(0).hex() and hexes[15] == "00" * 48 and len(hexes) == 16


def test_is_debug_without_pcr0(pki: Pki) -> None:
    assert not is_debug(parse_document(forge(pki, AT, pcrs={1: bytes(48)})))


def test_custom_root_must_be_a_ca() -> None:
    base = make_pki(AT, prefix="leafroot")
    with pytest.raises(AttestationError):
        verify_document(forge(base, AT), at=AT, root=base.leaf)


def test_root_argument_type_is_checked(pki: Pki) -> None:
    with pytest.raises(TypeError):
        verify(pki, forge(pki, AT), root=pki.root.public_bytes(serialization.Encoding.PEM))


def test_verify_accepts_a_parsed_document_but_rechecks_its_raw_bytes(pki: Pki) -> None:
    doc = parse_document(forge(pki, AT))
    assert verify(pki, doc).document == doc
    doctored = dataclasses.replace(doc, pcrs={0: b"\x07" * 48})  # fields no signature covers
    assert verify(pki, doctored).document.pcrs[0] == pcr_value(0)
