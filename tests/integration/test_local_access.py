"""Access control, quotas, receipts and the audit log through the local stack's real processes.

The stack (``conftest.py``, shared with ``test_local_stack.py``) bakes its local issuer's JWKS, issuer and
audience into the measured enclave config. Every refusal must reach the caller as a bare status code and
the enclave's audit log (stored by the parent) must name the reason; receipts and the audit log must verify
with the CLI against a document fetched with ``Attest``, and fail when a response or a record is altered.
The last test stops the enclave (SIGTERM: final checkpoint), so it runs last and waits for the restart.
"""

from __future__ import annotations

import json
import os
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from fakes import wait_until
from typer.testing import CliRunner

from nitrovault.cli import app
from nitrovault.clock import utc_now
from nitrovault.errors import ClientError
from nitrovault.local.nsm import LocalNsmDevice
from nitrovault.local.pki import LocalPki
from nitrovault.local.stack import LocalStack
from nitrovault.nsm import Nsm
from nitrovault.owner.issuer import TokenIssuer
from nitrovault.receipts import enclave_user_data
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2 as pb
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
runner = CliRunner()


def _issuer(stack: LocalStack, *, issuer: str | None = None, audience: str | None = None,
            at: datetime | None = None, new_key: bool = False) -> TokenIssuer:
    meta = json.loads((stack.paths.issuer / "issuer.json").read_text())
    key = (ed25519.Ed25519PrivateKey.generate() if new_key else
           serialization.load_pem_private_key((stack.paths.issuer / "issuer.key").read_bytes(), None))
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    kid = "not-a-baked-kid" if new_key else meta["kid"]
    return TokenIssuer(key, kid, issuer or meta["issuer"], audience or meta["audience"],
                       clock=(lambda: at) if at is not None else utc_now)


def _forged(token: str) -> str:
    head, body, sig = token.split(".")
    flipped = "A" if sig[10] != "A" else "B"
    return f"{head}.{body}.{sig[:10]}{flipped}{sig[11:]}"


