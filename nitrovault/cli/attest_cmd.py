"""``nitrovault attest verify``: check an AWS Nitro attestation document from a file;
``nitrovault attest fetch``: ask a serving enclave for one (``Attest``) and save it.

Thin shell over :func:`nitrovault.attestation.verify_document`. Exit codes: 0 valid, 1 invalid (one line
``invalid: <step>: <message>`` on stderr), 2 usage error (bad option, missing file, unreadable root).

    nitrovault attest verify doc.cose --at 2024-09-07T14:37:39.545Z --expect-pcr 0=e72a46... --json
    nitrovault attest fetch --target 127.0.0.1:50051 --token-file my.token -o attestation.cose

The fetched document binds the enclave's receipt/audit key in ``user_data``, so it is the
``--attestation`` of ``nitrovault receipt verify`` and ``nitrovault audit verify`` for that boot. It is
saved as is; ``fetch`` verifies nothing (``attest verify`` and the receipt/audit verifiers do).
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from nitrovault.attestation import (
    Expectations,
    VerifiedAttestation,
    is_debug,
    load_root,
    parse_pcr_arg,
    verify_document,
)
from nitrovault.errors import AttestationError, ConfigError

app = typer.Typer(no_args_is_help=True, help="Verify AWS Nitro attestation documents.")

_COSE_FIRST_BYTES = (0x84, 0xD2)  # untagged 4-array, or tag 18


def read_document(path: Path) -> bytes:
    """The raw COSE bytes of a file holding either raw CBOR or base64 text of it."""
    data = path.read_bytes()
    try:
        decoded = base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        return data
    return decoded if decoded[:1] and decoded[0] in _COSE_FIRST_BYTES else data


def _parse_at(value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"not an ISO 8601 time: {value!r}", param_hint="--at") from None
    # A time without an offset is read as UTC (documents carry UTC timestamps).
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def _summary(verified: VerifiedAttestation) -> dict[str, Any]:
    doc = verified.document

    def hex_or_none(value: bytes | None) -> str | None:
        return None if value is None else value.hex()

    return {
        "valid": True,
        "module_id": doc.module_id,
        "timestamp": doc.timestamp.isoformat(),
        "timestamp_ms": doc.timestamp_ms,
        "digest": doc.digest,
        "pcrs": {str(i): v.hex() for i, v in doc.pcrs.items()},
        "debug": is_debug(doc),
        "user_data": hex_or_none(doc.user_data),
        "nonce": hex_or_none(doc.nonce),
        "public_key": hex_or_none(doc.public_key),
        "root_sha256": verified.root_fingerprint,
        "verified_at": verified.verified_at.isoformat(),
    }


@app.command()
def verify(
    file: Annotated[
        Path,
        typer.Argument(
            exists=True,
            dir_okay=False,
            readable=True,
            metavar="FILE",
            help="COSE_Sign1 document: raw CBOR or base64 text.",
        ),
    ],
    root: Annotated[
        Path | None,
        typer.Option(
            "--root", exists=True, dir_okay=False, help="Trust root PEM (default: pinned AWS Nitro Root G1)."
        ),
    ] = None,
    at: Annotated[
        str | None, typer.Option("--at", help="Verification time, ISO 8601 (default: now, UTC).")
    ] = None,
    expect_pcr: Annotated[
        list[str] | None,
        typer.Option("--expect-pcr", metavar="N=HEX", help="Expected PCR (96 hex digits); repeatable."),
    ] = None,
    nonce: Annotated[str | None, typer.Option("--nonce", metavar="HEX", help="Expected nonce.")] = None,
    allow_debug: Annotated[
        bool, typer.Option("--allow-debug", help="UNSAFE: accept debug-mode (all-zero PCR) documents.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Verify an attestation document: exit 0 valid, 1 invalid, 2 usage error."""
    when = _parse_at(at)
    pcrs: dict[int, bytes] = {}
    for arg in expect_pcr or []:
        try:
            index, value = parse_pcr_arg(arg)
        except ConfigError as exc:
            raise typer.BadParameter(str(exc), param_hint="--expect-pcr") from None
        pcrs[index] = value
    try:
        expected_nonce = None if nonce is None else bytes.fromhex(nonce)
    except ValueError:
        raise typer.BadParameter("not hexadecimal", param_hint="--nonce") from None
    try:
        trust_root = None if root is None else load_root(root)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--root") from None
    if allow_debug:
        typer.secho(
            "WARNING: --allow-debug accepts DEBUG-MODE enclaves, whose all-zero PCRs prove nothing. "
            "Never use it for production trust decisions.",
            fg=typer.colors.RED,
            bold=True,
            err=True,
        )

    try:
        verified = verify_document(
            read_document(file),
            at=when,
            root=trust_root,
            expect=Expectations(pcrs=pcrs, nonce=expected_nonce),
            unsafe_allow_debug=allow_debug,
        )
    except AttestationError as err:
        typer.echo(f"invalid: {err.diagnostics()}", err=True)
        if as_json:
            typer.echo(json.dumps({"valid": False, "step": err.step, "error": str(err)}))
        raise typer.Exit(1) from None

    summary = _summary(verified)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"valid: {summary['module_id']}")
    typer.echo(f"timestamp: {summary['timestamp']}")
    if summary["debug"]:
        typer.secho("DEBUG MODE: PCR0 is all zeros", fg=typer.colors.RED, bold=True)
    zero = 0
    for index, value in verified.document.pcrs.items():
        if any(value):
            typer.echo(f"PCR{index}: {value.hex()}")
        else:
            zero += 1
    typer.echo(f"({zero} all-zero PCRs not shown)")
    for name in ("user_data", "nonce", "public_key"):
        value = summary[name]
        typer.echo(f"{name}: {'null' if value is None else f'{len(value) // 2} bytes'}")


@app.command()
def fetch(
    output: Annotated[Path, typer.Option("-o", "--output", dir_okay=False, help="Write the document here.")],
    target: Annotated[str, typer.Option("--target", help="gRPC address: host:port or unix:/path.")] = (
        "127.0.0.1:50051"
    ),
    token_file: Annotated[Path | None, typer.Option(
        "--token-file", dir_okay=False, help="File holding the bearer token (else $NITROVAULT_TOKEN).")
    ] = None,
    nonce: Annotated[str | None, typer.Option(
        "--nonce", metavar="HEX", help="Nonce to bind (at most 64 bytes).")] = None,
    ca_file: Annotated[Path | None, typer.Option(
        "--ca-file", dir_okay=False, help="PEM root certificates: use TLS and trust these.")] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0.001, help="Deadline, in seconds.")] = 30.0,
) -> None:
    """Fetch a fresh attestation document from a serving enclave (exit 1 when the call fails)."""
    from nitrovault.cli.client_cmd import _client

    try:
        nonce_bytes = None if nonce is None else bytes.fromhex(nonce)
    except ValueError:
        raise typer.BadParameter("not hexadecimal", param_hint="--nonce") from None
    with _client(target, token_file, ca_file, None, timeout) as client:
        document = client.attest(nonce_bytes)
    try:
        output.write_bytes(document)
    except OSError as err:
        raise typer.BadParameter(f"cannot write: {err.strerror}", param_hint="--output") from None
    typer.echo(f"wrote {output} ({len(document)} bytes)")
