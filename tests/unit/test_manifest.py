"""The PCR manifest (nitrovault.policy.manifest) and its writer (scripts/pcr_manifest.py)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import struct
import sys
import zlib
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from nitrovault.eif import eif_measurements
from nitrovault.errors import ConfigError
from nitrovault.policy.manifest import PcrManifest, load_manifest, parse_manifest

REPO = Path(__file__).resolve().parents[2]
P = {i: hashlib.sha384(f"pcr{i}".encode()).hexdigest() for i in (0, 1, 2, 3, 4, 8)}
FULL = {
    "pcrs": {"0": P[0], "1": P[1], "2": P[2], "8": P[8]},
    "image_digest": "sha256:" + "ab" * 32,
    "source_commit": "0123456789abcdef0123456789abcdef01234567",
    "built_at": "2025-01-31T12:00:00Z",
    "eif_sha384": "cd" * 48,
}


def test_full_manifest_round_trips(tmp_path: Path) -> None:
    m = parse_manifest(FULL)
    assert m.pcrs[8] == bytes.fromhex(P[8]) and m.pcr_hex(0) == P[0]
    assert (m.image_digest, m.built_at, m.is_debug) == (FULL["image_digest"], "2025-01-31T12:00:00Z", False)
    assert parse_manifest(m.dumps()) == m
    path = tmp_path / "pcr-manifest.json"
    path.write_text(m.dumps())
    assert load_manifest(path) == m
    with pytest.raises(TypeError):
        m.pcrs[0] = b"x"  # type: ignore[index]


def test_minimal_manifest_has_only_pcrs() -> None:
    m = parse_manifest({"pcrs": {"0": P[0], "1": P[1], "2": P[2]}})
    assert m.to_json_dict() == {"pcrs": {"0": P[0], "1": P[1], "2": P[2]}}


def test_debug_zeros_are_flagged_not_refused() -> None:
    m = parse_manifest({"pcrs": {"0": "00" * 48, "1": "00" * 48, "2": P[2], "3": "00" * 48}})
    assert m.debug_pcrs == (0, 1) and m.is_debug  # PCR3 zeros are no debug marker
    assert not parse_manifest({"pcrs": {"0": P[0], "1": P[1], "2": P[2], "3": "00" * 48}}).is_debug


def _with(**changes: Any) -> dict[str, Any]:
    doc = json.loads(json.dumps(FULL))
    for key, value in changes.items():
        if key.startswith("pcr"):
            doc["pcrs"][key[3:]] = value
        else:
            doc[key] = value
    return doc


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        (_with(pcr0="0x" + P[0][2:]), "PCR0"),
        (_with(pcr0=P[0].upper()), "PCR0"),
        (_with(pcr1=P[1][:-2]), "PCR1"),
        (_with(pcr5=P[0]), "unexpected PCR"),
        ({"pcrs": {"0": P[0], "1": P[1]}}, "missing"),
        ({**FULL, "pcr": {}}, "unknown keys"),
        ({"image_digest": "sha256:" + "ab" * 32}, "pcrs"),
        (_with(image_digest="ab" * 32), "image_digest"),
        (_with(source_commit="main"), "source_commit"),
        (_with(built_at="yesterday"), "built_at"),
        (_with(built_at="2025-01-31T12:00:00"), "UTC offset"),
        (_with(eif_sha384="cd" * 47), "eif_sha384"),
        ("[1]", "object"),
        ("{not json", "JSON"),
    ],
    ids=[
        "0x-prefix",
        "upper-case",
        "short",
        "pcr5",
        "no-pcr2",
        "typo-key",
        "no-pcrs",
        "digest-no-prefix",
        "commit-name",
        "bad-time",
        "naive-time",
        "eif-hash-short",
        "not-object",
        "not-json",
    ],
)
def test_invalid_manifests_are_refused(doc: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_manifest(doc)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ConfigError, match="48 bytes"):
        PcrManifest(pcrs={0: b"\x01" * 47, 1: b"\x01" * 48, 2: b"\x01" * 48})


def test_unreadable_manifest_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_manifest(tmp_path / "missing.json")


# -- scripts/pcr_manifest.py ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def writer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pcr_manifest_script", REPO / "scripts" / "pcr_manifest.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tiny_eif() -> bytes:
    sections = [(1, b"kernel"), (2, b"cmdline"), (3, b"init ramdisk"), (3, b"app ramdisk")]
    offsets, sizes, body = [], [], b""
    for kind, data in sections:
        offsets.append(548 + len(body))
        sizes.append(len(data))
        body += struct.pack(">HHQ", kind, 0, len(data)) + data
    head = (
        b".eif"
        + struct.pack(">HHQQHH", 4, 0, 1, 1, 0, 4)
        + struct.pack(">32Q", *offsets, *[0] * 28)
        + struct.pack(">32Q", *sizes, *[0] * 28)
        + struct.pack(">I", 0)
    )
    return head + struct.pack(">I", zlib.crc32(head + body)) + body


def nitro_cli_output(pcrs: dict[int, bytes]) -> dict[str, Any]:
    return {
        "Measurements": {"HashAlgorithm": "Sha384 { ... }", **{f"PCR{i}": v.hex() for i, v in pcrs.items()}}
    }


def test_manifest_from_eif_and_nitro_cli_agreeing(writer: ModuleType) -> None:
    eif = eif_measurements(io.BytesIO(tiny_eif()))
    m = writer.build_manifest(
        nitro_cli=nitro_cli_output(dict(eif.pcrs)),
        eif=eif,
        image_digest="sha256:" + "12" * 32,
        source_commit="abcdef1",
        built_at=datetime(2025, 2, 3, 4, 5, 6, tzinfo=UTC),
    )
    assert dict(m.pcrs) == dict(eif.pcrs)
    assert m.built_at == "2025-02-03T04:05:06Z"
    assert m.eif_sha384 == hashlib.sha384(tiny_eif()).hexdigest()


def test_nitro_cli_and_eif_disagreeing_is_refused(writer: ModuleType) -> None:
    eif = eif_measurements(io.BytesIO(tiny_eif()))
    other = {**eif.pcrs, 2: hashlib.sha384(b"other").digest()}
    with pytest.raises(writer.DisagreementError, match=r"\[2\]"):
        writer.build_manifest(
            nitro_cli=nitro_cli_output(other),
            eif=eif,
            image_digest=None,
            source_commit=None,
            built_at=datetime(2025, 1, 1, tzinfo=UTC),
        )


def test_script_main_writes_the_manifest_and_maps_errors(writer: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "enclave.eif").write_bytes(tiny_eif())
    out = tmp_path / "pcr-manifest.json"
    rc = writer.main(
        [
            "--eif",
            str(tmp_path / "enclave.eif"),
            "--built-at",
            "2025-01-01T00:00:00Z",
            "--source-commit",
            "abcdef1",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    m = load_manifest(out)
    assert m.source_commit == "abcdef1" and sorted(m.pcrs) == [0, 1, 2]
    eif = eif_measurements(io.BytesIO(tiny_eif()))
    (tmp_path / "build.json").write_text(json.dumps(nitro_cli_output({**eif.pcrs, 0: bytes(48)})))
    assert (
        writer.main(
            [
                "--eif",
                str(tmp_path / "enclave.eif"),
                "--nitro-cli-json",
                str(tmp_path / "build.json"),
                "-o",
                str(out),
            ]
        )
        == 1
    )
    assert writer.main(["-o", str(out)]) == 2
    (tmp_path / "bad.eif").write_bytes(b"garbage")
    assert writer.main(["--eif", str(tmp_path / "bad.eif"), "-o", str(out)]) == 2
