"""nitrovault.eif against EIF files built here per aws-nitro-enclaves-image-format, with PCRs computed
independently.

The expectations below are written from the format's formulas with hashlib directly (no helper
from nitrovault.eif), so a misreading in the parser cannot cancel out in the test.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from nitrovault.eif import eif_measurements, eif_pcrs
from nitrovault.errors import EifError

KERNEL = b"\x7fELF kernel image " * 100
CMDLINE = b"reboot=k panic=30 pci=off nomodules console=ttyS0 random.trust_cpu=on"
METADATA = b'{"ImageName":"nitrovault","ImageVersion":"1.0","BuildMetadata":{}}'
RAMDISK_INIT = b"boot ramfs: init + nsm driver" * 50
RAMDISK_APP = b"application rootfs: python + enclave_app" * 80
RAMDISK_APP2 = b"second application ramdisk" * 10
Z48 = bytes(48)


def sha384(data: bytes) -> bytes:
    return hashlib.sha384(data).digest()


def self_signed_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "eif signer")])
    now = datetime(2025, 1, 1, tzinfo=UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=30))
        .sign(key, hashes.SHA384())
    )
    return cert.public_bytes(Encoding.PEM)


def build_eif(
    sections: list[tuple[int, bytes]], *, version: int = 4, crc: int | None = None, flags: int = 0
) -> bytes:
    """An EIF per the format: 548-byte big-endian header, then 12-byte section headers + data."""
    offsets, sizes, body = [], [], b""
    for kind, data in sections:
        offsets.append(548 + len(body))
        sizes.append(len(data))
        body += struct.pack(">HHQ", kind, 0, len(data)) + data
    n = len(sections)
    head = (
        b".eif"
        + struct.pack(">HHQQHH", version, flags, 512 << 20, 2, 0, n)
        + struct.pack(">32Q", *offsets, *([0] * (32 - n)))
        + struct.pack(">32Q", *sizes, *([0] * (32 - n)))
        + struct.pack(">I", 0)
    )
    assert len(head) == 544
    value = zlib.crc32(head + body) if crc is None else crc
    return head + struct.pack(">I", value) + body


def standard(signature: bytes | None = None, app2: bool = True) -> list[tuple[int, bytes]]:
    sections = [(1, KERNEL), (2, CMDLINE), (5, METADATA), (3, RAMDISK_INIT), (3, RAMDISK_APP)]
    if app2:
        sections.append((3, RAMDISK_APP2))
    if signature is not None:
        sections.append((4, signature))
    return sections


def test_pcr0_1_2_match_the_formulas(tmp_path: Path) -> None:
    data = build_eif(standard())
    path = tmp_path / "enclave.eif"
    path.write_bytes(data)
    m = eif_pcrs(path)
    assert m.pcrs[0] == sha384(Z48 + sha384(KERNEL + CMDLINE + RAMDISK_INIT + RAMDISK_APP + RAMDISK_APP2))
    assert m.pcrs[1] == sha384(Z48 + sha384(KERNEL + CMDLINE + RAMDISK_INIT))
    assert m.pcrs[2] == sha384(Z48 + sha384(RAMDISK_APP + RAMDISK_APP2))
    assert 8 not in m.pcrs and m.signing_certificate is None
    assert m.file_sha384 == sha384(data)
    assert [s.name for s in m.sections] == ["kernel", "cmdline", "metadata", "ramdisk", "ramdisk", "ramdisk"]
    assert (m.version, m.default_cpus, m.default_mem, m.aarch64) == (4, 2, 512 << 20, False)
    assert m.metadata is not None and "nitrovault" in m.metadata


def test_metadata_is_not_measured_and_app_edit_changes_pcr0_pcr2_only() -> None:
    base = eif_measurements(io.BytesIO(build_eif(standard())))
    other_meta = [(k, b'{"x":1}' if k == 5 else d) for k, d in standard()]
    assert eif_measurements(io.BytesIO(build_eif(other_meta))).pcrs == base.pcrs
    edited = [(k, d + b"!" if d is RAMDISK_APP else d) for k, d in standard()]
    e = eif_measurements(io.BytesIO(build_eif(edited))).pcrs
    assert e[1] == base.pcrs[1] and e[0] != base.pcrs[0] and e[2] != base.pcrs[2]


@pytest.mark.parametrize("as_int_array", [True, False], ids=["serde-vec-u8", "cbor-bytes"])
def test_signed_eif_gives_pcr8_of_the_der_certificate(as_int_array: bool) -> None:
    pem = self_signed_pem()
    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    cose = b"\xd2\x84COSE_Sign1 over PcrInfo (not verified here)"
    cert_field = list(pem) if as_int_array else pem
    sig_field = list(cose) if as_int_array else cose
    signature = cbor2.dumps([{"signing_certificate": cert_field, "signature": sig_field}])
    m = eif_measurements(io.BytesIO(build_eif(standard(signature))))
    assert m.pcrs[8] == sha384(Z48 + sha384(der))
    assert m.signing_certificate == der
    unsigned = eif_measurements(io.BytesIO(build_eif(standard()))).pcrs
    assert all(m.pcrs[i] == unsigned[i] for i in (0, 1, 2))  # the signature section is in no PCR


def test_single_ramdisk_gives_pcr2_of_the_empty_stream() -> None:
    m = eif_measurements(io.BytesIO(build_eif([(1, KERNEL), (2, CMDLINE), (3, RAMDISK_INIT)])))
    assert m.pcrs[2] == sha384(Z48 + sha384(b""))


def test_crc_mismatch_is_refused() -> None:
    good = build_eif(standard())
    wrong_crc = (
        good[:544] + struct.pack(">I", (zlib.crc32(good[:544] + good[548:]) + 1) & 0xFFFFFFFF) + good[548:]
    )
    with pytest.raises(EifError, match="CRC"):
        eif_measurements(io.BytesIO(wrong_crc))
    flipped = bytearray(good)
    flipped[-1] ^= 1  # one bit of the last ramdisk: the CRC catches it
    with pytest.raises(EifError, match="CRC"):
        eif_measurements(io.BytesIO(bytes(flipped)))


def test_version_1_has_no_crc() -> None:
    eif_measurements(io.BytesIO(build_eif(standard(), version=1, crc=0xDEADBEEF)))


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d[:100],  # shorter than the header
        lambda d: d[:-10],  # last section cut short
        lambda d: b".elf" + d[4:],  # bad magic
        lambda d: b"\x00" * len(d),  # garbage
        lambda d: d[:26] + struct.pack(">H", 33) + d[28:],  # too many sections
        lambda d: d[:26] + struct.pack(">H", 0) + d[28:],  # no sections
    ],
    ids=["short-header", "truncated-section", "bad-magic", "zeros", "33-sections", "0-sections"],
)
def test_truncated_or_garbage_is_a_typed_error(mangle: object) -> None:
    data = mangle(build_eif(standard()))  # type: ignore[operator]
    with pytest.raises(EifError):
        eif_measurements(io.BytesIO(data))


def test_section_table_disagreeing_with_section_header_is_refused() -> None:
    data = bytearray(build_eif(standard()))
    struct.pack_into(">Q", data, 28 + 32 * 8, len(KERNEL) - 1)  # section_sizes[0]
    with pytest.raises(EifError, match="disagrees"):
        eif_measurements(io.BytesIO(bytes(data)))


def test_missing_kernel_and_unknown_section_type_are_refused() -> None:
    with pytest.raises(EifError, match="kernel"):
        eif_measurements(io.BytesIO(build_eif([(2, CMDLINE), (3, RAMDISK_INIT)])))
    with pytest.raises(EifError, match="unknown type"):
        eif_measurements(io.BytesIO(build_eif([*standard(), (9, b"?")])))


def test_bad_signature_section_is_refused() -> None:
    with pytest.raises(EifError, match="signature"):
        eif_measurements(io.BytesIO(build_eif(standard(b"\xff\xff not cbor"))))
    bad_cert = cbor2.dumps(
        [{"signing_certificate": b"-----BEGIN CERTIFICATE-----\nAAAA\n", "signature": b""}]
    )
    with pytest.raises(EifError, match="certificate"):
        eif_measurements(io.BytesIO(build_eif(standard(bad_cert))))


def test_unreadable_path_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(EifError, match="cannot read"):
        eif_pcrs(tmp_path / "missing.eif")
