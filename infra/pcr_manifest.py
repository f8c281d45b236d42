"""Read and validate the PCR manifest that the enclave image build writes (``pcr-manifest.json``).

The manifest is the only way measurements enter the CDK app: the model key's release statement binds
exactly the PCRs named here, so a reviewer can compare the deployed policy with the image they reviewed.

Format (JSON object)::

    {"pcrs": {"0": "<96 hex>", "1": "<96 hex>", "2": "<96 hex>", "8": "<96 hex>"},
     "image_digest": "sha256:...", "source_commit": "<git sha>", "build_time": "2025-...Z"}

Invariants:

* ``pcrs`` has PCR0, PCR1 and PCR2, optionally PCR3, PCR4 and PCR8, and nothing else; every value is
  exactly 48 bytes written as 96 hex digits (either case; stored as bytes).
* All-zero PCR0/1/2/8 (a debug-mode enclave, which anyone can run with any code) are refused unless
  ``unsafe_allow_debug_pcrs=True``, which logs a warning on every use.
* Metadata (``image_digest``, ``source_commit``, ``build_time``) is optional and kept as given, for the
  stack's description and outputs; unknown top-level keys are refused, so a typo such as ``"pcr"`` cannot
  silently drop the measurements.

Example::

    >>> m = parse_pcr_manifest({"pcrs": {"0": "11" * 48, "1": "22" * 48, "2": "33" * 48}})
    >>> sorted(m.pcrs), m.pcrs[0][:2]
    ([0, 1, 2], b'\\x11\\x11')
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from nitrovault.errors import ConfigError

log = logging.getLogger(__name__)

REQUIRED_PCRS = (0, 1, 2)
OPTIONAL_PCRS = (3, 4, 8)
#: PCRs that are all zeros in a debug-mode enclave (PCR3/PCR4 stay set in debug mode).
DEBUG_ZERO_PCRS = (0, 1, 2, 8)
_TOP_LEVEL_KEYS = frozenset({"pcrs", "image_digest", "source_commit", "build_time", "eif", "signed"})
_HEX96 = re.compile(r"[0-9a-fA-F]{96}")


@dataclass(frozen=True)
class PcrManifest:
    """A validated manifest. ``pcrs`` maps the PCR index to its 48-byte value (read-only)."""

    #: PCR index -> 48 bytes; always 0, 1 and 2, optionally 3, 4 and 8
    pcrs: Mapping[int, bytes]
    #: the container image digest the EIF was built from, if the build recorded it
    image_digest: str | None = None
    #: the git commit of the enclave source, if the build recorded it
    source_commit: str | None = None
    #: ISO 8601 build time, if the build recorded it
    build_time: str | None = None

    @property
    def is_debug(self) -> bool:
        """True when any of PCR0/1/2/8 is all zeros (a debug-mode enclave)."""
        return any(not any(self.pcrs[i]) for i in DEBUG_ZERO_PCRS if i in self.pcrs)


def _optional_str(doc: Mapping[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"PCR manifest: {key!r} must be a non-empty string")
    return value


def parse_pcr_manifest(
    doc: Mapping[str, Any] | str | bytes, *, unsafe_allow_debug_pcrs: bool = False
) -> PcrManifest:
    """Validate a manifest document (parsed JSON or JSON text); :class:`ConfigError` on any problem."""
    if isinstance(doc, str | bytes):
        try:
            doc = json.loads(doc)
        except ValueError as exc:
            raise ConfigError("PCR manifest is not valid JSON") from exc
    if not isinstance(doc, Mapping):
        raise ConfigError("PCR manifest must be a JSON object")
    unknown = sorted(set(doc) - _TOP_LEVEL_KEYS)
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
            raise ConfigError(f"PCR manifest: PCR{key} must be 96 hex digits (48 bytes)")
        pcrs[int(key)] = bytes.fromhex(value)
    missing = [i for i in REQUIRED_PCRS if i not in pcrs]
    if missing:
        raise ConfigError(f"PCR manifest: PCR0, PCR1 and PCR2 are required (missing {missing})")
    manifest = PcrManifest(
        pcrs=MappingProxyType(dict(sorted(pcrs.items()))),
        image_digest=_optional_str(doc, "image_digest"),
        source_commit=_optional_str(doc, "source_commit"),
        build_time=_optional_str(doc, "build_time"),
    )
    if manifest.is_debug:
        if not unsafe_allow_debug_pcrs:
            raise ConfigError(
                "PCR manifest has all-zero PCRs: that is a debug-mode enclave, which anyone can run with "
                "any code. Refusing to bind the model key to it (-c unsafeAllowDebugPcrs=true overrides)."
            )
        log.warning(
            "UNSAFE: the PCR manifest has all-zero (debug-mode) PCRs and unsafeAllowDebugPcrs is set: "
            "ANY debug enclave will be able to obtain the model key. Never deploy this to production."
        )
    return manifest


def load_pcr_manifest(path: str | Path, *, unsafe_allow_debug_pcrs: bool = False) -> PcrManifest:
    """Read and validate ``path``; :class:`ConfigError` when it is unreadable or invalid."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the PCR manifest {str(path)!r}: {exc.strerror}") from exc
    return parse_pcr_manifest(text, unsafe_allow_debug_pcrs=unsafe_allow_debug_pcrs)
