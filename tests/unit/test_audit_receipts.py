"""Receipts against the audit log: a parent that withholds, cuts or forks the log is caught by any
receipt issued after the point it cut, in strict and in live mode (rule 8 of ``nitrovault.audit``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import typer
from cryptography.hazmat.primitives.asymmetric import ed25519
from test_audit import NOW, PCRS, FlakySink, document, entry, rewrite, writer_clock
from typer.testing import CliRunner

from nitrovault.audit import AuditReport, AuditWriter, ReceiptFinding, RotatingFileSink, verify_audit
from nitrovault.cli import audit_cmd
from nitrovault.local.pki import LocalPki
from nitrovault.receipts import Receipt, ReceiptSigner

SEALED = hashlib.sha256(b"sealed header").digest()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPki:
    return LocalPki.ensure(tmp_path_factory.mktemp("pki"), clock=lambda: NOW)


@pytest.fixture(scope="module")
def boot(pki: LocalPki) -> tuple[ed25519.Ed25519PrivateKey, bytes]:
    key = ed25519.Ed25519PrivateKey.generate()
    return key, document(pki, key)


@dataclass
class Enclave:
    """What the server does per call: take the audit position, sign it into the receipt, then append the
    call's record naming the receipt."""

    key: ed25519.Ed25519PrivateKey
    sink: Any
    every: int = 4
    max_buffered: int = 10_000
    lines: list[bytes] = field(default_factory=list)
    receipts: list[Receipt] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.writer = AuditWriter(self.key, sink=self.sink, checkpoint_every=self.every, clock=writer_clock(),
                                  max_buffered=self.max_buffered)
        self.signer = ReceiptSigner(self.key, model_id="m", sealed_digest=SEALED, pcr0=PCRS[0],
                                    clock=lambda: NOW + timedelta(hours=1))

    def call(self, *, v1: bool = False, audited: bool = True) -> Receipt:
        receipt = self.signer.sign(f"user{len(self.receipts)}", "Embed", b"request", b"response",
                                   audit=None if v1 else self.writer.position())
        if audited:
            self.writer.append({"subject": receipt.subject, "method": "Embed", "decision": "ok",
                                "receipt": receipt.receipt_id})
        self.receipts.append(receipt)
        return receipt


def serve(key: ed25519.Ed25519PrivateKey, calls: int, *, every: int = 4, close: bool = True) -> Enclave:
    lines: list[bytes] = []
    enclave = Enclave(key, lines.append, every=every, lines=lines)
    for _ in range(calls):
        enclave.call()
    if close:
        enclave.writer.close()
    return enclave


def check(tmp_path: Path, pki: LocalPki, doc: bytes, lines: list[bytes], receipts: list[Receipt] | None,
          *, live: bool = False) -> AuditReport:
    path = tmp_path / "audit-000001.jsonl"
    path.write_bytes(b"".join(lines))
    return verify_audit([path], attestation_doc=doc, root=pki.root, at=NOW, live=live,
                        receipts=[r.to_bytes() for r in receipts or []])


def reasons(report: AuditReport) -> list[tuple[str | None, str]]:
    return [(f.receipt_id, f.reason) for f in report.receipts_missing]


# layout with 8 calls, every=4: seq 0-3 records 0-3, 4 checkpoint, 5-8 records 4-7, 9 checkpoint, then
# the final checkpoint at 10 (close=True); call i has aseq = i + (1 if i >= 4 else 0)


def test_receipt_positions_match_the_log(boot: tuple[Any, bytes]) -> None:
    enclave = serve(boot[0], 8)
    entries = [entry(line) for line in enclave.lines]
    for receipt in enclave.receipts:
        assert receipt.audit_seq is not None and receipt.audit_head is not None
        record = next(e for e in entries if e["body"].get("receipt") == receipt.receipt_id)
        assert record["seq"] == receipt.audit_seq and record["prev"] == receipt.audit_head


def test_complete_log_passes_with_its_receipts(tmp_path: Path, pki: LocalPki,
                                               boot: tuple[Any, bytes]) -> None:
    enclave = serve(boot[0], 8)
    report = check(tmp_path, pki, boot[1], enclave.lines, enclave.receipts)
    assert report.ok and report.first_bad is None and report.receipts_missing == []
    assert (report.receipts_checked, report.receipts_in_gaps, report.receipts_proven_seq) == (8, 0, 7)
    assert (report.last_seq, report.cut, report.records) == (10, False, 8)
    twice = check(tmp_path, pki, boot[1], enclave.lines, enclave.receipts + enclave.receipts[:3])
    assert twice.ok and twice.receipts_checked == 8  # the same receipt twice counts once


