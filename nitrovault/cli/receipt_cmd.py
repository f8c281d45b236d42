"""``nitrovault receipt verify``: check a response receipt offline against the enclave's attestation document.

Exit codes: 0 the receipt holds, 1 it does not (``invalid: <reason>: <why>`` on stderr; the reasons are
the steps of :func:`nitrovault.receipts.verify_receipt`, e.g. ``response`` or ``request``), 2 usage error.
``--at`` defaults to the attestation document's own timestamp: the document was made at boot and its
3-hour leaf certificate must have been valid *then*; receipts are signed for the rest of the boot.
``--response`` and ``--request`` are the exact bytes ``nitrovault embed|infer --save-response|--save-request``
wrote; each is checked only when given.

    nitrovault receipt verify receipt.cbor --response response.bin --request request.bin \
        --attestation boot.cose --root root.pem
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509

from nitrovault.attestation import load_root, parse_document
from nitrovault.cli.attest_cmd import read_document
from nitrovault.cli.times import AT_FORMAT, parse_at
from nitrovault.clock import utc_now
from nitrovault.errors import AttestationError, ConfigError, ReceiptError
from nitrovault.receipts import verify_receipt

app = typer.Typer(no_args_is_help=True, help="Verify response receipts offline.")

ExistingFile = Annotated[Path, typer.Option(exists=True, dir_okay=False, readable=True)]


def at_or_document_time(value: str | None, document: bytes) -> datetime:
    """``--at`` as an aware datetime; default: the document's own timestamp (or now if it does not parse)."""
    if value is not None:
        return parse_at(value)
    try:
        return parse_document(document).timestamp
    except AttestationError:
        return utc_now()


def load_root_option(root: Path | None) -> x509.Certificate | None:
    try:
        return None if root is None else load_root(root)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--root") from None


def _read_receipt(path: Path) -> bytes:
    """Raw CBOR, or base64 text of it (as copied from gRPC metadata)."""
    data = path.read_bytes()
    if data[:1] == b"\x82":
        return data
    try:
        return base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        return data


@app.command()
def verify(
    receipt: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, metavar="RECEIPT",
                                            help="Receipt: raw CBOR or base64 text.")],
    attestation: Annotated[Path, typer.Option("--attestation", exists=True, dir_okay=False, readable=True,
                                              help="The enclave's attestation document (raw or base64).")],
    response: Annotated[Path | None, typer.Option(
        "--response", exists=True, dir_okay=False, readable=True,
        help="The exact response bytes the receipt covers.")] = None,
    request: Annotated[Path | None, typer.Option(
        "--request", exists=True, dir_okay=False, readable=True,
        help="The exact request bytes the receipt covers.")] = None,
    root: Annotated[Path | None, typer.Option(
        "--root", exists=True, dir_okay=False,
        help="Trust root PEM (default: pinned AWS Nitro Root G1).")] = None,
    at: Annotated[str | None, typer.Option("--at", help=f"Time to check the document at, {AT_FORMAT} "
                                                        "(default: the document's timestamp).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Verify a receipt: exit 0 when it holds, 1 when not (saying why), 2 usage error."""
    document = read_document(attestation)
    when = at_or_document_time(at, document)
    trust_root = load_root_option(root)
    try:
        verified = verify_receipt(_read_receipt(receipt), attestation_doc=document, root=trust_root, at=when,
                                  response=None if response is None else response.read_bytes(),
                                  request=None if request is None else request.read_bytes())
    except ReceiptError as err:
        typer.echo(f"invalid: {err.reason}: {err}", err=True)
        if as_json:
            typer.echo(json.dumps({"valid": False, "reason": err.reason, "error": str(err)}))
        raise typer.Exit(1) from None
    summary = {
        "valid": True, "receipt_id": verified.receipt_id, "model_id": verified.model_id,
        "sealed_digest": verified.sealed_digest.hex(), "pcr0": verified.pcr0.hex(),
        "subject": verified.subject, "method": verified.method, "time": verified.time.isoformat(),
        "request_sha256": verified.request_sha256.hex(), "response_sha256": verified.response_sha256.hex(),
        "sequence": verified.sequence, "key_id": verified.key_id, "response_checked": response is not None,
        "request_checked": request is not None,
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"valid: receipt {verified.receipt_id} for {verified.method} on {verified.model_id}")
    for name in ("subject", "time", "pcr0", "sealed_digest", "response_sha256", "request_sha256"):
        typer.echo(f"{name}: {summary[name]}")
    if response is None:
        typer.echo("response: not checked (give --response FILE)")
    if request is None:
        typer.echo("request: not checked (give --request FILE)")
