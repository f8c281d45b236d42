"""Parse an enclave image file (``.eif``) and compute PCR0/1/2/8 as ``nitro-cli`` does. Pure.

The format is https://github.com/aws/aws-nitro-enclaves-image-format (``src/defs/mod.rs``, ``eif_hasher.rs``,
``utils/eif_reader.rs``). Everything is big-endian:

* a 548-byte header: ``magic ".eif"``, ``version u16``, ``flags u16`` (bit 0: aarch64), ``default_mem u64``,
  ``default_cpus u64``, ``reserved u16``, ``num_sections u16``, ``section_offsets [u64; 32]``,
  ``section_sizes [u64; 32]``, ``unused u32``, ``eif_crc32 u32``;
* sections, each a 12-byte header ``section_type u16, flags u16, section_size u64`` then the data. Types:
  1 kernel, 2 cmdline, 3 ramdisk, 4 signature (CBOR), 5 metadata (JSON).

Measurements (``H(x) = SHA-384(x)``; a PCR starts at 48 zero bytes and is extended once):

* ``PCR0 = H(0^48 || H(kernel || cmdline || ramdisk_0 || ... || ramdisk_n))`` (the image, no headers)
* ``PCR1 = H(0^48 || H(kernel || cmdline || ramdisk_0))``              (kernel and boot ramfs)
* ``PCR2 = H(0^48 || H(ramdisk_1 || ... || ramdisk_n))``               (the application)
* ``PCR8 = H(0^48 || H(DER(signing certificate)))``                    (only for a signed EIF)

Section headers, the metadata and the signature sections are in no PCR. The CRC (CRC-32/ISO-HDLC, i.e.
``zlib.crc32``) covers the header without its CRC field, then every section header and data in order.

Invariants: reading never trusts an offset or a size (each is checked against the file length before it
is used), sections are hashed in bounded chunks (EIFs are hundreds of MB), and every malformation is an
:class:`~nitrovault.errors.EifError`. Hand-written because there is no Python EIF library; about 40
lines of parsing plus checks. The signature section's COSE signature is *not* verified here (PCR8
only measures which certificate signed; ``nitro-cli describe-eif`` verifies it).

Example::

    m = eif_pcrs("enclave.eif")
    m.pcrs[0].hex()   # the value nitro-cli build-enclave prints as PCR0
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from nitrovault.errors import EifError

__all__ = [
    "EIF_MAGIC",
    "HEADER_LEN",
    "EifMeasurements",
    "EifSection",
    "SectionType",
    "eif_measurements",
    "eif_pcrs",
    "extend",
]

EIF_MAGIC = b".eif"
HEADER_LEN = 548
SECTION_HEADER_LEN = 12
MAX_SECTIONS = 32
_HEADER = struct.Struct(">4sHHQQHH32Q32QII")
_SECTION = struct.Struct(">HHQ")
_CHUNK = 1 << 20
assert _HEADER.size == HEADER_LEN


class SectionType:
    """Section type numbers (``EifSectionType``)."""

    INVALID = 0
    KERNEL = 1
    CMDLINE = 2
    RAMDISK = 3
    SIGNATURE = 4
    METADATA = 5

_SECTION_NAMES: Mapping[int, str] = {
    0: "invalid", 1: "kernel", 2: "cmdline", 3: "ramdisk", 4: "signature", 5: "metadata",
}


@dataclass(frozen=True)
class EifSection:
    type: int
    offset: int
    size: int

    @property
    def name(self) -> str:
        return _SECTION_NAMES.get(self.type, f"unknown({self.type})")


@dataclass(frozen=True)
class EifMeasurements:
    """What ``nitro-cli`` would print for this EIF, plus the facts needed to review it."""

    version: int
    #: True for an aarch64 image (flags bit 0)
    aarch64: bool
    default_mem: int
    default_cpus: int
    sections: tuple[EifSection, ...]
    #: PCR index -> 48 bytes: 0, 1 and 2 always, 8 when the EIF is signed
    pcrs: Mapping[int, bytes]
    #: the signing certificate (DER) when signed
    signing_certificate: bytes | None
    #: the metadata section parsed as JSON text (None when absent)
    metadata: str | None
    #: SHA-384 of the whole file, for the manifest
    file_sha384: bytes


def extend(measurement: bytes, register: bytes = bytes(48)) -> bytes:
    """One PCR extend: ``H(register || measurement)``; from zero, that is ``tpm_extend_finalize_reset``."""
    return hashlib.sha384(register + measurement).digest()


def _read_exact(stream: BinaryIO, offset: int, size: int) -> bytes:
    stream.seek(offset)
    data = stream.read(size)
    if len(data) != size:
        raise EifError("EIF is truncated")
    return data


def _certificate_der(signature_section: bytes) -> bytes:
    """The first PcrSignature's certificate (PEM in the EIF) as DER."""
    try:
        entries = cbor2.loads(signature_section)
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise EifError("EIF signature section is not CBOR") from exc
    if not isinstance(entries, list | tuple) or not entries or not isinstance(entries[0], Mapping):
        raise EifError("EIF signature section holds no PcrSignature")
    raw = entries[0].get("signing_certificate")
    # serde_cbor writes Vec<u8> as an array of integers; accept a byte string as well
    if isinstance(raw, list | tuple) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        raw = bytes(raw)
    if not isinstance(raw, bytes):
        raise EifError("EIF signature section: signing_certificate is missing")
    try:
        cert = x509.load_pem_x509_certificate(raw) if raw.lstrip().startswith(b"-----") else (
            x509.load_der_x509_certificate(raw)
        )
    except ValueError as exc:
        raise EifError("EIF signature section: the signing certificate does not parse") from exc
    return cert.public_bytes(Encoding.DER)


