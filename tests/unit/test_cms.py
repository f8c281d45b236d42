"""CMS CiphertextForRecipient: real KMS samples, our builder, openssl interop, one negative per check."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import algos, cms, core
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.oid import NameOID

from nitrovault.errors import EnvelopeError, UnsupportedAlgorithmError
from nitrovault.kms.cms import (
    CONTENT_ALGORITHM,
    KEY_ALGORITHM,
    MAX_ENVELOPE_SIZE,
    EnvelopeParts,
    build_ciphertext_for_recipient,
    open_ciphertext_for_recipient,
    parse_enveloped_data,
)

OPEN_FAILED = "could not open the envelope: wrong key, or the envelope is corrupted"


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _spki(k: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> bytes:
    pub = k.public_key() if isinstance(k, rsa.RSAPrivateKey) else k
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def kms_samples(nitro_vectors_dir: Path) -> list[dict[str, Any]]:
    meta = json.loads((nitro_vectors_dir / "vectors.json").read_text())
    out = []
    for entry in meta["kms_ciphertext_for_recipient"]:
        item = dict(entry)
        item["data"] = (nitro_vectors_dir / entry["file"]).read_bytes()
        out.append(item)
    assert len(out) == 2
    return out


# -- a tiny BER header walker (single-byte tags; that is all CMS here uses) ----------------------------


def ber_headers(data: bytes) -> list[tuple[int, int, int | None, int]]:
    """(depth, tag, length or None for indefinite, content offset) for every element, EOCs included."""
    out: list[tuple[int, int, int | None, int]] = []

    def walk(pos: int, end: int | None, depth: int) -> int:
        while pos < (len(data) if end is None else end):
            assert pos + 2 <= len(data), "truncated header"
            tag = data[pos]
            assert tag & 0x1F != 0x1F, "multi-byte tags are not expected"
            if end is None and tag == 0 and data[pos + 1] == 0:
                out.append((depth, 0, 0, pos + 2))
                return pos + 2
            first, hp = data[pos + 1], pos + 2
            length: int | None
            if first == 0x80:
                length = None
            elif first & 0x80:
                n = first & 0x7F
                length, hp = int.from_bytes(data[hp : hp + n], "big"), hp + n
            else:
                length = first
            out.append((depth, tag, length, hp))
            if tag & 0x20:
                if length is None:
                    pos = walk(hp, None, depth + 1)
                else:
                    assert walk(hp, hp + length, depth + 1) == hp + length
                    pos = hp + length
            else:
                assert length is not None, "primitive elements cannot be indefinite"
                pos = hp + length
                assert pos <= len(data), "truncated content"
        assert end is not None, "missing end-of-contents"
        assert pos == end
        return pos

    assert walk(0, len(data), 0) == len(data)
    return out


def test_ber_walker_reads_definite_and_indefinite() -> None:
    # SEQUENCE(indef){ INTEGER 2, OCTET STRING(long form, 130 bytes) } EOC
    blob = b"\x30\x80\x02\x01\x02\x04\x81\x82" + bytes(130) + b"\x00\x00"
    assert [h[:3] for h in ber_headers(blob)] == [(0, 0x30, None), (1, 0x02, 1), (1, 0x04, 130), (1, 0, 0)]
    with pytest.raises(AssertionError):
        ber_headers(blob[:-1])


# -- real KMS samples --------------------------------------------------------------------------------


def test_real_samples_parse_to_the_expected_fields(kms_samples: list[dict[str, Any]]) -> None:
    for sample in kms_samples:
        parts = parse_enveloped_data(sample["data"])
        assert parts.version == 2
        assert parts.rid_kind == "subject_key_identifier"
        assert len(parts.rid_value) == 32
        assert parts.key_algorithm == KEY_ALGORITHM
        assert parts.content_algorithm == CONTENT_ALGORITHM
        assert parts.encrypted_key.hex() == sample["expected_encrypted_key"]
        assert parts.iv.hex() == sample["expected_iv"]
        assert parts.encrypted_content.hex() == sample["expected_ciphertext"]


class _RecordingKey(rsa.RSAPrivateKey):
    """Stands in for the (unpublished) enclave key: records what the opener asks it to decrypt."""

    def __init__(self, real: rsa.RSAPrivateKey) -> None:
        self.real = real
        self.calls: list[tuple[bytes, padding.AsymmetricPadding]] = []

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        self.calls.append((ciphertext, padding))
        raise ValueError("Decryption failed")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    # abstract members delegated explicitly
    key_size = property(lambda self: self.real.key_size)  # type: ignore[assignment]

    def public_key(self) -> rsa.RSAPublicKey:
        return self.real.public_key()

    def sign(self, *a: Any, **k: Any) -> bytes:  # pragma: no cover - unused
        raise NotImplementedError

    def private_numbers(self) -> rsa.RSAPrivateNumbers:  # pragma: no cover - unused
        raise NotImplementedError

    def private_bytes(self, *a: Any, **k: Any) -> bytes:  # pragma: no cover - unused
        raise NotImplementedError

    def __copy__(self) -> _RecordingKey:  # pragma: no cover - unused
        return self

    def __deepcopy__(self, memo: Any) -> _RecordingKey:  # pragma: no cover - unused
        return self


def test_real_samples_reach_the_key_decrypt_step_with_oaep_sha256(
    kms_samples: list[dict[str, Any]], key: rsa.RSAPrivateKey
) -> None:
    for sample in kms_samples:
        recorder = _RecordingKey(key)
        with pytest.raises(EnvelopeError) as info:
            open_ciphertext_for_recipient(sample["data"], recorder)
        assert str(info.value) == OPEN_FAILED
        assert type(info.value) is EnvelopeError
        [(ciphertext, pad)] = recorder.calls
        assert ciphertext.hex() == sample["expected_encrypted_key"]
        assert isinstance(pad, padding.OAEP)
        assert isinstance(pad.algorithm, hashes.SHA256)
        assert isinstance(pad.mgf._algorithm, hashes.SHA256)  # type: ignore[attr-defined]
        assert pad._label in (None, b"")


def test_real_samples_with_a_wrong_key_fail_with_the_generic_message(
    kms_samples: list[dict[str, Any]], key: rsa.RSAPrivateKey
) -> None:
    for sample in kms_samples:
        with pytest.raises(EnvelopeError, match="^" + OPEN_FAILED + "$"):
            open_ciphertext_for_recipient(sample["data"], key)


# -- builder: round trip and layout ------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 15, 16, 32, 4096])
def test_round_trip(key: rsa.RSAPrivateKey, size: int) -> None:
    plaintext = bytes((i * 7 + 3) % 256 for i in range(size))
    blob = build_ciphertext_for_recipient(plaintext, _spki(key))
    assert open_ciphertext_for_recipient(blob, key) == plaintext


def test_round_trip_wrong_key_fails(key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey) -> None:
    blob = build_ciphertext_for_recipient(b"k" * 32, _spki(key))
    with pytest.raises(EnvelopeError, match="^" + OPEN_FAILED + "$"):
        open_ciphertext_for_recipient(blob, other_key)


def test_builder_fields_follow_kms(key: rsa.RSAPrivateKey) -> None:
    draws: list[int] = []

    def rng(n: int) -> bytes:
        draws.append(n)
        return bytes([len(draws)]) * n

    blob = build_ciphertext_for_recipient(b"k" * 32, _spki(key), rng=rng)
    assert draws == [32, 16]
    parts = parse_enveloped_data(blob)
    assert parts == EnvelopeParts(
        version=2,
        rid_kind="subject_key_identifier",
        rid_value=hashlib.sha256(_spki(key)).digest(),
        key_algorithm=KEY_ALGORITHM,
        encrypted_key=parts.encrypted_key,
        content_algorithm=CONTENT_ALGORITHM,
        iv=b"\x02" * 16,
        encrypted_content=parts.encrypted_content,
    )
    assert len(parts.encrypted_key) == 256
    assert len(parts.encrypted_content) == 48
    # the content key is the first rng draw
    assert key.decrypt(parts.encrypted_key, _oaep()) == b"\x01" * 32


def test_builder_layout_matches_real_kms_sample(
    kms_samples: list[dict[str, Any]], key: rsa.RSAPrivateKey
) -> None:
    sample = next(s["data"] for s in kms_samples if s["file"].endswith("explicit-octets.ber"))
    ours = build_ciphertext_for_recipient(b"k" * 32, _spki(key))  # 32 bytes -> 48-byte content, as sample 1
    ours_h, sample_h = ber_headers(ours), ber_headers(sample)
    # same tags, same definite/indefinite forms, same lengths, same EOCs, at the same offsets
    assert ours_h == sample_h
    assert ours[:17] == bytes.fromhex("308006092a864886f70d010703a0803080")
    assert ours.endswith(b"\x00" * 10)
    # Everything except the four random fields (rid, encryptedKey, IV, content) is byte-identical:
    # same OIDs, same NULL hash parameters, same absent pSource, same versions.
    random_fields = [
        (d, t, n, off)
        for (d, t, n, off) in sample_h
        if (d, t) in {(5, 0x80), (5, 0x04), (6, 0x04)} or (d, t, n) == (5, 0x04, 48)
    ]
    assert [n for (_, _, n, _) in random_fields] == [32, 256, 16, 48]

    def masked(blob: bytes) -> bytes:
        buf = bytearray(blob)
        for _, _, n, off in random_fields:
            assert n is not None
            buf[off : off + n] = bytes(n)
        return bytes(buf)

    assert masked(ours) == masked(sample)
    assert ours != sample


@pytest.mark.parametrize(
    "make_spki",
    [
        lambda: _spki(rsa.generate_private_key(public_exponent=65537, key_size=1024)),  # noqa: S505 - the point of the test
        lambda: (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        ),
        lambda: (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            .public_key()
            .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        ),
        lambda: b"\x30\x03\x02\x01\x00",
    ],
    ids=["rsa1024", "ec-p256", "pkcs1-not-spki", "garbage"],
)
def test_builder_refuses_keys_other_than_rsa2048_spki(make_spki: Callable[[], bytes]) -> None:
    with pytest.raises(EnvelopeError):
        build_ciphertext_for_recipient(b"k" * 32, make_spki())


def test_builder_accepts_rsa3072(key: rsa.RSAPrivateKey) -> None:
    big = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    assert open_ciphertext_for_recipient(build_ciphertext_for_recipient(b"x", _spki(big)), big) == b"x"


def test_builder_refuses_oversized_plaintext(key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(EnvelopeError):
        build_ciphertext_for_recipient(bytes(16 * 1024 + 1), _spki(key))


def test_builder_refuses_short_rng(key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(EnvelopeError):
        build_ciphertext_for_recipient(b"k", _spki(key), rng=lambda n: bytes(n - 1))


# -- a configurable envelope maker for one-check-at-a-time negatives ---------------------------------


def _oaep(
    hash_alg: hashes.HashAlgorithm | None = None,
    mgf_alg: hashes.HashAlgorithm | None = None,
    label: bytes | None = None,
) -> padding.OAEP:
    return padding.OAEP(
        mgf=padding.MGF1(mgf_alg or hashes.SHA256()), algorithm=hash_alg or hashes.SHA256(), label=label
    )


_HASHES: dict[str, hashes.HashAlgorithm] = {"sha1": hashes.SHA1(), "sha256": hashes.SHA256()}  # noqa: S303


def make_envelope(
    public_key: rsa.RSAPublicKey,
    plaintext: bytes = b"k" * 32,
    *,
    oaep_hash: str = "sha256",
    hash_params: str = "null",
    mgf_hash: str = "sha256",
    label: bytes | None = None,
    key_alg: str = "rsaes_oaep",
    oaep_params: bool = True,
    content_alg: str = "aes256_cbc",
    iv_len: int = 16,
    cek_len: int = 32,
    rid: str = "ski",
    ktri_version: str | None = None,
    ed_version: str = "v2",
    n_ktri: int = 1,
    extra_kekri: bool = False,
    inner_type: str = "data",
    pad: bool = True,
    content: bytes | str | None = "encrypt",
    outer_oid: str = "",
) -> bytes:
    """A DER envelope, really encrypted to ``public_key``, with one knob turned at a time."""
    cek, iv = bytes(range(cek_len)), bytes(range(100, 100 + iv_len))
    body = plaintext
    if pad:
        padder = sym_padding.PKCS7(128).padder()
        body = padder.update(plaintext) + padder.finalize()
    if content == "encrypt":
        cipher = algorithms.AES(cek if len(cek) in (16, 24, 32) else bytes(32))
        enc = Cipher(cipher, modes.CBC(iv if iv_len == 16 else bytes(16))).encryptor()
        content = enc.update(body) + enc.finalize()
    if key_alg == "rsaes_oaep":
        encrypted_key = public_key.encrypt(cek, _oaep(_HASHES[oaep_hash], _HASHES[mgf_hash], label))
        params: Any = {
            "hash_algorithm": {"algorithm": oaep_hash, "parameters": _params(hash_params)},
            "mask_gen_algorithm": {
                "algorithm": "mgf1",
                "parameters": {"algorithm": mgf_hash, "parameters": core.Null()},
            },
        }
        if label is not None:
            params["p_source_algorithm"] = {"algorithm": "p_specified", "parameters": label}
        key_algorithm = cms.KeyEncryptionAlgorithm(
            {"algorithm": "rsaes_oaep", "parameters": algos.RSAESOAEPParams(params) if oaep_params else None}
        )
    else:
        encrypted_key = public_key.encrypt(cek, padding.PKCS1v15())
        key_algorithm = cms.KeyEncryptionAlgorithm({"algorithm": key_alg, "parameters": core.Null()})
    if rid == "ski":
        rid_value = cms.RecipientIdentifier(name="subject_key_identifier", value=b"\x11" * 32)
    else:
        rid_value = cms.RecipientIdentifier(
            name="issuer_and_serial_number",
            value={"issuer": x509_name_der(), "serial_number": 12345},
        )
    ktri = cms.KeyTransRecipientInfo(
        {
            "version": ktri_version or ("v2" if rid == "ski" else "v0"),
            "rid": rid_value,
            "key_encryption_algorithm": key_algorithm,
            "encrypted_key": encrypted_key,
        }
    )
    infos = [cms.RecipientInfo(name="ktri", value=ktri) for _ in range(n_ktri)]
    if extra_kekri:
        infos = [
            cms.RecipientInfo(
                name="kekri",
                value=cms.KEKRecipientInfo(
                    {
                        "version": "v4",
                        "kekid": {"key_identifier": b"kek"},
                        "key_encryption_algorithm": {"algorithm": "aes256_wrap"},
                        "encrypted_key": bytes(40),
                    }
                ),
            )
        ]
    eci: dict[str, Any] = {
        "content_type": inner_type,
        "content_encryption_algorithm": {"algorithm": content_alg, "parameters": iv}
        if content_alg != "aes256_gcm"  # GCMParameters has the same shape as CCM's
        else {
            "algorithm": content_alg,
            "parameters": algos.CcmParams({"aes_nonce": iv[:12], "aes_icvlen": 16}),
        },
    }
    if content is not None:
        eci["encrypted_content"] = content
    env = cms.EnvelopedData({"version": ed_version, "recipient_infos": infos, "encrypted_content_info": eci})
    blob = bytes(cms.ContentInfo({"content_type": "enveloped_data", "content": env}).dump())
    sha256_null = bytes.fromhex("06096086480165030402010500")
    if hash_params == "octets":  # asn1crypto will not encode it: patch the OAEP hash's NULL (first one)
        assert blob.count(sha256_null) == 2
        blob = blob.replace(sha256_null, sha256_null[:-2] + b"\x04\x00", 1)
    if outer_oid:
        blob = blob.replace(bytes.fromhex("2a864886f70d010703"), bytes.fromhex(outer_oid), 1)
    return blob


def _params(kind: str) -> Any:
    return None if kind == "absent" else core.Null()


def x509_name_der() -> Any:
    from asn1crypto import x509 as ax509

    return ax509.Name.build({"common_name": "recipient"})


def test_envelope_maker_baseline_opens(key: rsa.RSAPrivateKey) -> None:
    # the knobs below each break exactly one check: the untouched envelope must open
    assert open_ciphertext_for_recipient(make_envelope(key.public_key()), key) == b"k" * 32


@pytest.mark.parametrize(
    "knobs",
    [
        {"hash_params": "absent"},
        {"label": b""},
        {"rid": "issuer"},
        {"ed_version": "v0", "rid": "issuer"},
        {"plaintext": b""},
    ],
    ids=[
        "hash-params-absent",
        "explicit-empty-label",
        "issuer-and-serial",
        "ed-version-0",
        "empty-plaintext",
    ],
)
def test_accepted_variants(key: rsa.RSAPrivateKey, knobs: dict[str, Any]) -> None:
    plaintext = knobs.get("plaintext", b"k" * 32)
    assert open_ciphertext_for_recipient(make_envelope(key.public_key(), **knobs), key) == plaintext


@pytest.mark.parametrize(
    "knobs",
    [
        {"key_alg": "rsaes_pkcs1v15"},
        {"oaep_params": False},
        {"oaep_hash": "sha1"},
        {"mgf_hash": "sha1"},
        {"label": b"label"},
        {"content_alg": "aes128_cbc", "cek_len": 16},
        {"content_alg": "aes256_gcm"},
        {"content_alg": "tripledes_3key", "iv_len": 8, "cek_len": 24},
        {"extra_kekri": True},
    ],
    ids=[
        "pkcs1v15",
        "oaep-default-sha1-params",
        "oaep-sha1",
        "mgf1-sha1",
        "oaep-label",
        "aes128-cbc",
        "aes256-gcm",
        "3des",
        "kekri",
    ],
)
def test_unsupported_algorithms_fail_closed(key: rsa.RSAPrivateKey, knobs: dict[str, Any]) -> None:
    blob = make_envelope(key.public_key(), **knobs)
    with pytest.raises(UnsupportedAlgorithmError):
        parse_enveloped_data(blob)
    with pytest.raises(UnsupportedAlgorithmError):
        open_ciphertext_for_recipient(blob, key)


@pytest.mark.parametrize(
    "knobs",
    [
        {"n_ktri": 2},
        {"n_ktri": 0},
        {"outer_oid": "2a864886f70d010702"},
        {"ed_version": "v3"},
        {"ktri_version": "v0"},
        {"rid": "issuer", "ktri_version": "v2"},
        {"inner_type": "signed_data"},
        {"iv_len": 8},
        {"content": None},
        {"content": bytes(17)},
        {"content": b""},
        {"hash_params": "octets"},  # asn1crypto's spec wants NULL for sha256: refused as malformed
    ],
    ids=[
        "two-ktri",
        "no-recipient",
        "not-enveloped-data",
        "enveloped-data-v3",
        "ski-with-version-0",
        "issuer-with-version-2",
        "inner-type-not-data",
        "short-iv",
        "detached-content",
        "content-not-whole-blocks",
        "empty-content",
        "hash-params-not-null",
    ],
)
def test_malformed_envelopes_are_envelope_errors(key: rsa.RSAPrivateKey, knobs: dict[str, Any]) -> None:
    blob = make_envelope(key.public_key(), **knobs)
    with pytest.raises(EnvelopeError) as info:
        parse_enveloped_data(blob)
    assert type(info.value) is EnvelopeError
    assert info.value.args[0] != OPEN_FAILED


def test_decrypt_failures_share_one_message(key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey) -> None:
    good = make_envelope(key.public_key())
    parts = parse_enveloped_data(good)
    flipped_key = good.replace(
        parts.encrypted_key, bytes([parts.encrypted_key[0] ^ 1]) + parts.encrypted_key[1:]
    )
    last = parts.encrypted_content
    flipped_content = good.replace(last, last[:-1] + bytes([last[-1] ^ 0x55]))
    cases = {
        "wrong-key": (good, other_key),
        "corrupted-encrypted-key": (flipped_key, key),
        "bad-padding-unpadded": (
            make_envelope(key.public_key(), plaintext=b"k" * 31 + b"\x00", pad=False),
            key,
        ),
        "bad-padding-corrupted-last-block": (flipped_content, key),
        "content-key-16-bytes": (make_envelope(key.public_key(), cek_len=16), key),
    }
    for name, (blob, k) in cases.items():
        parse_enveloped_data(blob)  # structurally fine: only the decrypt step can fail
        with pytest.raises(EnvelopeError) as info:
            open_ciphertext_for_recipient(blob, k)
        assert type(info.value) is EnvelopeError, name
        assert str(info.value) == OPEN_FAILED, name
        assert info.value.__cause__ is None, name


def test_size_bound_and_trailing_bytes(key: rsa.RSAPrivateKey) -> None:
    good = make_envelope(key.public_key())
    with pytest.raises(EnvelopeError, match="larger than"):
        parse_enveloped_data(good + bytes(MAX_ENVELOPE_SIZE))
    with pytest.raises(EnvelopeError):
        parse_enveloped_data(good + b"\x00")
    with pytest.raises(EnvelopeError):
        parse_enveloped_data(good[:-1])
    with pytest.raises(EnvelopeError):
        parse_enveloped_data(b"")
    with pytest.raises(EnvelopeError):
        parse_enveloped_data(b"\x04\x03abc")


def test_truncated_ber_and_garbage(key: rsa.RSAPrivateKey) -> None:
    blob = build_ciphertext_for_recipient(b"k" * 32, _spki(key))
    for cut in (2, 10, 200, len(blob) - 2):
        with pytest.raises(EnvelopeError):
            parse_enveloped_data(blob[:cut])


def test_non_rsa_private_key_is_refused(key: rsa.RSAPrivateKey) -> None:
    blob = build_ciphertext_for_recipient(b"k", _spki(key))
    with pytest.raises(EnvelopeError):
        open_ciphertext_for_recipient(blob, ec.generate_private_key(ec.SECP256R1()))  # type: ignore[arg-type]


def test_encrypted_content_primitive_and_multi_chunk(key: rsa.RSAPrivateKey) -> None:
    blob = build_ciphertext_for_recipient(b"k" * 32, _spki(key))
    at = blob.rindex(b"\xa0\x80\x04\x30")
    content = blob[at + 4 : at + 52]
    tail = blob[at + 52 :]
    assert tail == b"\x00" * 10
    primitive = blob[:at] + b"\x80\x30" + content + tail[2:]  # like sample 2
    chunked = blob[:at] + b"\xa0\x80\x04\x10" + content[:16] + b"\x04\x20" + content[16:] + tail
    for variant in (primitive, chunked):
        assert open_ciphertext_for_recipient(variant, key) == b"k" * 32


# -- interop with openssl ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openssl_recipient(tmp_path_factory: pytest.TempPathFactory, key: rsa.RSAPrivateKey) -> Path:
    assert shutil.which("openssl"), "openssl is needed for the CMS interop tests"
    d = tmp_path_factory.mktemp("openssl")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nitrovault-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    # a certificate whose SKI is what our builder puts in the rid (SHA-256 of the SPKI)
    ski_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier(hashlib.sha256(_spki(key)).digest()), critical=False)
        .sign(key, hashes.SHA256())
    )
    (d / "ski-cert.pem").write_bytes(ski_cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return d


def _openssl(*args: str | Path, stdin: bytes = b"") -> bytes:
    done = subprocess.run(
        ["openssl", *map(str, args)], input=stdin, capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


_OAEP_SHA256 = (
    "-keyopt",
    "rsa_padding_mode:oaep",
    "-keyopt",
    "rsa_oaep_md:sha256",
    "-keyopt",
    "rsa_mgf1_md:sha256",
)


@pytest.mark.parametrize(
    ("extra", "rid_kind"), [(("-keyid",), "subject_key_identifier"), ((), "issuer_and_serial_number")]
)
def test_open_openssl_envelopes(
    openssl_recipient: Path, key: rsa.RSAPrivateKey, extra: tuple[str, ...], rid_kind: str
) -> None:
    plaintext = bytes(range(256)) + b"tail"
    blob = _openssl(
        "cms",
        "-encrypt",
        "-binary",
        "-aes256",
        *extra,
        "-recip",
        openssl_recipient / "cert.pem",
        *_OAEP_SHA256,
        "-outform",
        "DER",
        stdin=plaintext,
    )
    assert parse_enveloped_data(blob).rid_kind == rid_kind
    assert open_ciphertext_for_recipient(blob, key) == plaintext


@pytest.mark.parametrize(
    "args",
    [
        ("-aes256",),  # default key transport: rsaEncryption (PKCS#1 v1.5)
        ("-aes128", *_OAEP_SHA256),
        ("-aes256", "-keyopt", "rsa_padding_mode:oaep"),  # OAEP with SHA-1
    ],
    ids=["pkcs1v15", "aes128", "oaep-sha1"],
)
def test_openssl_envelopes_with_other_algorithms_are_refused(
    openssl_recipient: Path, key: rsa.RSAPrivateKey, args: tuple[str, ...]
) -> None:
    # openssl wants -keyopt after the -recip it applies to
    blob = _openssl(
        "cms",
        "-encrypt",
        "-binary",
        args[0],
        "-recip",
        openssl_recipient / "cert.pem",
        *args[1:],
        "-outform",
        "DER",
        stdin=b"secret",
    )
    with pytest.raises(UnsupportedAlgorithmError):
        open_ciphertext_for_recipient(blob, key)


def test_openssl_opens_our_ber_with_the_key_only(openssl_recipient: Path, key: rsa.RSAPrivateKey) -> None:
    # openssl reads BER (indefinite lengths) with -inform DER; without -recip it tries every
    # KeyTransRecipientInfo with the key, so the rid's SKI does not have to match any certificate.
    plaintext = b"\x00data key\xff" * 3
    blob = build_ciphertext_for_recipient(plaintext, _spki(key))
    assert blob[:2] == b"\x30\x80"
    out = _openssl(
        "cms", "-decrypt", "-inform", "DER", "-inkey", openssl_recipient / "key.pem", "-binary", stdin=blob
    )
    assert out == plaintext


def test_openssl_matches_our_rid_to_a_cert_with_that_ski(
    openssl_recipient: Path, key: rsa.RSAPrivateKey
) -> None:
    blob = build_ciphertext_for_recipient(b"abc", _spki(key))
    out = _openssl(
        "cms",
        "-decrypt",
        "-inform",
        "DER",
        "-inkey",
        openssl_recipient / "key.pem",
        "-recip",
        openssl_recipient / "ski-cert.pem",
        "-binary",
        stdin=blob,
    )
    assert out == b"abc"
    # and the ordinary (SHA-1 SKI) certificate does not match our rid: the rid really is SHA-256(SPKI)
    done = subprocess.run(
        [
            "openssl",
            "cms",
            "-decrypt",
            "-inform",
            "DER",
            "-inkey",
            str(openssl_recipient / "key.pem"),
            "-recip",
            str(openssl_recipient / "cert.pem"),
            "-binary",
        ],
        input=blob,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
