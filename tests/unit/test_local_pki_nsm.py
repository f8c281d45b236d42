"""The local Nitro PKI and the local NSM device: certificate shapes, PCR semantics, real-format documents.

Documents are checked twice: by a small independent check written here (decode, ES384 with the leaf,
chain signatures) and by the production verifier ``nitrovault.attestation.verify_document``.
"""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from nitrovault.attestation import Expectations, parse_document, verify_document
from nitrovault.errors import (
    CertificateExpiredError,
    ConfigError,
    DebugModeError,
    NsmError,
    PCRMismatchError,
    UntrustedRootError,
)
from nitrovault.local.nsm import LocalNsmDevice, make_local_nsm
from nitrovault.local.pki import LocalPki
from nitrovault.nsm import Nsm

T0 = datetime(2025, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)
PCRS = {0: b"\x10" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48, 4: b"\x14" * 48}
KEY_ORDER = [
    "module_id",
    "digest",
    "timestamp",
    "pcrs",
    "certificate",
    "cabundle",
    "public_key",
    "user_data",
    "nonce",
]


def fixed(at: datetime) -> Callable[[], datetime]:
    return lambda: at


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPki:
    return LocalPki.ensure(tmp_path_factory.mktemp("pki") / "pki", clock=fixed(T0))


def device(pki: LocalPki, *, at: datetime = T0, pcrs: dict[int, bytes] | None = None) -> LocalNsmDevice:
    return LocalNsmDevice(
        pki,
        pcrs=PCRS if pcrs is None else pcrs,
        module_id="i-0abc-enc0def",
        clock=fixed(at),
        rng=lambda n: b"\x42" * n,
    )


def own_check(document: bytes, root: x509.Certificate) -> dict[str, Any]:
    """Independent of nitrovault.attestation: decode, chain signatures to ``root``, ES384 with the leaf."""
    protected, unprotected, payload, sig = cbor2.loads(document)
    assert protected == b"\xa1\x01\x38\x22" and unprotected == {} and len(sig) == 96
    doc = cbor2.loads(payload)
    leaf = x509.load_der_x509_certificate(doc["certificate"])
    chain = [x509.load_der_x509_certificate(c) for c in doc["cabundle"]]
    assert chain[0] == root  # root first, and it is ours
    for parent, child in zip(chain, [*chain[1:], leaf], strict=True):
        child.verify_directly_issued_by(parent)
    key = leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    r, s = int.from_bytes(sig[:48], "big"), int.from_bytes(sig[48:], "big")
    to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
    key.verify(encode_dss_signature(r, s), to_sign, ec.ECDSA(hashes.SHA384()))
    return dict(doc)


# -- the PKI -------------------------------------------------------------------------------------------


