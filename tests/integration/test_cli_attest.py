"""``nitrovault attest verify`` in process (typer CliRunner) against real vectors and forged documents.

The contract other tooling relies on: exit 0 valid, 1 invalid (``invalid: <step>: ...`` on stderr),
2 usage error; ``--json`` prints module_id, timestamp, every PCR, debug, user_data, nonce, public_key.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from forge import forge, make_pki
from typer.testing import CliRunner

from nitrovault.cli import app

runner = CliRunner()

NITRO = "blocky-nitrite_2024-09-07_nitro.b64"
DEBUG = "evervault_2022-10-12_debug.cose"


def _vector(nitro_vectors: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(v for v in nitro_vectors if v["file"] == name)


def _at(vector: dict[str, Any]) -> str:
    return str(vector["suggested_verify_time_utc"])


def _run(*args: str) -> Any:
    return runner.invoke(app, ["attest", "verify", *args])


def test_valid_base64_vector_exits_0(nitro_vectors: list[dict[str, Any]], nitro_vectors_dir: Path) -> None:
    vector = _vector(nitro_vectors, NITRO)
    result = _run(str(nitro_vectors_dir / NITRO), "--at", _at(vector))
    assert result.exit_code == 0, result.output
    assert vector["module_id"] in result.stdout
    assert "PCR0: " + vector["pcrs"]["0"] in result.stdout
    assert "PCR3:" not in result.stdout  # all-zero PCRs are counted, not listed
    assert "12 all-zero PCRs" in result.stdout


def test_json_shape(nitro_vectors: list[dict[str, Any]], nitro_vectors_dir: Path) -> None:
    vector = _vector(nitro_vectors, "evervault_2022-10-13_pcr8-signed.cose")
    result = _run(str(nitro_vectors_dir / vector["file"]), "--at", _at(vector), "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["module_id"] == vector["module_id"]
    assert datetime.fromisoformat(out["timestamp"]) == datetime.fromisoformat(vector["timestamp_utc"])
    assert out["pcrs"] == vector["pcrs"] and len(out["pcrs"]) == 16
    assert out["debug"] is False
    assert out["user_data"] is None and out["public_key"] is None  # CBOR null -> JSON null
    assert out["nonce"] == vector["nonce"]
    assert out["valid"] is True


def test_raw_cbor_file_and_expectations(nitro_vectors: list[dict[str, Any]], tmp_path: Path) -> None:
    vector = _vector(nitro_vectors, NITRO)
    path = tmp_path / "doc.cose"
    path.write_bytes(vector["cose"])
    args = [
        str(path),
        "--at",
        _at(vector),
        "--expect-pcr",
        f"0={vector['pcrs']['0']}",
        "--expect-pcr",
        f"2={vector['pcrs']['2']}",
        "--nonce",
        vector["nonce"],
    ]
    result = _run(*args)
    assert result.exit_code == 0, result.output


def test_wrong_pcr_exits_1_naming_the_step(
    nitro_vectors: list[dict[str, Any]], nitro_vectors_dir: Path
) -> None:
    vector = _vector(nitro_vectors, NITRO)
    result = _run(str(nitro_vectors_dir / NITRO), "--at", _at(vector), "--expect-pcr", "0=" + "ab" * 48)
    assert result.exit_code == 1
    assert result.stderr.startswith("invalid: pcr: PCR0 does not match")


def test_wrong_nonce_exits_1(nitro_vectors: list[dict[str, Any]], nitro_vectors_dir: Path) -> None:
    vector = _vector(nitro_vectors, NITRO)
    result = _run(str(nitro_vectors_dir / NITRO), "--at", _at(vector), "--nonce", "00")
    assert result.exit_code == 1
    assert result.stderr.startswith("invalid: nonce: ")


def test_expired_exits_1(nitro_vectors: list[dict[str, Any]], nitro_vectors_dir: Path) -> None:
    result = _run(str(nitro_vectors_dir / NITRO), "--at", "2024-09-07T17:37:40Z")
    assert result.exit_code == 1
    assert result.stderr.startswith("invalid: validity: ")
    assert "hint:" in result.stderr


def test_default_time_is_now_so_recorded_documents_expire(nitro_vectors_dir: Path) -> None:
    result = _run(str(nitro_vectors_dir / NITRO))
    assert result.exit_code == 1
    assert result.stderr.startswith("invalid: validity: ")


def test_invalid_json_output(nitro_vectors_dir: Path) -> None:
    result = _run(str(nitro_vectors_dir / NITRO), "--at", "2030-01-01T00:00:00Z", "--json")
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["valid"] is False and out["step"] == "validity"
    assert "not at 2030-01-01T00:00:00+00:00" in out["error"]


def test_tampered_signature_exits_1(nitro_vectors: list[dict[str, Any]], tmp_path: Path) -> None:
    vector = _vector(nitro_vectors, NITRO)
    raw = bytearray(vector["cose"])
    raw[-1] ^= 1
    path = tmp_path / "doc.b64"
    path.write_bytes(base64.b64encode(bytes(raw)))
    result = _run(str(path), "--at", _at(vector))
    assert result.exit_code == 1
    assert result.stderr.startswith("invalid: signature: ")


def test_garbage_file_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"hello world")
    result = _run(str(path), "--at", "2024-01-01T00:00:00Z")
    assert result.exit_code == 1
    assert result.stderr.startswith("invalid: decode: ")


def test_debug_needs_allow_debug(nitro_vectors: list[dict[str, Any]], nitro_vectors_dir: Path) -> None:
    vector = _vector(nitro_vectors, DEBUG)
    path = str(nitro_vectors_dir / DEBUG)
    refused = _run(path, "--at", _at(vector))
    assert refused.exit_code == 1
    assert refused.stderr.startswith("invalid: debug-mode: ")
    allowed = _run(path, "--at", _at(vector), "--allow-debug", "--json")
    assert allowed.exit_code == 0, allowed.output
    assert json.loads(allowed.stdout)["debug"] is True
    assert "WARNING" in allowed.stderr and "DEBUG" in allowed.stderr


def test_custom_root(tmp_path: Path) -> None:
    at = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    pki = make_pki(at, prefix="cli")
    doc = tmp_path / "doc.cose"
    doc.write_bytes(forge(pki, at))
    root = tmp_path / "root.pem"
    root.write_bytes(pki.root.public_bytes(serialization.Encoding.PEM))
    assert _run(str(doc), "--at", "2025-03-01T12:00:00Z", "--root", str(root)).exit_code == 0
    # a naive --at is read as UTC
    assert _run(str(doc), "--at", "2025-03-01T12:00:00", "--root", str(root)).exit_code == 0
    pinned = _run(str(doc), "--at", "2025-03-01T12:00:00Z")
    assert pinned.exit_code == 1 and pinned.stderr.startswith("invalid: root: ")


@pytest.mark.parametrize(
    "args",
    [
        ["--expect-pcr", "0=abcd"],
        ["--expect-pcr", "nonsense"],
        ["--expect-pcr", "32=" + "ab" * 48],
        ["--nonce", "zz"],
        ["--at", "yesterday"],
        ["--root", "/nonexistent/root.pem"],
        ["--no-such-option"],
    ],
)
def test_usage_errors_exit_2(args: list[str], nitro_vectors_dir: Path) -> None:
    result = _run(str(nitro_vectors_dir / NITRO), "--at", "2024-09-07T14:37:39.545Z", *args)
    assert result.exit_code == 2, result.output


def test_missing_file_exits_2(tmp_path: Path) -> None:
    assert _run(str(tmp_path / "absent.cose")).exit_code == 2


def test_unreadable_root_exits_2(tmp_path: Path, nitro_vectors_dir: Path) -> None:
    bad = tmp_path / "root.pem"
    bad.write_text("not a certificate")
    result = _run(str(nitro_vectors_dir / NITRO), "--at", "2024-09-07T14:37:39.545Z", "--root", str(bad))
    assert result.exit_code == 2
