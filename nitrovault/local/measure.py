"""Local PCRs measured from the enclave code that would actually run.

Real PCR0/1/2 are SHA-384 measurements of an EIF's sections (aws-nitro-enclaves-image-format
``eif_hasher.rs``): ``PCRn = SHA384(0^48 || SHA384(stream))`` with

* PCR1 over ``kernel || cmdline || ramdisk_0`` (kernel and boot ramfs),
* PCR2 over ``ramdisk_1 || ... || ramdisk_n`` (the application),
* PCR0 over all of them (the whole image without section headers).

Locally there is no EIF, so we build the same shape from a deterministic "image":

* the **boot stream** stands in for kernel+cmdline+boot ramfs: a fixed marker, the Python
  implementation and version, and the machine architecture;
* the **app stream** stands in for the application ramdisks: every file the image holds, exactly the
  list the Dockerfile keeps (:func:`nitrovault.image.image_files`: ``enclave_app`` and the parts of
  ``nitrovault`` the enclave imports, never caches or compiled files), in sorted relative-path order,
  followed by the locked dependency list. Without a lock file an explicit
  ``no-lock`` marker is hashed instead, so "no lock" is a measurement of its own and never collides with
  an empty lock file.

Every path and content is length-prefixed (8-byte big-endian), and each stream starts with a versioned
tag, so no two different trees produce the same stream. Order on disk does not matter; a one-byte edit
to any measured file changes PCR0 and PCR2 and leaves PCR1 alone.

PCR3 and PCR4 use AWS's published formulas (``SHA384(0^48 || role_arn)``, ``SHA384(0^48 ||
instance_id)``), checked against AWS's worked examples in the tests.

Example::

    m = measure_enclave(Path("."), Path("requirements/lock.txt"))
    nsm = make_local_nsm(pki_dir, m.as_pcrs())
"""

from __future__ import annotations

import hashlib
import platform
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from nitrovault.errors import ConfigError
from nitrovault.image import IMAGE_PACKAGES, image_files

__all__ = [
    "MEASURED_PACKAGES",
    "EnclaveMeasurement",
    "default_lock_file",
    "measure_enclave",
    "measured_files",
    "pcr3_for_role",
    "pcr4_for_instance",
    "pcr_of",
]

PCR_LEN = 48
#: The packages whose files may make up the local "application ramdisk".
MEASURED_PACKAGES = IMAGE_PACKAGES

_BOOT_TAG = b"nitrovault-local-boot-v1"
_APP_TAG = b"nitrovault-local-app-v1"
_NO_LOCK = b"nitrovault-local-no-lock-v1"


@dataclass(frozen=True)
class EnclaveMeasurement:
    """PCR0/1/2 of the local enclave image (48 bytes each), and whether a lock file was measured."""

    pcr0: bytes
    pcr1: bytes
    pcr2: bytes
    lock_file_measured: bool

    def as_pcrs(self) -> dict[int, bytes]:
        return {0: self.pcr0, 1: self.pcr1, 2: self.pcr2}


def pcr_of(stream_digest: bytes) -> bytes:
    """One TPM-style extend of a zero register: ``SHA384(0^48 || digest)`` (``tpm_extend_finalize_reset``)."""
    return hashlib.sha384(bytes(PCR_LEN) + stream_digest).digest()


def pcr3_for_role(role_arn: str) -> bytes:
    """PCR3 as AWS computes it from the parent instance's IAM role ARN."""
    return hashlib.sha384(bytes(PCR_LEN) + role_arn.encode()).digest()


def pcr4_for_instance(instance_id: str) -> bytes:
    """PCR4 as AWS computes it from the parent instance id (``i-...``)."""
    return hashlib.sha384(bytes(PCR_LEN) + instance_id.encode()).digest()


def _item(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def measured_files(source_root: Path) -> Iterator[tuple[str, Path]]:
    """``(relative posix path, path)`` of every measured file, in sorted path order: the image's files."""
    yield from image_files(source_root)


def _boot_stream() -> bytes:
    parts = [_BOOT_TAG, sys.implementation.name.encode(), platform.python_version().encode(),
             platform.machine().encode()]
    return b"".join(_item(p) for p in parts)


def _app_stream(
    source_root: Path, lock_file: Path | None, extra_files: Mapping[str, bytes]
) -> tuple[bytes, bool]:
    out = [_item(_APP_TAG)]
    for package in MEASURED_PACKAGES:
        # Absent vs. empty package must differ too.
        out.append(_item(f"package:{package}:{int((source_root / package).is_dir())}".encode()))
    for rel, path in measured_files(source_root):
        out.append(_item(b"file:" + rel.encode()))
        out.append(_item(path.read_bytes()))
    if lock_file is not None and lock_file.is_file():
        out.append(_item(b"lock"))
        out.append(_item(lock_file.read_bytes()))
        measured = True
    else:
        out.append(_item(_NO_LOCK))
        measured = False
    for name in sorted(extra_files):
        out.append(_item(b"image:" + name.encode()))
        out.append(_item(extra_files[name]))
    return b"".join(out), measured


def measure_enclave(
    source_root: Path, lock_file: Path | None, *, extra_files: Mapping[str, bytes] | None = None
) -> EnclaveMeasurement:
    """PCR0/1/2 of the enclave that ``source_root`` (a checkout) would run, given its locked dependencies.

    A missing ``lock_file`` is measured as an explicit "no lock" marker (see ``lock_file_measured``).
    ``extra_files`` are other files baked into the image by path (the measured enclave config, as
    ``etc/nitrovault/enclave.json``), so changing the config changes PCR0/PCR2 just as in a real image.
    """
    source_root = Path(source_root)
    if not source_root.is_dir():
        raise ConfigError(f"source root {source_root} is not a directory")
    if not any((source_root / p).is_dir() for p in MEASURED_PACKAGES):
        raise ConfigError(f"{source_root} holds none of the packages {', '.join(MEASURED_PACKAGES)}")
    boot = _boot_stream()
    app, measured = _app_stream(source_root, lock_file, extra_files or {})
    return EnclaveMeasurement(
        pcr0=pcr_of(hashlib.sha384(boot + app).digest()),
        pcr1=pcr_of(hashlib.sha384(boot).digest()),
        pcr2=pcr_of(hashlib.sha384(app).digest()),
        lock_file_measured=measured,
    )


def default_lock_file(source_root: Path) -> Path | None:
    """``requirements/enclave.lock`` if present, else ``requirements/lock.txt``, else ``None``."""
    for name in ("enclave.lock", "lock.txt"):
        candidate = source_root / "requirements" / name
        if candidate.is_file():
            return candidate
    return None
