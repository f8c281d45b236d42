"""The PCR manifest the enclave image build writes (``pcr-manifest.json``). Pure but ``load_manifest``.

The manifest is how a reviewed image's measurements travel to the key policy (the CDK app binds them)
and to the policy reviewer (which compares the policy's bound PCRs with them). Format::

    {"pcrs": {"0": "<96 hex>", "1": "<96 hex>", "2": "<96 hex>", "8": "<96 hex>"},   # 3, 4, 8 optional
     "image_digest": "sha256:<64 hex>",      # the docker image the EIF was built from
     "source_commit": "<git sha>",           # the commit of the enclave source
     "built_at": "2025-01-31T12:00:00Z",     # UTC build time
     "eif_sha384": "<96 hex>"}               # SHA-384 of the .eif file itself

Invariants:

* ``pcrs`` holds PCR0, PCR1 and PCR2, optionally PCR3, PCR4 and PCR8, nothing else; every value is exactly
  48 bytes, written as 96 lower-case hex digits (what ``nitro-cli`` prints and KMS compares). Upper case,
  a ``0x`` prefix or a wrong length is refused: the same string goes into key policies verbatim.
* Unknown top-level keys are refused (a typo such as ``"pcr"`` must not silently drop measurements).
* All-zero PCR0/1/2/8 are a debug-mode enclave (anyone can run one with any code). The manifest still
  loads, because the reviewer must be able to *say* so, but :attr:`PcrManifest.debug_pcrs` names them and
  every consumer that binds a key must refuse them (``model_key_policy`` does).
* :meth:`PcrManifest.signer_pcrs` is the image's *signer set* (``model_key_policy(signer_sets=...)``):
  PCR8, and PCR3 when the manifest records it, never PCR4. PCR3 (the parent's IAM role) is the same on
  every host of the group, so binding it keeps a signer set from working beside another role; PCR4 (the
  instance id) differs per host, so a set binding it would match one instance only. An unsigned image
  (no PCR8, or PCR8 all zeros) has no signer set.

Example::

    >>> m = parse_manifest({"pcrs": {"0": "11" * 48, "1": "22" * 48, "2": "33" * 48}})
    >>> sorted(m.pcrs), m.is_debug, m.pcr_hex(0)[:4]
    ([0, 1, 2], False, '1111')
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from nitrovault.errors import ConfigError

__all__ = [
    "DEBUG_ZERO_PCRS",
    "OPTIONAL_PCRS",
    "REQUIRED_PCRS",
    "PcrManifest",
    "load_manifest",
    "parse_manifest",
]

REQUIRED_PCRS = (0, 1, 2)
OPTIONAL_PCRS = (3, 4, 8)
#: PCRs that are all zeros in a debug-mode enclave (PCR3/PCR4 stay set in debug mode: AWS,
#: "Cryptographic attestation").
DEBUG_ZERO_PCRS = (0, 1, 2, 8)
PCR_LEN = 48

_KEYS = frozenset({"pcrs", "image_digest", "source_commit", "built_at", "eif_sha384"})
_HEX96 = re.compile(r"[0-9a-f]{96}")
_IMAGE_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{7,64}")


def _empty_pcrs() -> Mapping[int, bytes]:
    return MappingProxyType({})


@dataclass(frozen=True)
class PcrManifest:
    """A validated manifest. Build one with :func:`parse_manifest` (or directly, then :meth:`validate`)."""

    #: PCR index -> 48-byte value (read-only); always 0, 1 and 2, optionally 3, 4 and 8
    pcrs: Mapping[int, bytes] = field(default_factory=_empty_pcrs)
    #: ``sha256:<hex>`` of the docker image the EIF was built from, when recorded
    image_digest: str | None = None
    #: git commit (hex) of the enclave source, when recorded
    source_commit: str | None = None
    #: ISO 8601 build time with a UTC offset, when recorded
    built_at: str | None = None
    #: SHA-384 (hex) of the ``.eif`` file, when recorded
    eif_sha384: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "pcrs", MappingProxyType(dict(sorted(self.pcrs.items()))))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` unless every field satisfies the module invariants."""
        for index, value in self.pcrs.items():
            if index not in REQUIRED_PCRS + OPTIONAL_PCRS:
                raise ConfigError(f"PCR manifest: unexpected PCR{index} (allowed: 0, 1, 2, 3, 4, 8)")
            if not isinstance(value, bytes) or len(value) != PCR_LEN:
                raise ConfigError(f"PCR manifest: PCR{index} must be {PCR_LEN} bytes")
        missing = [i for i in REQUIRED_PCRS if i not in self.pcrs]
        if missing:
            raise ConfigError(f"PCR manifest: PCR0, PCR1 and PCR2 are required (missing {missing})")
        if self.image_digest is not None and not _IMAGE_DIGEST.fullmatch(self.image_digest):
            raise ConfigError("PCR manifest: image_digest must be 'sha256:' and 64 lower-case hex digits")
        if self.source_commit is not None and not _COMMIT.fullmatch(self.source_commit):
            raise ConfigError("PCR manifest: source_commit must be a lower-case hex git commit")
        if self.eif_sha384 is not None and not _HEX96.fullmatch(self.eif_sha384):
            raise ConfigError("PCR manifest: eif_sha384 must be 96 lower-case hex digits")
        if self.built_at is not None:
            try:
                when = datetime.fromisoformat(self.built_at.replace("Z", "+00:00"))
            except ValueError as exc:
                raise ConfigError("PCR manifest: built_at must be an ISO 8601 time") from exc
            if when.tzinfo is None:
                raise ConfigError("PCR manifest: built_at must carry a UTC offset (e.g. ...Z)")

    @property
    def debug_pcrs(self) -> tuple[int, ...]:
        """The PCRs among 0/1/2/8 that are all zeros (non-empty means a debug-mode enclave)."""
        return tuple(i for i in DEBUG_ZERO_PCRS if i in self.pcrs and not any(self.pcrs[i]))

    @property
    def is_debug(self) -> bool:
        return bool(self.debug_pcrs)

    @property
    def is_signed(self) -> bool:
        """Whether the image was signed: PCR8 (the signing certificate's hash) is recorded and not zero."""
        return 8 in self.pcrs and any(self.pcrs[8])

    def signer_pcrs(self) -> dict[int, bytes]:
        """The signer set: PCR8 and, when recorded, PCR3 (see the module docstring). :class:`ConfigError`
        for an unsigned image."""
        if not self.is_signed:
            raise ConfigError(
                "PCR manifest: the image is not signed (no PCR8, or PCR8 all zeros), so it has no signer "
                "set; build it with --signing-certificate and --private-key"
            )
        return {i: self.pcrs[i] for i in (3, 8) if i in self.pcrs}

    def pcr_hex(self, index: int) -> str:
        """The PCR as the lower-case hex string a key policy carries."""
        return self.pcrs[index].hex()

    def to_json_dict(self) -> dict[str, Any]:
        """The manifest as JSON-ready data (None fields omitted); ``parse_manifest`` round-trips it."""
        out: dict[str, Any] = {"pcrs": {str(i): v.hex() for i, v in self.pcrs.items()}}
        for name in ("image_digest", "source_commit", "built_at", "eif_sha384"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json_dict(), indent=2, sort_keys=True) + "\n"


