"""``nitrovault audit verify``: check an audit log (rotated JSON-lines files) against the enclave's document.

Exit codes: 0 intact, 1 not (``tampered: FILE:LINE: reason`` on stderr, naming the first bad record),
2 usage error. Give one boot's files in rotation order (``audit-*.jsonl`` sorts correctly). ``--at``
defaults to the attestation document's own timestamp (see ``nitrovault receipt verify``).

    nitrovault audit verify audit/audit-*.jsonl --attestation boot.cose --root root.pem
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from nitrovault.audit import verify_audit
from nitrovault.cli.attest_cmd import read_document
from nitrovault.cli.receipt_cmd import load_root_option, parse_at

app = typer.Typer(no_args_is_help=True, help="Verify the enclave's audit log.")


@app.command()
def verify(
    files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, readable=True, metavar="FILE...",
                                                help="Audit files of one boot, in rotation order.")],
    attestation: Annotated[Path, typer.Option("--attestation", exists=True, dir_okay=False, readable=True,
                                              help="That boot's attestation document (raw or base64).")],
    root: Annotated[Path | None, typer.Option(
        "--root", exists=True, dir_okay=False,
        help="Trust root PEM (default: pinned AWS Nitro Root G1).")] = None,
    at: Annotated[str | None, typer.Option("--at", help="Time to check the document at, ISO 8601 "
                                                        "(default: the document's timestamp).")] = None,
    live: Annotated[bool, typer.Option(
        "--live", help="The enclave is still running: accept a log without its final checkpoint "
                       "(trailing records stay unverified).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Verify an audit log: exit 0 intact, 1 not (naming the first bad record), 2 usage error."""
    document = read_document(attestation)
    report = verify_audit(files, attestation_doc=document, root=load_root_option(root),
                          at=parse_at(at, document), live=live)
    if as_json:
        bad = report.first_bad
        typer.echo(json.dumps({
            "ok": report.ok, "records": report.records, "checkpoints": report.checkpoints,
            "dropped": report.dropped, "uncovered": report.uncovered, "boot_id": report.boot_id,
            "first_bad": None if bad is None
            else {"file": str(bad.file), "line": bad.line, "reason": bad.reason},
        }, indent=2))
    if report.first_bad is not None:
        bad = report.first_bad
        typer.echo(f"tampered: {bad.file}:{bad.line}: {bad.reason}", err=True)
        raise typer.Exit(1)
    if not as_json:
        typer.echo(f"intact: {report.records} records, {report.checkpoints} checkpoints, "
                   f"boot {report.boot_id}")
        if report.dropped:
            typer.echo(f"the enclave reported {report.dropped} records lost while its audit sink was down")
        if report.uncovered:
            typer.echo(f"live: {report.uncovered} records after the last checkpoint are not yet verified")