def test_no_receipts_changes_nothing(tmp_path: Path, pki: LocalPki, boot: tuple[Any, bytes]) -> None:
    enclave = serve(boot[0], 8)
    report = check(tmp_path, pki, boot[1], enclave.lines, None)
    assert report.ok and report.receipts_checked == 0 and report.receipts_proven_seq is None
    cut = check(tmp_path, pki, boot[1], enclave.lines[:10], None, live=True)
    assert cut.ok and not cut.cut


def test_cut_at_a_checkpoint_passes_live_alone_but_not_against_a_later_receipt(
        tmp_path: Path, pki: LocalPki, boot: tuple[Any, bytes]) -> None:
    enclave = serve(boot[0], 8, close=False)
    withheld_from = len(enclave.lines)  # 10: seq 0-9, the last a checkpoint
    after = [enclave.call() for _ in range(3)]  # records at seq 10, 11, 12: the parent keeps them back
    shown = enclave.lines[:withheld_from]
    alone = check(tmp_path, pki, boot[1], shown, None, live=True)
    assert alone.ok and alone.uncovered == 0 and alone.last_seq == 9  # indistinguishable without receipts

    before = check(tmp_path, pki, boot[1], shown, enclave.receipts[:8], live=True)
    assert before.ok and before.receipts_checked == 8  # receipts from before the cut: nothing to see

    report = check(tmp_path, pki, boot[1], shown, enclave.receipts, live=True)
    assert not report.ok and report.cut and report.first_bad is not None
    assert report.first_bad.line == 0 and report.first_bad.reason.startswith("cut: ")
    assert "up to seq 11 exist but the log ends at seq 9" in report.first_bad.reason
    assert report.receipts_proven_seq == 11
    assert reasons(report) == [(after[0].receipt_id, "missing"), (after[1].receipt_id, "withheld"),
                               (after[2].receipt_id, "withheld")]

    strict = check(tmp_path, pki, boot[1], shown, [after[2]])
    assert not strict.ok and strict.cut and strict.first_bad is not None
    assert strict.first_bad.reason.startswith("cut: ")  # not merely "truncated": it was cut, not a crash
    plain_strict = check(tmp_path, pki, boot[1], shown, None)
    assert plain_strict.first_bad is not None and plain_strict.first_bad.reason.startswith("truncated")

    # the whole log, once shown, accounts for every receipt
    enclave.writer.close()
    full = check(tmp_path, pki, boot[1], enclave.lines, enclave.receipts)
    assert full.ok and full.receipts_checked == 11


def test_log_ending_before_a_record_reports_it_missing(tmp_path: Path, pki: LocalPki,
                                                      boot: tuple[Any, bytes]) -> None:
    enclave = serve(boot[0], 6, close=False)  # seq 0-3 records, 4 checkpoint, 5-6 records 4-5
    shown = enclave.lines[:6]  # ends with record 4 (seq 5): record 5 (seq 6) held back
    assert check(tmp_path, pki, boot[1], shown, None, live=True).ok
    report = check(tmp_path, pki, boot[1], shown, enclave.receipts, live=True)
    assert not report.ok and not report.cut and report.first_bad is None  # its head seq 5 is there
    assert reasons(report) == [(enclave.receipts[5].receipt_id, "missing")]
    finding = report.receipts_missing[0]
    assert finding.audit_seq == 6 and "seq >= 6" in finding.detail and "ends at seq 5" in finding.detail


def test_record_never_written_is_missing_even_in_a_complete_log(tmp_path: Path, pki: LocalPki,
                                                                boot: tuple[Any, bytes]) -> None:
    enclave = serve(boot[0], 3, close=False)
    unaudited = enclave.call(audited=False)
    enclave.call()
    enclave.writer.close()
    report = check(tmp_path, pki, boot[1], enclave.lines, enclave.receipts)
    assert report.first_bad is None and not report.ok
    assert reasons(report) == [(unaudited.receipt_id, "missing")]