def _optional_str(doc: Mapping[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"PCR manifest: {key!r} must be a non-empty string")
    return value


def parse_manifest(doc: Mapping[str, Any] | str | bytes) -> PcrManifest:
    """Validate a manifest (parsed JSON or JSON text); :class:`ConfigError` on any problem."""
    if isinstance(doc, str | bytes):
        try:
            doc = json.loads(doc)
        except (ValueError, RecursionError) as exc:
            raise ConfigError("PCR manifest is not valid JSON") from exc
    if not isinstance(doc, Mapping):
        raise ConfigError("PCR manifest must be a JSON object")
    unknown = sorted(map(str, set(doc) - _KEYS))
    if unknown:
        raise ConfigError(f"PCR manifest: unknown keys {unknown}")
    raw = doc.get("pcrs")
    if not isinstance(raw, Mapping):
        raise ConfigError('PCR manifest: "pcrs" must be an object of "index": "hex"')
    pcrs: dict[int, bytes] = {}
    for key, value in raw.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) in REQUIRED_PCRS + OPTIONAL_PCRS):
            raise ConfigError(f"PCR manifest: unexpected PCR {key!r} (allowed: 0, 1, 2, 3, 4, 8)")
        if not isinstance(value, str) or not _HEX96.fullmatch(value):
            raise ConfigError(f"PCR manifest: PCR{key} must be 96 lower-case hex digits (48 bytes)")
        pcrs[int(key)] = bytes.fromhex(value)
    return PcrManifest(
        pcrs=pcrs,
        image_digest=_optional_str(doc, "image_digest"),
        source_commit=_optional_str(doc, "source_commit"),
        built_at=_optional_str(doc, "built_at"),
        eif_sha384=_optional_str(doc, "eif_sha384"),
    )


def load_manifest(path: str | Path) -> PcrManifest:
    """Read and validate ``path``; :class:`ConfigError` when it is unreadable or invalid."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the PCR manifest {str(path)!r}: {exc.strerror}") from exc
    return parse_manifest(text)