def test_pki_files_and_permissions(pki: LocalPki) -> None:
    d = pki.directory
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in ("root.key", "intermediate.key"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600
    assert x509.load_pem_x509_certificate((d / "root.pem").read_bytes()) == pki.root
    assert pki.root_path == d / "root.pem"


def test_pki_is_loaded_not_recreated(pki: LocalPki) -> None:
    again = LocalPki.ensure(pki.directory, clock=fixed(T0 + timedelta(days=3)))
    assert again.root == pki.root and again.intermediate == pki.intermediate


def test_root_certificate_shape(pki: LocalPki) -> None:
    root = pki.root
    assert root.subject == root.issuer
    assert root.subject.rfc4514_string() == "CN=local.nitro-enclaves,OU=nitrovault-test,O=nitrovault,C=US"
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp384r1"  # type: ignore[union-attr]
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    ku = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert bc.critical and bc.value.ca
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert root.not_valid_after_utc - root.not_valid_before_utc >= timedelta(days=365 * 30)
    root.verify_directly_issued_by(root)


def test_intermediate_shape_and_cabundle(pki: LocalPki) -> None:
    inter = pki.intermediate
    inter.verify_directly_issued_by(pki.root)
    bc = inter.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    aki = inter.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = pki.root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    der = serialization.Encoding.DER
    assert pki.cabundle == [pki.root.public_bytes(der), inter.public_bytes(der)]


def test_leaf_shape(pki: LocalPki) -> None:
    cert, key = pki.issue_leaf("i-0abc-enc0def", T0)
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == "i-0abc-enc0def.local.aws"
    assert cert.not_valid_before_utc == T0.replace(microsecond=0) - timedelta(seconds=3)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(hours=3)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(pki.intermediate)
    other, _ = pki.issue_leaf("i-0abc-enc0def", T0)
    assert other.public_key() != cert.public_key()  # fresh key per leaf


def test_leaf_rejects_naive_time(pki: LocalPki) -> None:
    with pytest.raises(ConfigError):
        pki.issue_leaf("m", T0.replace(tzinfo=None))


def test_concurrent_first_use_agrees_on_one_pki(tmp_path: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        pkis = list(pool.map(lambda _: LocalPki.ensure(tmp_path / "race", clock=fixed(T0)), range(4)))
    assert len({p.root for p in pkis}) == 1 and len({p.intermediate for p in pkis}) == 1
    pkis[0].intermediate.verify_directly_issued_by(pkis[3].root)


def test_intermediate_is_reissued_before_it_lapses(tmp_path: Path) -> None:
    first = LocalPki.ensure(tmp_path / "p", clock=fixed(T0))
    later = LocalPki.ensure(tmp_path / "p", clock=fixed(first.intermediate.not_valid_after_utc))
    assert later.root == first.root
    assert later.intermediate != first.intermediate
    later.intermediate.verify_directly_issued_by(first.root)


# -- the device: PCR semantics ----------------------------------------------------------------------------


def test_boot_pcrs_are_read_only(pki: LocalPki) -> None:
    nsm = Nsm(device(pki))
    state = nsm.describe_pcr(0)
    assert state.locked and state.data == PCRS[0]
    assert nsm.describe_pcr(3).data == bytes(48)  # unset -> zero
    for op in (lambda: nsm.extend_pcr(0, b"x"), lambda: nsm.lock_pcr(15)):
        with pytest.raises(NsmError) as info:
            op()
        assert info.value.code == "ReadOnlyIndex"


def test_application_pcrs_extend_then_lock(pki: LocalPki) -> None:
    nsm = Nsm(device(pki))
    assert not nsm.describe_pcr(16).locked
    new = nsm.extend_pcr(16, b"hello")
    assert new == hashlib.sha384(bytes(48) + b"hello").digest()
    assert nsm.extend_pcr(16, b"more") == hashlib.sha384(new + b"more").digest()
    nsm.lock_pcr(16)
    nsm.lock_pcr(16)  # idempotent
    assert nsm.describe_pcr(16).locked
    with pytest.raises(NsmError) as info:
        nsm.extend_pcr(16, b"late")
    assert info.value.code == "ReadOnlyIndex"


def test_lock_pcrs_locks_a_prefix(pki: LocalPki) -> None:
    nsm = Nsm(device(pki))
    nsm.lock_pcrs(18)
    assert nsm.describe_pcr(17).locked and not nsm.describe_pcr(18).locked
    assert nsm.describe_nsm().locked_pcrs == frozenset(range(18))
    with pytest.raises(NsmError) as info:
        nsm.lock_pcrs(33)
    assert info.value.code == "InvalidIndex"


@pytest.mark.parametrize("op", ["describe", "extend", "lock"])
def test_index_32_is_invalid_index(pki: LocalPki, op: str) -> None:
    nsm = Nsm(device(pki))
    call = {
        "describe": lambda: nsm.describe_pcr(32),
        "extend": lambda: nsm.extend_pcr(32, b"x"),
        "lock": lambda: nsm.lock_pcr(32),
    }[op]
    with pytest.raises(NsmError) as info:
        call()
    assert info.value.code == "InvalidIndex"


def test_describe_nsm_and_get_random(pki: LocalPki) -> None:
    nsm = Nsm(device(pki))
    d = nsm.describe_nsm()
    assert (d.module_id, d.max_pcrs, d.digest) == ("i-0abc-enc0def", 32, "SHA384")
    assert d.locked_pcrs == frozenset(range(16))
    assert nsm.get_random() == b"\x42" * 256


@pytest.mark.parametrize(
    ("request_value", "code"),
    [
        ("Bogus", "InvalidOperation"),
        ({"Bogus": {}}, "InvalidOperation"),
        ({"DescribePCR": {"index": "0"}}, "InvalidArgument"),
        ({"ExtendPCR": {"index": 16}}, "InvalidArgument"),
        ({"Attestation": {"user_data": "text", "nonce": None, "public_key": None}}, "InvalidArgument"),
        ({"Attestation": {"user_data": b"x" * 1025, "nonce": None, "public_key": None}}, "InputTooLarge"),
        ({"ExtendPCR": {"index": 16, "data": b"x" * 0x1000}}, "InputTooLarge"),
    ],
)
def test_raw_bad_requests_get_the_real_error_names(pki: LocalPki, request_value: object, code: str) -> None:
    assert cbor2.loads(device(pki).call(cbor2.dumps(request_value))) == {"Error": code}


def test_non_cbor_request_is_invalid_argument(pki: LocalPki) -> None:
    assert cbor2.loads(device(pki).call(b"\xff\xfe")) == {"Error": "InvalidArgument"}


def test_device_rejects_bad_initial_pcrs(pki: LocalPki) -> None:
    with pytest.raises(ConfigError):
        device(pki, pcrs={0: b"short"})
    with pytest.raises(ConfigError):
        device(pki, pcrs={32: bytes(48)})


# -- the device: documents -----------------------------------------------------------------------------


def test_document_is_real_format(pki: LocalPki) -> None:
    raw = Nsm(device(pki)).attestation(public_key=b"PK", nonce=b"N" * 32)
    assert raw[:7] == bytes.fromhex("8444a1013822a0")  # untagged, like every real document
    doc = own_check(raw, pki.root)
    assert list(doc) == KEY_ORDER
    assert doc["module_id"] == "i-0abc-enc0def" and doc["digest"] == "SHA384"
    assert doc["timestamp"] == int(T0.timestamp()) * 1000 + 250
    assert sorted(doc["pcrs"]) == list(range(16))
    assert all(len(v) == 48 for v in doc["pcrs"].values())
    assert doc["pcrs"][0] == PCRS[0] and doc["pcrs"][4] == PCRS[4] and doc["pcrs"][3] == bytes(48)
    assert (doc["public_key"], doc["user_data"], doc["nonce"]) == (b"PK", None, b"N" * 32)
    leaf = x509.load_der_x509_certificate(doc["certificate"])
    assert leaf.not_valid_before_utc <= T0 < leaf.not_valid_after_utc


def test_each_document_has_a_fresh_leaf(pki: LocalPki) -> None:
    nsm = Nsm(device(pki))
    a, b = (cbor2.loads(cbor2.loads(nsm.attestation())[2]) for _ in range(2))
    assert a["certificate"] != b["certificate"]


def test_locked_application_pcr_appears_in_the_document(pki: LocalPki) -> None:
    nsm = Nsm(device(pki))
    value = nsm.extend_pcr(20, b"config")
    assert 20 not in own_check(nsm.attestation(), pki.root)["pcrs"]
    nsm.lock_pcr(20)
    assert own_check(nsm.attestation(), pki.root)["pcrs"][20] == value


def test_own_check_fails_on_a_tampered_payload(pki: LocalPki) -> None:
    protected, unprotected, payload, sig = cbor2.loads(Nsm(device(pki)).attestation(nonce=b"a"))
    changed = payload.replace(b"nonceAa", b"nonceAb")
    assert changed != payload
    tampered = cbor2.dumps([protected, unprotected, changed, sig])
    with pytest.raises(InvalidSignature):
        own_check(tampered, pki.root)


def test_make_local_nsm_creates_the_pki(tmp_path: Path) -> None:
    nsm = make_local_nsm(tmp_path / "k", PCRS, clock=fixed(T0))
    root = x509.load_pem_x509_certificate((tmp_path / "k" / "root.pem").read_bytes())
    assert own_check(nsm.attestation(), root)["pcrs"][1] == PCRS[1]


# -- interop with the production verifier ----------------------------------------------------------------


def test_production_verifier_accepts_local_documents(pki: LocalPki) -> None:
    raw = Nsm(device(pki)).attestation(public_key=b"PK", user_data=b"U", nonce=b"N")
    assert parse_document(raw).module_id == "i-0abc-enc0def"
    verified = verify_document(
        raw,
        at=T0 + timedelta(minutes=5),
        root=pki.root,
        expect=Expectations(
            pcrs={0: PCRS[0], 1: PCRS[1], 2: PCRS[2], 3: bytes(48)},
            nonce=b"N",
            public_key=b"PK",
            user_data=b"U",
        ),
    )
    assert dict(verified.pcrs) == {i: PCRS.get(i, bytes(48)) for i in range(16)}
    assert verified.document.timestamp == T0.replace(microsecond=250000)


def test_production_verifier_rejects_another_local_root(pki: LocalPki, tmp_path: Path) -> None:
    other = LocalPki.ensure(tmp_path / "other", clock=fixed(T0))
    with pytest.raises(UntrustedRootError):
        verify_document(Nsm(device(pki)).attestation(), at=T0, root=other.root)


def test_production_verifier_rejects_a_lapsed_local_leaf(pki: LocalPki) -> None:
    raw = Nsm(device(pki)).attestation()
    verify_document(raw, at=T0 + timedelta(hours=2, minutes=59), root=pki.root)
    with pytest.raises(CertificateExpiredError):
        verify_document(raw, at=T0 + timedelta(hours=3), root=pki.root)


def test_production_verifier_sees_other_pcrs(pki: LocalPki) -> None:
    raw = Nsm(device(pki, pcrs={**PCRS, 2: b"\x99" * 48})).attestation()
    with pytest.raises(PCRMismatchError):
        verify_document(raw, at=T0, root=pki.root, expect=Expectations(pcrs={2: PCRS[2]}))


def test_production_verifier_flags_a_local_debug_document(pki: LocalPki) -> None:
    raw = Nsm(device(pki, pcrs={4: PCRS[4]})).attestation()  # PCR0/1/2 all zero, like debug mode
    with pytest.raises(DebugModeError):
        verify_document(raw, at=T0, root=pki.root)
    verify_document(raw, at=T0, root=pki.root, unsafe_allow_debug=True)