def eif_measurements(stream: BinaryIO) -> EifMeasurements:
    """Parse a seekable binary stream holding an EIF and measure it; :class:`EifError` if malformed."""
    stream.seek(0, io.SEEK_END)
    length = stream.tell()
    if length < HEADER_LEN:
        raise EifError("EIF is truncated (shorter than its 548-byte header)")
    header = _read_exact(stream, 0, HEADER_LEN)
    fields = _HEADER.unpack(header)
    magic, version, flags, default_mem, default_cpus, _reserved, count = fields[:7]
    offsets, sizes, crc_expected = fields[7:39], fields[39:71], fields[72]
    if magic != EIF_MAGIC:
        raise EifError("not an EIF (bad magic)")
    if not 0 < count <= MAX_SECTIONS:
        raise EifError(f"EIF declares {count} sections (1..{MAX_SECTIONS} allowed)")

    crc = zlib.crc32(header[: HEADER_LEN - 4])
    file_hash = hashlib.sha384()
    stream.seek(0)
    while chunk := stream.read(_CHUNK):
        file_hash.update(chunk)

    pcr0, pcr1, pcr2 = hashlib.sha384(), hashlib.sha384(), hashlib.sha384()
    sections: list[EifSection] = []
    ramdisks = 0
    certificate: bytes | None = None
    metadata: str | None = None
    for i in range(count):
        offset, size = offsets[i], sizes[i]
        if offset < HEADER_LEN or offset + SECTION_HEADER_LEN + size > length:
            raise EifError(f"EIF section {i} lies outside the file (truncated or corrupt)")
        section_header = _read_exact(stream, offset, SECTION_HEADER_LEN)
        kind, _flags, declared = _SECTION.unpack(section_header)
        if declared != size:
            raise EifError(f"EIF section {i}: header size {declared} disagrees with the table ({size})")
        crc = zlib.crc32(section_header, crc)
        section = EifSection(kind, offset, size)
        sections.append(section)
        measured: list[hashlib._Hash] = []
        if kind in (SectionType.KERNEL, SectionType.CMDLINE):
            if ramdisks:
                raise EifError("EIF kernel/cmdline section after a ramdisk")
            measured = [pcr0, pcr1]
        elif kind == SectionType.RAMDISK:
            measured = [pcr0, pcr1] if ramdisks == 0 else [pcr0, pcr2]
            ramdisks += 1
        elif kind not in (SectionType.SIGNATURE, SectionType.METADATA):
            raise EifError(f"EIF section {i} has unknown type {kind}")
        stream.seek(offset + SECTION_HEADER_LEN)
        remaining = size
        small = bytearray() if kind in (SectionType.SIGNATURE, SectionType.METADATA) else None
        while remaining:
            chunk = stream.read(min(_CHUNK, remaining))
            if not chunk:
                raise EifError("EIF is truncated")
            remaining -= len(chunk)
            crc = zlib.crc32(chunk, crc)
            for h in measured:
                h.update(chunk)
            if small is not None:
                small += chunk
        if kind == SectionType.SIGNATURE and small is not None:
            certificate = _certificate_der(bytes(small))
        elif kind == SectionType.METADATA and small is not None:
            metadata = bytes(small).decode("utf-8", errors="replace")

    kinds = [s.type for s in sections]
    if SectionType.KERNEL not in kinds or SectionType.CMDLINE not in kinds or ramdisks == 0:
        raise EifError("EIF lacks a kernel, a cmdline or a ramdisk section")
    if version >= 2 and crc != crc_expected:  # V2 introduced the CRC
        raise EifError("EIF CRC mismatch: the file is corrupt or was modified")
    pcrs = {0: extend(pcr0.digest()), 1: extend(pcr1.digest()), 2: extend(pcr2.digest())}
    if certificate is not None:
        pcrs[8] = extend(hashlib.sha384(certificate).digest())
    return EifMeasurements(
        version=version,
        aarch64=bool(flags & 1),
        default_mem=default_mem,
        default_cpus=default_cpus,
        sections=tuple(sections),
        pcrs=pcrs,
        signing_certificate=certificate,
        metadata=metadata,
        file_sha384=file_hash.digest(),
    )


def eif_pcrs(path: str | Path) -> EifMeasurements:
    """Measure the EIF at ``path``; :class:`EifError` when it is unreadable or malformed."""
    try:
        with open(path, "rb") as stream:
            return eif_measurements(stream)
    except OSError as exc:
        raise EifError(f"cannot read EIF {str(path)!r}: {exc.strerror}") from exc
