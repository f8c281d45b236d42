"""The CDK app's PCR manifest door: the shared format (``nitrovault.policy.manifest``, written by the image
build) plus the debug-PCR refusal; every refusal has its own test; the sample manifest is accepted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from infra.pcr_manifest import load_pcr_manifest, parse_pcr_manifest
from nitrovault.errors import ConfigError
from nitrovault.policy import manifest as shared

SAMPLE = Path(__file__).with_name("pcr-manifest.sample.json")


def _doc(**pcrs: str) -> dict[str, object]:
    base = {"0": "aa" * 48, "1": "bb" * 48, "2": "cc" * 48}
    base.update(pcrs)
    return {"pcrs": {k: v for k, v in base.items() if v}}


def test_sample_manifest_is_read() -> None:
    manifest = load_pcr_manifest(SAMPLE)
    raw = json.loads(SAMPLE.read_text())
    assert sorted(manifest.pcrs) == [0, 1, 2, 8]
    assert manifest.pcrs[2].hex() == raw["pcrs"]["2"]
    assert manifest.image_digest == raw["image_digest"]
    assert manifest.source_commit == raw["source_commit"]
    assert manifest.built_at == raw["built_at"] and manifest.eif_sha384 == raw["eif_sha384"]
    assert not manifest.is_debug


def test_one_format_the_sample_is_what_the_image_build_writes() -> None:
    # the infra door returns the shared type, and the fixture is byte for byte what PcrManifest.dumps()
    # (used by scripts/pcr_manifest.py) writes: there is no second manifest format
    manifest = load_pcr_manifest(SAMPLE)
    assert isinstance(manifest, shared.PcrManifest)
    assert manifest.dumps() == SAMPLE.read_text()
    assert manifest == shared.load_manifest(SAMPLE)


def test_old_infra_only_build_time_key_is_refused() -> None:
    # the old infra reader took "build_time"; the shared format says "built_at"
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_pcr_manifest({**_doc(), "build_time": "2025-01-01T00:00:00Z"})


def test_upper_case_hex_is_refused() -> None:
    # the same string goes into key policies verbatim; nitro-cli prints lower case
    with pytest.raises(ConfigError, match="lower-case hex"):
        parse_pcr_manifest(_doc(**{"0": "AB" * 48}))
    assert parse_pcr_manifest(_doc(**{"0": "ab" * 48})).pcrs[0] == bytes([0xAB]) * 48


def test_debug_pcrs_are_refused() -> None:
    debug = _doc(**{"0": "00" * 48, "1": "00" * 48, "2": "00" * 48})
    with pytest.raises(ConfigError, match="debug-mode"):
        parse_pcr_manifest(debug)
    # the shared reader loads it (the reviewer must be able to report it); only binding refuses
    assert shared.parse_manifest(debug).debug_pcrs == (0, 1, 2)


def test_one_zero_pcr8_is_refused_too() -> None:
    with pytest.raises(ConfigError, match="debug-mode"):
        parse_pcr_manifest(_doc(**{"8": "00" * 48}))


def test_zero_pcr3_is_not_debug() -> None:
    # PCR3/PCR4 are not zeroed in debug mode; a zero there is odd but not the debug signature.
    assert not parse_pcr_manifest(_doc(**{"3": "00" * 48})).is_debug


def test_unsafe_flag_allows_debug_pcrs_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        manifest = parse_pcr_manifest(_doc(**{"0": "00" * 48}), unsafe_allow_debug_pcrs=True)
    assert manifest.is_debug
    assert any("UNSAFE" in r.getMessage() for r in caplog.records)


def test_missing_pcr2_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"missing \[2\]"):
        parse_pcr_manifest(_doc(**{"2": ""}))


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        (_doc(**{"5": "dd" * 48}), "unexpected PCR"),
        (_doc(**{"1": "bb" * 47}), "96 lower-case hex"),
        (_doc(**{"1": "zz" * 48}), "96 lower-case hex"),
        ({**_doc(), "built_at": "yesterday"}, "ISO 8601"),
        ({**_doc(), "built_at": "2025-01-01T00:00:00"}, "UTC offset"),
        ({"pcr": _doc()["pcrs"]}, "unknown keys"),
        ({"pcrs": ["aa" * 48]}, "must be an object"),
        ({**_doc(), "image_digest": 3}, "image_digest"),
        ([], "JSON object"),
    ],
    ids=[
        "pcr5", "short", "not-hex", "bad-time", "naive-time", "typo-key", "list", "digest-type", "not-object"
    ],
)
def test_malformed_manifests_are_refused(doc: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_pcr_manifest(doc)  # type: ignore[arg-type]


def test_unreadable_and_invalid_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_pcr_manifest(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_pcr_manifest(bad)
