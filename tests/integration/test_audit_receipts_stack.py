"""Receipts reveal a withheld audit tail, through the local stack's real processes and the CLI.

The parent stores the enclave's audit log, so it can cut it. Cut right at a signed checkpoint, the log
used to pass ``nitrovault audit verify --live`` (a running enclave's log may end anywhere). Every receipt
now names the audit position it extends (sequence number and chain head), so a client holding receipts
issued after the cut proves that the log goes on: verification reports the cut.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import cbor2
import pytest
from typer.testing import CliRunner

from nitrovault.cli import app
from nitrovault.local.stack import LocalStack
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2 as pb
from nitrovault.rpc.gen.nitrovault.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow
runner = CliRunner()


def test_receipts_reveal_a_log_cut_at_a_checkpoint(stack: LocalStack, tmp_path: Path) -> None:
    metadata = (("authorization", f"Bearer {stack.token('receipt-holder')}"),)
    receipts = tmp_path / "receipts"
    receipts.mkdir()
    with stack.channel() as channel:
        stub = pb_grpc.InferenceStub(channel)
        (tmp_path / "doc.cose").write_bytes(stub.Attest(pb.AttestRequest(), timeout=30).document)
        for i in range(25):  # past two checkpoints (every 10 records locally)
            receipt = stub.Embed(pb.EmbedRequest(texts=[f"receipted {i}"]), metadata=metadata,
                                 timeout=30).receipt
            (receipts / f"{i:02d}.cbor").write_bytes(
                cbor2.dumps([receipt.payload, receipt.signature], canonical=True))
    folder = stack.current_audit_dir()
    assert folder is not None
    stack.kill_enclave(signal.SIGTERM)  # graceful: the final checkpoint is stored before it exits
    files = sorted(folder.glob("audit-*.jsonl"))
    verify = ["audit", "verify", "--attestation", str(tmp_path / "doc.cose"),
              "--root", str(stack.paths.pki / "root.pem")]

    whole = runner.invoke(app, [*verify, *map(str, files), "--receipt", str(receipts)])
    assert whole.exit_code == 0, whole.output
    assert "25 checked, all accounted for" in whole.stdout

    # the parent cuts the log right after a checkpoint that precedes the last receipts' records
    lines = [line for f in files for line in f.read_text().splitlines(keepends=True)]
    entries = [json.loads(line) for line in lines]
    ours = [i for i, e in enumerate(entries) if e["body"].get("subject") == "receipt-holder"]
    cut_at = next(i for i, e in enumerate(entries) if e["kind"] == "checkpoint" and i > ours[5])
    assert cut_at < ours[-1]
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:cut_at + 1]))

    alone = runner.invoke(app, [*verify, "--live", str(cut)])
    assert alone.exit_code == 0, alone.output  # on its own the cut log looks like a running enclave's

    caught = runner.invoke(app, [*verify, "--live", str(cut), "--receipt", str(receipts)])
    assert caught.exit_code == 1, caught.output
    assert "cut: receipts prove audit entries up to seq" in caught.stderr
    assert "withheld" in caught.stderr
