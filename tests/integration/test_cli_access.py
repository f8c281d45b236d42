"""``nitrovault token``, ``receipt verify`` and ``audit verify`` in process (typer CliRunner).

Exit codes: 0 ok, 1 a check failed (saying why), 2 usage error. The groups are registered on a local app
here exactly as ``nitrovault.cli`` registers them.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer
from cryptography.hazmat.primitives.asymmetric import ed25519
from typer.testing import CliRunner

from nitrovault.access.tokens import TokenVerifier
from nitrovault.audit import AuditWriter, RotatingFileSink
from nitrovault.cli import audit_cmd, receipt_cmd, token_cmd
from nitrovault.local.nsm import LocalNsmDevice
from nitrovault.local.pki import LocalPki
from nitrovault.nsm import Nsm
from nitrovault.receipts import ReceiptSigner, enclave_user_data

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
PCR0 = bytes(range(48))

app = typer.Typer(no_args_is_help=True)
app.add_typer(token_cmd.app, name="token")
app.add_typer(receipt_cmd.app, name="receipt")
app.add_typer(audit_cmd.app, name="audit")
runner = CliRunner()


@pytest.fixture(scope="module")
def enclave(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    base = tmp_path_factory.mktemp("enclave")
    pki = LocalPki.ensure(base / "pki", clock=lambda: NOW)
    key = ed25519.Ed25519PrivateKey.generate()
    device = LocalNsmDevice(pki, pcrs={0: PCR0, 1: b"\x01" * 48, 2: b"\x02" * 48}, clock=lambda: NOW)
    doc = base / "boot.cose"
    doc.write_bytes(Nsm(device).attestation(user_data=enclave_user_data(key.public_key())))
    return {"key": key, "doc": doc, "root": pki.root_path, "base": base}


def test_token_issue_verifies(tmp_path: Path) -> None:
    keys = tmp_path / "issuer"
    result = runner.invoke(app, ["token", "issue", "--subject", "alice", "--scope", "embed:m",
                                 "--scope", "info", "--ttl", "30m", "--tier", "gold",
                                 "--keys-dir", str(keys)])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    meta = json.loads((keys / "issuer.json").read_text())
    verifier = TokenVerifier(meta["issuer"], meta["audience"], json.loads((keys / "jwks.json").read_text()))
    principal = verifier.verify(token, method="Embed", model="m")
    assert principal.subject == "alice" and principal.tier == "gold"
    assert principal.scopes == frozenset({"embed:m", "info"})
    remaining = principal.expires_at - datetime.now(UTC)
    assert timedelta(minutes=29) < remaining <= timedelta(minutes=30)


def test_token_keygen_and_usage_errors(tmp_path: Path) -> None:
    result = runner.invoke(app, ["token", "keygen", "--keys-dir", str(tmp_path / "k")])
    assert result.exit_code == 0 and result.stdout.strip().endswith("jwks.json")
    bad_ttl = runner.invoke(app, ["token", "issue", "--subject", "a", "--ttl", "soon",
                                  "--keys-dir", str(tmp_path / "k")])
    assert bad_ttl.exit_code == 2
    no_subject = runner.invoke(app, ["token", "issue", "--keys-dir", str(tmp_path / "k")])
    assert no_subject.exit_code == 2


def _receipt(enclave: dict[str, object], tmp_path: Path,
             key: ed25519.Ed25519PrivateKey | None = None) -> Path:
    signing_key = key or enclave["key"]
    assert isinstance(signing_key, ed25519.Ed25519PrivateKey)
    signer = ReceiptSigner(signing_key, model_id="m", sealed_digest=b"\x05" * 32, pcr0=PCR0,
                           clock=lambda: NOW + timedelta(hours=6))
    path = tmp_path / "receipt.cbor"
    path.write_bytes(signer.sign("alice", "Embed", b"request", b"response").to_bytes())
    (tmp_path / "response.bin").write_bytes(b"response")
    (tmp_path / "request.bin").write_bytes(b"request")
    return path


def test_receipt_verify_ok(enclave: dict[str, object], tmp_path: Path) -> None:
    receipt = _receipt(enclave, tmp_path)
    args = ["receipt", "verify", str(receipt), "--attestation", str(enclave["doc"]),
            "--root", str(enclave["root"])]
    result = runner.invoke(app, [*args, "--response", str(tmp_path / "response.bin")])
    assert result.exit_code == 0, result.output
    assert "valid: receipt" in result.stdout
    as_json = runner.invoke(app, [*args, "--json"])
    summary = json.loads(as_json.stdout)
    assert summary["valid"] and summary["pcr0"] == PCR0.hex() and summary["response_checked"] is False
    b64 = tmp_path / "receipt.b64"
    b64.write_text(base64.b64encode(receipt.read_bytes()).decode())
    assert runner.invoke(app, ["receipt", "verify", str(b64), *args[3:]]).exit_code == 0


def test_receipt_verify_altered_response(enclave: dict[str, object], tmp_path: Path) -> None:
    receipt = _receipt(enclave, tmp_path)
    (tmp_path / "other.bin").write_bytes(b"responsf")
    result = runner.invoke(app, ["receipt", "verify", str(receipt), "--response", str(tmp_path / "other.bin"),
                                 "--attestation", str(enclave["doc"]), "--root", str(enclave["root"])])
    assert result.exit_code == 1
    assert "invalid: response:" in result.stderr


def test_receipt_verify_request(enclave: dict[str, object], tmp_path: Path) -> None:
    receipt = _receipt(enclave, tmp_path)
    base = ["receipt", "verify", str(receipt), "--attestation", str(enclave["doc"]),
            "--root", str(enclave["root"]), "--response", str(tmp_path / "response.bin")]
    ok = runner.invoke(app, [*base, "--request", str(tmp_path / "request.bin"), "--json"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout)
    assert summary["request_checked"] is True and summary["response_checked"] is True
    unchecked = runner.invoke(app, base)
    assert unchecked.exit_code == 0 and "request: not checked (give --request FILE)" in unchecked.stdout
    (tmp_path / "other.bin").write_bytes(b"requesu")
    result = runner.invoke(app, [*base, "--request", str(tmp_path / "other.bin")])
    assert result.exit_code == 1
    assert result.stderr.startswith("invalid: request: ")
    as_json = runner.invoke(app, [*base, "--request", str(tmp_path / "other.bin"), "--json"])
    assert json.loads(as_json.stdout) == {"valid": False, "reason": "request",
                                          "error": "request does not match the receipt's request hash"}
    missing = runner.invoke(app, [*base, "--request", str(tmp_path / "absent.bin")])
    assert missing.exit_code == 2


def test_receipt_verify_other_key_and_time(enclave: dict[str, object], tmp_path: Path) -> None:
    receipt = _receipt(enclave, tmp_path, key=ed25519.Ed25519PrivateKey.generate())
    base = ["receipt", "verify", str(receipt), "--attestation", str(enclave["doc"]),
            "--root", str(enclave["root"])]
    other = runner.invoke(app, base)
    assert other.exit_code == 1 and "invalid: other-key:" in other.stderr
    good = _receipt(enclave, tmp_path)
    late = runner.invoke(app, ["receipt", "verify", str(good), "--attestation", str(enclave["doc"]),
                               "--root", str(enclave["root"]), "--at", "2025-03-01T16:00:00Z"])
    assert late.exit_code == 1 and "invalid: attestation:" in late.stderr
    aws_root = runner.invoke(app, ["receipt", "verify", str(good), "--attestation", str(enclave["doc"])])
    assert aws_root.exit_code == 1 and "attestation" in aws_root.stderr


def test_receipt_verify_usage(enclave: dict[str, object], tmp_path: Path) -> None:
    receipt = _receipt(enclave, tmp_path)
    assert runner.invoke(app, ["receipt", "verify", str(receipt)]).exit_code == 2
    assert runner.invoke(app, ["receipt", "verify", str(tmp_path / "nope"), "--attestation",
                               str(enclave["doc"])]).exit_code == 2
    assert runner.invoke(app, ["receipt", "verify", str(receipt), "--attestation", str(enclave["doc"]),
                               "--at", "yesterday"]).exit_code == 2


def _audit_files(enclave: dict[str, object], directory: Path) -> list[Path]:
    sink = RotatingFileSink(directory, max_bytes=1200)
    key = enclave["key"]
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    writer = AuditWriter(key, sink=sink, checkpoint_every=3, clock=lambda: NOW)
    for i in range(8):
        writer.append({"subject": "alice", "method": "Embed", "decision": "ok", "receipt": f"k:{i}"})
    writer.close()
    sink.close()
    return sorted(directory.glob("audit-*.jsonl"))


def test_audit_verify(enclave: dict[str, object], tmp_path: Path) -> None:
    files = _audit_files(enclave, tmp_path / "audit")
    assert len(files) >= 2
    args = ["--attestation", str(enclave["doc"]), "--root", str(enclave["root"])]
    ok = runner.invoke(app, ["audit", "verify", *map(str, files), *args])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("intact: 8 records")

    lines = files[0].read_bytes().splitlines(keepends=True)
    del lines[1]
    files[0].write_bytes(b"".join(lines))
    tampered = runner.invoke(app, ["audit", "verify", *map(str, files), *args, "--json"])
    assert tampered.exit_code == 1
    assert f"tampered: {files[0]}:2: missing entries" in tampered.stderr
    report = json.loads(tampered.stdout)
    assert report["ok"] is False and report["first_bad"]["line"] == 2


def test_audit_verify_usage(enclave: dict[str, object]) -> None:
    assert runner.invoke(app, ["audit", "verify", "--attestation", str(enclave["doc"])]).exit_code == 2
    assert runner.invoke(app, ["audit", "verify", "/nonexistent.jsonl", "--attestation",
                               str(enclave["doc"])]).exit_code == 2