def test_forked_head(tmp_path: Path, pki: LocalPki, boot: tuple[Any, bytes]) -> None:
    enclave = serve(boot[0], 7, close=False)  # seq 5-7: records 4-6 after the checkpoint, uncovered
    lines = list(enclave.lines)
    head = entry(lines[4])["hash"]
    for i in range(5, len(lines)):  # rewrite the open tail and recompute the chain: live mode can't tell
        obj = entry(lines[i])
        if i == 5:
            obj["body"]["decision"] = "denied"
        obj["prev"] = head
        lines[i] = rewrite(obj, rehash=True)
        head = obj["hash"]
    alone = check(tmp_path, pki, boot[1], lines, None, live=True)
    assert alone.ok and alone.uncovered == 3
    report = check(tmp_path, pki, boot[1], lines, enclave.receipts, live=True)
    assert not report.ok and not report.cut
    # receipt 5 was signed after seq 5 (its aseq is 6), receipt 6 after seq 6: both see the rewrite
    assert reasons(report) == [(enclave.receipts[5].receipt_id, "forked"),
                               (enclave.receipts[6].receipt_id, "forked")]
    assert "seq 5 is not the one" in report.receipts_missing[0].detail


def test_record_lost_in_a_signed_gap_is_counted_not_failed(tmp_path: Path, pki: LocalPki,
                                                           boot: tuple[Any, bytes]) -> None:
    sink = FlakySink()
    enclave = Enclave(boot[0], sink, every=100, max_buffered=3, lines=sink.lines)
    enclave.call()
    sink.down = True
    for _ in range(6):  # 3 buffered, 3 lost
        enclave.call()
    lost = enclave.writer.status.dropped_pending
    assert lost == 3
    sink.down = False
    enclave.writer.flush()  # writes the buffer, then the gap entry
    enclave.call()
    enclave.writer.close()
    report = check(tmp_path, pki, boot[1], sink.lines, enclave.receipts)
    assert report.ok and report.dropped == 3 and report.receipts_in_gaps == 3
    assert report.receipts_missing == [] and report.receipts_checked == 8

    # a gap's count is shared: one more unrecorded receipt than the gap reports lost is missing
    extra = Receipt.from_bytes(enclave.signer.sign(
        "x", "Embed", b"q", b"r", audit=enclave.receipts[1].audit_position).to_bytes())
    over = check(tmp_path, pki, boot[1], sink.lines, [*enclave.receipts, extra])
    assert not over.ok and over.receipts_in_gaps == 3 and reasons(over) == [(extra.receipt_id, "missing")]

    # a gap before the receipt's position does not cover it
    late = enclave.signer.sign("y", "Embed", b"q", b"r", audit=enclave.receipts[-1].audit_position)
    after_gap = check(tmp_path, pki, boot[1], sink.lines, [late])
    assert reasons(after_gap) == [(late.receipt_id, "missing")] and after_gap.receipts_in_gaps == 0


def test_receipt_of_another_boot(tmp_path: Path, pki: LocalPki, boot: tuple[Any, bytes]) -> None:
    enclave = serve(boot[0], 4)
    other = serve(ed25519.Ed25519PrivateKey.generate(), 2)
    report = check(tmp_path, pki, boot[1], enclave.lines, [*enclave.receipts, other.receipts[1]])
    assert not report.ok and report.first_bad is None and report.receipts_checked == 5
    assert reasons(report) == [(other.receipts[1].receipt_id, "other-key")]
    garbage = verify_audit([tmp_path / "audit-000001.jsonl"], attestation_doc=boot[1], root=pki.root, at=NOW,
                           receipts=[b"\x82\x40\x40"])
    assert not garbage.ok and reasons(garbage) == [(None, "malformed")]


def test_v1_receipts_are_checked_for_their_record_only(tmp_path: Path, pki: LocalPki,
                                                       boot: tuple[Any, bytes]) -> None:
    enclave = serve(boot[0], 2, close=False)
    v1 = [enclave.call(v1=True) for _ in range(3)]
    assert all(r.audit_seq is None for r in v1)
    full = list(enclave.lines)
    enclave.writer.close()
    report = check(tmp_path, pki, boot[1], enclave.lines, enclave.receipts)
    assert report.ok and report.receipts_checked == 5 and report.receipts_proven_seq == 0
    cut = check(tmp_path, pki, boot[1], full[:3], v1, live=True)  # records of v1[1], v1[2] held back
    assert not cut.ok and not cut.cut and cut.receipts_proven_seq is None
    assert reasons(cut) == [(v1[1].receipt_id, "missing"), (v1[2].receipt_id, "missing")]


