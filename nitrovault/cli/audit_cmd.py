"""``nitrovault audit verify``: check an audit log (rotated JSON-lines files) against the enclave's document.

Exit codes: 0 intact, 1 not (``tampered: FILE:LINE: reason`` on stderr, naming the first bad record,
and/or one ``receipt ID: reason: detail`` line per receipt the log does not account for), 2 usage error.
Give one boot's files in rotation order (``audit-*.jsonl`` sorts correctly). ``--at`` defaults to the
attestation document's own timestamp (see ``nitrovault receipt verify``).

``--receipt FILE`` (repeatable; a directory means its ``*.cbor`` files) checks receipts saved by
``nitrovault embed|infer --save-receipt`` against the log (rule 8 of :mod:`nitrovault.audit`): each
receipt's record must be in the log, and a receipt that proves entries past the log's end fails the log
as ``cut``, ``--live`` or not. Reasons: ``withheld``, ``forked``, ``missing`` or the receipt's own
verification failure (``other-key``, ...); records a signed gap entry reports lost are counted, not failed.

    nitrovault audit verify audit/audit-*.jsonl --attestation boot.cose --root root.pem \
        --receipt receipts/
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from nitrovault.audit import AuditReport, verify_audit
from nitrovault.cli.attest_cmd import read_document
from nitrovault.cli.receipt_cmd import _read_receipt, at_or_document_time, load_root_option
from nitrovault.cli.times import AT_FORMAT

app = typer.Typer(no_args_is_help=True, help="Verify the enclave's audit log.")


def _receipt_files(paths: list[Path]) -> list[Path]:
    """Each ``--receipt``: a file, or a directory standing for its ``*.cbor`` files (sorted)."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob("*.cbor"))
            if not found:
                raise typer.BadParameter(f"no *.cbor receipts in {path}", param_hint="--receipt")
            out.extend(found)
        else:
            out.append(path)
    return out


def _receipts_json(report: AuditReport) -> dict[str, object]:
    return {
        "checked": report.receipts_checked, "in_gaps": report.receipts_in_gaps,
        "proven_seq": report.receipts_proven_seq, "last_seq": report.last_seq, "cut": report.cut,
        "missing": [{"receipt_id": f.receipt_id, "reason": f.reason, "detail": f.detail,
                     "audit_seq": f.audit_seq} for f in report.receipts_missing],
    }


@app.command()
def verify(
    files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, readable=True, metavar="FILE...",
                                                help="Audit files of one boot, in rotation order.")],
    attestation: Annotated[Path, typer.Option("--attestation", exists=True, dir_okay=False, readable=True,
                                              help="That boot's attestation document (raw or base64).")],
    root: Annotated[Path | None, typer.Option(
        "--root", exists=True, dir_okay=False,
        help="Trust root PEM (default: pinned AWS Nitro Root G1).")] = None,
    at: Annotated[str | None, typer.Option("--at", help=f"Time to check the document at, {AT_FORMAT} "
                                                        "(default: the document's timestamp).")] = None,
    live: Annotated[bool, typer.Option(
        "--live", help="The enclave is still running: accept a log without its final checkpoint "
                       "(trailing records stay unverified).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
    receipt: Annotated[list[Path] | None, typer.Option(
        "--receipt", exists=True, readable=True, metavar="FILE|DIR",
        help="A receipt saved by --save-receipt (repeatable; a directory: its *.cbor files). Its record "
             "must be in the log; a receipt issued after the log's end fails it as cut.")] = None,
) -> None:
    """Verify an audit log: exit 0 intact, 1 not (naming the first bad record), 2 usage error."""
    document = read_document(attestation)
    receipt_files = _receipt_files(receipt or [])
    report = verify_audit(files, attestation_doc=document, root=load_root_option(root),
                          at=at_or_document_time(at, document), live=live,
                          receipts=[_read_receipt(path) for path in receipt_files])
    if as_json:
        bad = report.first_bad
        summary: dict[str, object] = {
            "ok": report.ok, "records": report.records, "checkpoints": report.checkpoints,
            "dropped": report.dropped, "uncovered": report.uncovered, "boot_id": report.boot_id,
            "first_bad": None if bad is None
            else {"file": str(bad.file), "line": bad.line, "reason": bad.reason},
        }
        if receipt_files:
            summary["receipts"] = _receipts_json(report)
        typer.echo(json.dumps(summary, indent=2))
    for finding in report.receipts_missing:
        typer.echo(f"receipt {finding.receipt_id or '(undecodable)'}: {finding.reason}: {finding.detail}",
                   err=True)
    if report.first_bad is not None:
        bad = report.first_bad
        typer.echo(f"tampered: {bad.file}:{bad.line}: {bad.reason}", err=True)
        raise typer.Exit(1)
    if not report.ok:
        typer.echo(f"incomplete: {len(report.receipts_missing)} of {report.receipts_checked} receipts are "
                   "not accounted for by the log", err=True)
        raise typer.Exit(1)
    if not as_json:
        typer.echo(f"intact: {report.records} records, {report.checkpoints} checkpoints, "
                   f"boot {report.boot_id}")
        if report.dropped:
            typer.echo(f"the enclave reported {report.dropped} records lost while its audit sink was down")
        if report.uncovered:
            typer.echo(f"live: {report.uncovered} records after the last checkpoint are not yet verified")
        if receipt_files:
            typer.echo(f"receipts: {report.receipts_checked} checked, all accounted for"
                       + (f" ({report.receipts_in_gaps} in signed gaps: records the enclave reported lost)"
                          if report.receipts_in_gaps else ""))
