#!/usr/bin/env python3
"""Write ``pcr-manifest.json`` for an enclave image: the measurements a key policy binds and a reviewer
compares (format: ``nitrovault/policy/manifest.py``).

Measurements come from ``nitro-cli build-enclave``'s JSON output (``--nitro-cli-json``), from the EIF
itself measured in pure Python (``--eif``, ``nitrovault.eif``), or both, in which case they must agree
(a disagreement means the tool and our reading of the format differ: stop and find out why). Provenance
(image digest, source commit, build time) is added from the arguments; the build time is a parameter
(``--built-at``) so a reproducible build can pin it.

Usage::

    python scripts/pcr_manifest.py --eif enclave.eif --nitro-cli-json build.json \\
        --image-digest sha256:... --source-commit "$(git rev-parse HEAD)" -o pcr-manifest.json

Exit codes: 0 written, 1 the sources disagree, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from nitrovault.eif import EifMeasurements, eif_pcrs  # noqa: E402
from nitrovault.errors import ConfigError, NitrovaultError  # noqa: E402
from nitrovault.policy.manifest import PcrManifest  # noqa: E402

_PCR_NAME = re.compile(r"PCR(\d+)")


class DisagreementError(ConfigError):
    """nitro-cli and the pure-Python EIF reader measured different PCRs."""


def pcrs_from_nitro_cli(doc: Mapping[str, Any]) -> dict[int, bytes]:
    """``{"Measurements": {"HashAlgorithm": ..., "PCR0": hex, ...}}`` -> {index: bytes}."""
    measurements = doc.get("Measurements")
    if not isinstance(measurements, Mapping):
        raise ConfigError('nitro-cli output has no "Measurements" object')
    pcrs: dict[int, bytes] = {}
    for name, value in measurements.items():
        match = _PCR_NAME.fullmatch(str(name))
        if not match:
            continue  # HashAlgorithm
        if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{96}", value):
            raise ConfigError(f"nitro-cli output: {name} is not 96 hex digits")
        pcrs[int(match.group(1))] = bytes.fromhex(value)
    return pcrs


def build_manifest(
    *,
    nitro_cli: Mapping[str, Any] | None,
    eif: EifMeasurements | None,
    image_digest: str | None,
    source_commit: str | None,
    built_at: datetime,
) -> PcrManifest:
    """The manifest from one or both measurement sources; :class:`DisagreementError` if they differ."""
    if nitro_cli is None and eif is None:
        raise ConfigError("give --nitro-cli-json, --eif, or both")
    from_cli = pcrs_from_nitro_cli(nitro_cli) if nitro_cli is not None else None
    from_eif = dict(eif.pcrs) if eif is not None else None
    if from_cli is not None and from_eif is not None and from_cli != from_eif:
        differ = sorted(i for i in set(from_cli) | set(from_eif) if from_cli.get(i) != from_eif.get(i))
        raise DisagreementError(f"nitro-cli and the EIF reader disagree on PCR {differ}")
    pcrs = from_cli if from_cli is not None else from_eif
    assert pcrs is not None
    if built_at.tzinfo is None:
        raise ConfigError("--built-at needs a UTC offset")
    return PcrManifest(
        pcrs=pcrs,
        image_digest=image_digest,
        source_commit=source_commit,
        built_at=built_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        eif_sha384=eif.file_sha384.hex() if eif is not None else None,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nitro-cli-json", type=Path, help="stdout of nitro-cli build-enclave")
    parser.add_argument("--eif", type=Path, help="the .eif to measure in pure Python")
    parser.add_argument("--image-digest", help="sha256:... of the docker image")
    parser.add_argument("--source-commit", help="git commit of the enclave source")
    parser.add_argument("--built-at", help="ISO 8601 build time (default: now, UTC)")
    parser.add_argument("-o", "--output", type=Path, default=Path("pcr-manifest.json"))
    args = parser.parse_args(argv)
    try:
        cli_doc = None
        if args.nitro_cli_json is not None:
            try:
                cli_doc = json.loads(args.nitro_cli_json.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read nitro-cli output {str(args.nitro_cli_json)!r}") from exc
        eif = eif_pcrs(args.eif) if args.eif is not None else None
        built_at = (
            datetime.fromisoformat(args.built_at.replace("Z", "+00:00"))
            if args.built_at
            else datetime.now(UTC)
        )
        manifest = build_manifest(
            nitro_cli=cli_doc,
            eif=eif,
            image_digest=args.image_digest or None,
            source_commit=args.source_commit or None,
            built_at=built_at,
        )
    except DisagreementError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (NitrovaultError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.output.write_text(manifest.dumps())
    if manifest.is_debug:
        print("WARNING: all-zero PCRs: a debug-mode image must never be bound to a key", file=sys.stderr)
    print(f"wrote {args.output}: " + ", ".join(f"PCR{i}={v.hex()[:16]}..." for i, v in manifest.pcrs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