def test_receipts_after_a_broken_line(tmp_path: Path, pki: LocalPki, boot: tuple[Any, bytes]) -> None:
    enclave = serve(boot[0], 8)
    lines = list(enclave.lines)
    del lines[6]  # rule 4 fails at seq 7: the log's own failure stays first_bad
    report = check(tmp_path, pki, boot[1], lines, enclave.receipts)
    assert report.first_bad is not None and "missing entries" in report.first_bad.reason
    assert not report.cut and report.last_seq == 5
    assert {reason for _, reason in reasons(report)} == {"withheld", "missing"}
    assert all("where it stops verifying" in f.detail for f in report.receipts_missing)


def test_finding_is_a_plain_value() -> None:
    finding = ReceiptFinding("k:1", "missing", "why", 3)
    assert (finding.receipt_id, finding.reason, finding.audit_seq) == ("k:1", "missing", 3)


# -- CLI -----------------------------------------------------------------------------------------------------

app = typer.Typer(no_args_is_help=True)
app.add_typer(audit_cmd.app, name="audit")
runner = CliRunner()


def test_cli_audit_verify_with_receipts(tmp_path: Path, pki: LocalPki, boot: tuple[Any, bytes]) -> None:
    doc = tmp_path / "boot.cose"
    doc.write_bytes(boot[1])
    sink = RotatingFileSink(tmp_path / "audit", max_bytes=1 << 20)
    enclave = Enclave(boot[0], sink, every=3)
    for _ in range(6):  # seq 0-2 records, 3 checkpoint, 4-6 records, 7 checkpoint
        enclave.call()
    receipts = tmp_path / "receipts"
    receipts.mkdir()
    for receipt in enclave.receipts:
        (receipts / f"{receipt.sequence}.cbor").write_bytes(receipt.to_bytes())
    log = sink.files[0]
    base = ["audit", "verify", str(log), "--attestation", str(doc), "--root", str(pki.root_path)]

    ok = runner.invoke(app, [*base, "--live", "--receipt", str(receipts)])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("intact: 6 records") and "receipts: 6 checked, all accounted for" in ok.stdout

    enclave.call()  # seq 8: not yet shown (the parent cuts the log at the checkpoint)
    enclave.call()  # signed after seq 8: proves it exists
    shown = log.read_bytes().splitlines(keepends=True)[:8]
    log.write_bytes(b"".join(shown))
    late = tmp_path / "late.cbor"
    late.write_bytes(enclave.receipts[-1].to_bytes())
    assert runner.invoke(app, [*base, "--live"]).exit_code == 0  # alone, the cut log looks live and fine
    assert runner.invoke(app, [*base, "--live", "--receipt", str(receipts)]).exit_code == 0

    cut = runner.invoke(app, [*base, "--live", "--receipt", str(receipts), "--receipt", str(late)])
    assert cut.exit_code == 1
    assert f"receipt {enclave.receipts[-1].receipt_id}: withheld: " in cut.stderr
    assert f"tampered: {log}:0: cut: receipts prove audit entries up to seq 8 exist" in cut.stderr
    as_json = runner.invoke(app, [*base, "--live", "--receipt", str(late), "--json"])
    assert as_json.exit_code == 1
    summary = json.loads(as_json.stdout)
    assert summary["ok"] is False and summary["first_bad"]["reason"].startswith("cut: ")
    assert summary["receipts"]["cut"] is True and summary["receipts"]["proven_seq"] == 8
    assert summary["receipts"]["missing"] == [{
        "receipt_id": enclave.receipts[-1].receipt_id, "reason": "withheld", "audit_seq": 9,
        "detail": summary["receipts"]["missing"][0]["detail"]}]
    plain = json.loads(runner.invoke(app, [*base, "--live", "--json"]).stdout)
    assert "receipts" not in plain  # the existing JSON shape when no --receipt is given

    missing = tmp_path / "missing.cbor"
    missing.write_bytes(enclave.receipts[-2].to_bytes())  # its head is seq 7, its record seq 8 is gone
    result = runner.invoke(app, [*base, "--live", "--receipt", str(missing)])
    assert result.exit_code == 1 and "tampered" not in result.stderr
    assert f"receipt {enclave.receipts[-2].receipt_id}: missing: " in result.stderr
    assert "incomplete: 1 of 1 receipts are not accounted for by the log" in result.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    assert runner.invoke(app, [*base, "--receipt", str(empty)]).exit_code == 2
    assert runner.invoke(app, [*base, "--receipt", str(tmp_path / "absent.cbor")]).exit_code == 2