def _audit_entries(stack: LocalStack) -> list[dict[str, object]]:
    folder = stack.current_audit_dir()
    assert folder is not None
    files = sorted(folder.glob("audit-*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def test_bad_tokens_are_unauthenticated_and_audited_with_their_reason(stack: LocalStack) -> None:
    now = datetime.now(UTC)
    scopes = ["embed:*"]
    bad = {
        "bad-signature": _forged(stack.token("mallory")),
        "expired": _issuer(stack, at=now - timedelta(hours=2)).issue("old", scopes, 60),
        "not-yet-valid": _issuer(stack, at=now + timedelta(hours=1)).issue("future", scopes, 3600),
        "wrong-audience": _issuer(stack, audience="someone-else").issue("aud", scopes, 600),
        "wrong-issuer": _issuer(stack, issuer="https://evil.example").issue("iss", scopes, 600),
        "unknown-kid": _issuer(stack, new_key=True).issue("kid", scopes, 600),
    }
    for reason, token in bad.items():
        with stack.client(token, timeout=30) as client, \
                pytest.raises(ClientError) as refused:
            client.embed(["who am I?"])
        assert (refused.value.code, refused.value.details) == ("UNAUTHENTICATED", "invalid token"), reason
    with stack.client(timeout=30) as anonymous, pytest.raises(ClientError) as missing:
        anonymous.info()
    assert missing.value.code == "UNAUTHENTICATED"
    def reasons() -> set[object]:
        return {e["body"].get("reason") for e in _audit_entries(stack)}  # type: ignore[union-attr]

    wait_until(lambda: {"missing-token", *bad} <= reasons(), what="the refusals in the audit log")
    records = [e["body"] for e in _audit_entries(stack) if e["kind"] == "record"]
    assert all("texts" not in json.dumps(r) and "who am I" not in json.dumps(r) for r in records)


def test_a_scope_violation_is_permission_denied(stack: LocalStack) -> None:
    with stack.client(stack.token("infer-only", ("infer:*",)), timeout=30) as client:
        with pytest.raises(ClientError) as denied:
            client.embed(["not allowed"])
        assert (denied.value.code, denied.value.details) == ("PERMISSION_DENIED", "permission denied")
        assert client.info().model_id == "all-minilm-l6-v2"  # any valid token may call Info


def test_quota_exhaustion_gives_retry_after_then_refills(stack: LocalStack) -> None:
    token = stack.token("tiny-user", tier="test-tiny")  # burst 1, 2 calls per second
    metadata = (("authorization", f"Bearer {token}"),)
    with stack.channel() as channel:
        stub = pb_grpc.InferenceStub(channel)
        assert stub.Embed(pb.EmbedRequest(texts=["one"]), metadata=metadata, timeout=30).receipt.payload
        with pytest.raises(grpc.RpcError) as exhausted:
            stub.Embed(pb.EmbedRequest(texts=["two"]), metadata=metadata, timeout=30)
        assert exhausted.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert exhausted.value.details() == "quota exceeded"
        assert dict(exhausted.value.trailing_metadata())["retry-after"] == "1"

        def refilled() -> pb.EmbedResponse | None:
            """The call once the bucket has a token again (real time must pass: the stack's own clock)."""
            try:
                return stub.Embed(pb.EmbedRequest(texts=["three"]), metadata=metadata, timeout=30)
            except grpc.RpcError as still:
                assert still.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert still.details() == "quota exceeded"
                return None  # a refused call takes no token: retrying does not delay the refill

        assert wait_until(refilled, what="the tiny tier's bucket to refill", interval=0.05).embeddings.shape
    with stack.client(stack.token("other-user"), timeout=30) as other:
        assert other.embed(["others are not affected"]).shape == (1, 384)


def test_receipts_verify_offline_and_fail_for_altered_responses_and_other_keys(
    stack: LocalStack, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(stack.token("receipt-user", ("embed:all-minilm-l6-v2",)))
    receipt, response, doc = tmp_path / "receipt.cbor", tmp_path / "response.bin", tmp_path / "doc.cose"
    root = str(stack.paths.pki / "root.pem")
    trust = ["--target", stack.listen, "--pcr-manifest", str(stack.paths.pcr_manifest), "--root", root]
    request = tmp_path / "request.bin"
    called = runner.invoke(app, ["embed", "A man is eating food.", *trust, "--token-file", str(token_file),
                                 "--save-receipt", str(receipt), "--save-response", str(response),
                                 "--save-request", str(request)])
    assert called.exit_code == 0, called.output
    fetched = runner.invoke(app, ["attest", "fetch", *trust, "-o", str(doc)])  # no token needed
    assert fetched.exit_code == 0, fetched.output
    verify = ["receipt", "verify", str(receipt), "--attestation", str(doc), "--root", root]
    ok = runner.invoke(app, [*verify, "--response", str(response), "--request", str(request), "--json"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout)
    assert (summary["subject"], summary["method"]) == ("receipt-user", "Embed")
    assert summary["response_checked"] is True
    assert summary["request_checked"] is True
    assert summary["pcr0"] == stack.pcrs[0].hex()

    altered = tmp_path / "altered.bin"
    data = bytearray(response.read_bytes())
    data[-1] ^= 0x01
    altered.write_bytes(bytes(data))
    bad = runner.invoke(app, [*verify, "--response", str(altered)])
    assert bad.exit_code == 1
    assert "invalid: response" in bad.stderr

    other_key = ed25519.Ed25519PrivateKey.generate().public_key()
    other_nsm = Nsm(LocalNsmDevice(LocalPki.ensure(stack.paths.pki), pcrs=stack.pcrs))
    other_doc = tmp_path / "other.cose"
    other_doc.write_bytes(other_nsm.attestation(user_data=enclave_user_data(other_key)))
    other = runner.invoke(app, ["receipt", "verify", str(receipt), "--attestation", str(other_doc),
                                "--root", root, "--response", str(response)])
    assert other.exit_code == 1
    assert "invalid: other-key" in other.stderr


def test_the_parents_audit_log_verifies_and_tampering_is_found(stack: LocalStack, tmp_path: Path) -> None:
    token = stack.token("auditor")
    with stack.client(token, timeout=30) as client:
        for i in range(12):  # past a checkpoint (every 10 records locally)
            client.embed([f"audited call {i}"])
        doc = tmp_path / "doc.cose"
        doc.write_bytes(client.attest())
    folder = stack.current_audit_dir()
    assert folder is not None
    pids = stack.enclave_pids()
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGTERM)  # graceful: the enclave writes its final checkpoint
    files = lambda: sorted(folder.glob("audit-*.jsonl"))  # noqa: E731
    wait_until(lambda: '"final":true' in files()[-1].read_text().splitlines()[-1],
               what="the final checkpoint")

    root = str(stack.paths.pki / "root.pem")
    verify = ["audit", "verify", "--attestation", str(doc), "--root", root]
    ok = runner.invoke(app, [*verify, *map(str, files())])
    assert ok.exit_code == 0, ok.output
    assert "intact:" in ok.stdout

    lines = [line for f in files() for line in f.read_text().splitlines(keepends=True)]
    record_at = next(i for i, line in enumerate(lines) if '"subject":"auditor"' in line)
    edited = list(lines)
    edited[record_at] = edited[record_at].replace('"subject":"auditor"', '"subject":"someone"')
    dropped = lines[:record_at] + lines[record_at + 1:]
    reordered = list(lines)
    reordered[record_at], reordered[record_at + 1] = reordered[record_at + 1], reordered[record_at]
    for name, content, says in (("edited", edited, "modified"), ("dropped", dropped, "missing entries"),
                                ("reordered", reordered, "")):
        tampered = tmp_path / f"{name}.jsonl"
        tampered.write_text("".join(content))
        result = runner.invoke(app, [*verify, str(tampered)])
        assert result.exit_code == 1, name
        assert f"tampered: {tampered}:{record_at + 1}: " in result.stderr, (name, result.stderr)
        assert says in result.stderr

    # the supervisor restarts the enclave: the stack serves again (the other modules need it)
    def serving() -> bool:
        try:
            with stack.client(token, timeout=10) as c:
                return c.embed(["back"]).shape == (1, 384)
        except ClientError:
            return False

    wait_until(serving, what="the enclave to serve again", timeout=90, interval=0.2)
    # a new boot has a new audit folder; its first lines reach the parent after the call that made them
    wait_until(lambda: stack.current_audit_dir() != folder, what="the new boot's audit folder")
