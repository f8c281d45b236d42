"""``nitrovault attest verify``: check an AWS Nitro attestation document from a file;
``nitrovault attest fetch``: verify a serving enclave and save its attestation document;
``nitrovault attest pin``: verify a serving enclave and save its TLS certificate for other clients.

``verify`` is a thin shell over :func:`nitrovault.attestation.verify_document`. Exit codes: 0 valid, 1
invalid (one line ``invalid: <step>: <message>`` on stderr), 2 usage error (bad option, missing file,
unreadable root). It also shows what the document binds in ``user_data`` (:mod:`nitrovault.bindings`: the
receipt key and the TLS key hash), or why nothing (a document not made by a nitrovault enclave).

``fetch`` and ``pin`` verify the enclave exactly as :class:`nitrovault.client.NitrovaultClient` does
before it sends anything (TLS, pinned certificate, ``Attest`` with a fresh nonce against the trust options
of :mod:`nitrovault.cli.client_cmd`, the attested TLS key against the connection's); a failure exits 1 with
one line ``error: <step>: <message>``. ``Attest`` is public: no token is needed (``--token-file`` is
accepted for older scripts and not sent).

    nitrovault attest verify doc.cose --at 2024-09-07T14:37:39.545Z --expect-pcr 0=e72a46... --json
    nitrovault attest fetch --target models.example.com:443 --pcr-manifest pcr-manifest.json -o boot.cose
    nitrovault attest pin --target models.example.com:443 --pcr-manifest pcr-manifest.json -o enclave.pem

``fetch`` saves the document the connection was verified with (its nonce is the client's), or, with
``--nonce``, a fresh one binding that nonce, verified the same way. It binds the enclave's receipt/audit
key in ``user_data``, so it is the ``--attestation`` of ``nitrovault receipt verify`` and ``nitrovault
audit verify`` for that boot.

``pin`` writes the verified certificate (PEM) and prints PCR0, the certificate's SHA-256 and the DNS name
clients must ask for: ``grpcurl -cacert enclave.pem -authority NAME`` or a Go/Java client that trusts
exactly this certificate can then call the service (``docs/clients.md``). Such a client trusts the pin, not
a fresh attestation: re-pin when the owner re-seals the model with a new identity.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography import x509

from nitrovault.attestation import (
    AttestationDocument,
    Expectations,
    VerifiedAttestation,
    is_debug,
    load_root,
    parse_pcr_arg,
    verify_document,
)
from nitrovault.bindings import EnclaveBindings
from nitrovault.cli.client_cmd import (
    CaFile,
    ExpectPcr,
    PcrManifest,
    Root,
    ServerName,
    Target,
    Timeout,
    build_expect,
    verified_client,
)
from nitrovault.cli.times import AT_FORMAT, parse_at
from nitrovault.client import ATTEST_MAX_AGE
from nitrovault.clock import utc_now
from nitrovault.errors import AttestationError, BindingError, ConfigError
from nitrovault.identity import certificate_fingerprint, dns_names

app = typer.Typer(no_args_is_help=True,
                  help="Verify attestation documents; fetch a document from, or pin, a verified enclave.")

_COSE_FIRST_BYTES = (0x84, 0xD2)  # untagged 4-array, or tag 18


def read_document(path: Path) -> bytes:
    """The raw COSE bytes of a file holding either raw CBOR or base64 text of it."""
    data = path.read_bytes()
    try:
        decoded = base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        return data
    return decoded if decoded[:1] and decoded[0] in _COSE_FIRST_BYTES else data


def _bindings(doc: AttestationDocument) -> tuple[dict[str, Any] | None, str | None]:
    """What ``user_data`` binds (:meth:`EnclaveBindings.to_json`), or None and why not."""
    try:
        return EnclaveBindings.parse(doc.user_data).to_json(), None
    except BindingError as err:
        return None, str(err)


def _summary(verified: VerifiedAttestation) -> dict[str, Any]:
    doc = verified.document
    bindings, unbound = _bindings(doc)

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
        "bindings": bindings,
        "bindings_error": unbound,
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
        str | None, typer.Option("--at", help=f"Verification time, {AT_FORMAT} (default: now).")
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
    when = utc_now() if at is None else parse_at(at)
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
    bindings = summary["bindings"]
    if bindings is None:
        typer.echo(f"bindings: none ({summary['bindings_error']})")
    else:
        tls = bindings["tls_spki_sha256"] or "none (a boot document, made before TLS serving)"
        typer.echo(f"bindings: {bindings['layout']} receipt_key {bindings['receipt_key']} "
                   f"tls_spki_sha256 {tls}")


TokenFileIgnored = Annotated[Path | None, typer.Option(
    "--token-file", dir_okay=False, help="Accepted for older scripts; Attest is public and it is not sent.")]


@app.command()
def fetch(
    output: Annotated[Path, typer.Option("-o", "--output", dir_okay=False, help="Write the document here.")],
    target: Target = "127.0.0.1:50051",
    expect_pcr: ExpectPcr = None,
    pcr_manifest: PcrManifest = None,
    root: Root = None,
    ca_file: CaFile = None,
    server_name: ServerName = None,
    token_file: TokenFileIgnored = None,
    nonce: Annotated[str | None, typer.Option(
        "--nonce", metavar="HEX", help="Fetch a fresh document binding this nonce (1 to 64 bytes).")] = None,
    timeout: Timeout = 30.0,
) -> None:
    """Verify a serving enclave, then save its attestation document (exit 1 when verification fails)."""
    del token_file  # Attest needs no token: the client verifies the enclave before it sends one
    expect = build_expect(expect_pcr, pcr_manifest, root, ca_file)
    try:
        nonce_bytes = None if nonce is None else bytes.fromhex(nonce)
    except ValueError:
        raise typer.BadParameter("not hexadecimal", param_hint="--nonce") from None
    if nonce_bytes is not None and not 1 <= len(nonce_bytes) <= 64:
        raise typer.BadParameter("the nonce must be 1 to 64 bytes", param_hint="--nonce")
    with verified_client(target, expect, token=None, server_name=server_name, timeout=timeout) as client:
        verified = client.attestation
        if nonce_bytes is not None:  # a second document, over the pinned connection, checked the same way
            verified = verify_document(client.attest(nonce_bytes), at=utc_now(), root=expect.root,
                                       expect=Expectations(pcrs=expect.pcrs, nonce=nonce_bytes,
                                                           max_age=ATTEST_MAX_AGE))
    document = verified.document.raw
    try:
        output.write_bytes(document)
    except OSError as err:
        raise typer.BadParameter(f"cannot write: {err.strerror}", param_hint="--output") from None
    typer.echo(f"verified: PCR0 {verified.pcrs[0].hex()}")
    typer.echo(f"wrote {output} ({len(document)} bytes)")


@app.command()
def pin(
    output: Annotated[Path, typer.Option(
        "-o", "--output", dir_okay=False, help="Write the verified certificate (PEM) here.")],
    target: Target = "127.0.0.1:50051",
    expect_pcr: ExpectPcr = None,
    pcr_manifest: PcrManifest = None,
    root: Root = None,
    ca_file: CaFile = None,
    server_name: ServerName = None,
    timeout: Timeout = 30.0,
) -> None:
    """Verify a serving enclave as the client does, then save its TLS certificate for other clients."""
    expect = build_expect(expect_pcr, pcr_manifest, root, ca_file)
    with verified_client(target, expect, token=None, server_name=server_name, timeout=timeout) as client:
        pcr0 = client.attestation.pcrs[0]
        pem = client.certificate_pem
    certificate = x509.load_pem_x509_certificate(pem)
    names = dns_names(certificate)
    try:
        output.write_bytes(pem)
    except OSError as err:
        raise typer.BadParameter(f"cannot write: {err.strerror}", param_hint="--output") from None
    typer.echo(f"verified: PCR0 {pcr0.hex()}")
    typer.echo(f"certificate SHA-256: {certificate_fingerprint(certificate)}")
    typer.echo(f"server name: {server_name or names[0]}")
    if len(names) > 1:
        typer.echo(f"also valid for: {', '.join(names[1:])}")
    typer.echo(f"valid until: {certificate.not_valid_after_utc.isoformat()}")
    typer.echo(f"wrote {output}")
