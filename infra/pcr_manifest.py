"""The CDK app's door for the PCR manifest: the shared reader plus the debug-PCR refusal.

There is one manifest format and one reader, :mod:`nitrovault.policy.manifest` (the image build's
``scripts/pcr_manifest.py`` writes it, the reviewer reads it, and so does this app)::

    {"pcrs": {"0": "<96 hex>", "1": "<96 hex>", "2": "<96 hex>", "8": "<96 hex>"},
     "image_digest": "sha256:<64 hex>", "source_commit": "<git sha>",
     "built_at": "2025-01-31T12:00:00Z", "eif_sha384": "<96 hex>"}

This module adds only what binding a key needs on top of reading: all-zero PCR0/1/2/8 (a debug-mode
enclave, which anyone can run with any code) are refused unless ``unsafe_allow_debug_pcrs=True`` (the
``unsafeAllowDebugPcrs`` context flag), which logs a warning on every use. The reviewer, by contrast,
loads such a manifest so that it can *report* it.

Several manifests (an image rollout: the current and the next image) are read with
:func:`load_pcr_manifests`, which also refuses two manifests with the same PCRs (the same image twice would
be a duplicate release statement, and usually means the wrong file was passed).

Example::

    >>> m = parse_pcr_manifest({"pcrs": {"0": "11" * 48, "1": "22" * 48, "2": "33" * 48}})
    >>> sorted(m.pcrs), m.pcrs[0][:2]
    ([0, 1, 2], b'\\x11\\x11')
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nitrovault.errors import ConfigError
from nitrovault.policy.manifest import PcrManifest, load_manifest, parse_manifest

__all__ = ["PcrManifest", "load_pcr_manifest", "load_pcr_manifests", "parse_pcr_manifest"]

log = logging.getLogger(__name__)


def _refuse_debug(manifest: PcrManifest, unsafe_allow_debug_pcrs: bool) -> PcrManifest:
    if not manifest.is_debug:
        return manifest
    names = ", ".join(f"PCR{i}" for i in manifest.debug_pcrs)
    if not unsafe_allow_debug_pcrs:
        raise ConfigError(
            f"PCR manifest has all-zero {names}: that is a debug-mode enclave, which anyone can run with "
            "any code. Refusing to bind the model key to it (-c unsafeAllowDebugPcrs=true overrides)."
        )
    log.warning(
        "UNSAFE: the PCR manifest has all-zero (debug-mode) %s and unsafeAllowDebugPcrs is set: ANY debug "
        "enclave will be able to obtain the model key. Never deploy this to production.",
        names,
    )
    return manifest


def parse_pcr_manifest(
    doc: Mapping[str, Any] | str | bytes, *, unsafe_allow_debug_pcrs: bool = False
) -> PcrManifest:
    """Validate a manifest document with the shared reader, then refuse debug PCRs (unless unsafe)."""
    return _refuse_debug(parse_manifest(doc), unsafe_allow_debug_pcrs)


def load_pcr_manifest(path: str | Path, *, unsafe_allow_debug_pcrs: bool = False) -> PcrManifest:
    """Read ``path`` with the shared reader, then refuse debug PCRs (unless unsafe); :class:`ConfigError`."""
    return _refuse_debug(load_manifest(path), unsafe_allow_debug_pcrs)


def load_pcr_manifests(
    paths: Sequence[str | Path], *, unsafe_allow_debug_pcrs: bool = False
) -> tuple[PcrManifest, ...]:
    """Each of ``paths`` with :func:`load_pcr_manifest`, in order; :class:`ConfigError` when none is given
    or two hold the same PCRs."""
    if isinstance(paths, str | Path) or not paths:
        raise ConfigError("at least one PCR manifest path is required (a list of paths)")
    manifests: list[PcrManifest] = []
    for path in paths:
        manifest = load_pcr_manifest(path, unsafe_allow_debug_pcrs=unsafe_allow_debug_pcrs)
        for earlier, seen in zip(paths, manifests, strict=False):
            if dict(seen.pcrs) == dict(manifest.pcrs):
                raise ConfigError(
                    f"PCR manifests {str(earlier)!r} and {str(path)!r} hold the same PCRs: "
                    "give each image once"
                )
        manifests.append(manifest)
    return tuple(manifests)
