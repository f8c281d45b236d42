"""The ``nitrovault`` command line.

Each verb group lives in its own module and is registered here; this module only composes them.
Exit codes: 0 success, 1 a check failed (invalid document, denied key, bad receipt, an enclave that does
not verify), 2 usage error. Every verb that talks to an enclave verifies it first with the trust options
of :mod:`nitrovault.cli.client_cmd`.
"""

from __future__ import annotations

import typer

from nitrovault.cli import (
    attest_cmd,
    audit_cmd,
    client_cmd,
    deploy_cmd,
    harden_cmd,
    local_cmd,
    receipt_cmd,
    review_cmd,
    seal_cmd,
    token_cmd,
    watermark_cmd,
)

app = typer.Typer(
    name="nitrovault",
    help="Serve torch models inside AWS Nitro Enclaves with attested key release.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(attest_cmd.app, name="attest",
              help="Verify attestation documents; fetch a document from, or pin, a verified enclave.")
app.add_typer(local_cmd.app, name="local", help="The local stand-ins: fake NSM, KMS emulator, local stack.")
app.add_typer(token_cmd.app, name="token", help="Issuer keys and bearer tokens for the local stack.")
app.add_typer(receipt_cmd.app, name="receipt", help="Verify response receipts offline.")
app.add_typer(audit_cmd.app, name="audit", help="Verify the enclave's audit log.")
app.add_typer(review_cmd.app, name="policy", help="Review KMS key policies against an image's PCRs.")
app.add_typer(deploy_cmd.app, name="deploy", help="Deploy helpers: enclave.json from the stack's outputs.")
app.command("seal")(seal_cmd.seal)
app.command("inspect")(seal_cmd.inspect)
app.command("embed")(client_cmd.embed)
app.command("infer")(client_cmd.infer)
app.command("generate")(client_cmd.generate)
app.add_typer(watermark_cmd.app, name="watermark", help="Embed and detect ownership watermarks.")
app.command("harden")(harden_cmd.harden_command)
app.add_typer(harden_cmd.fingerprint_app, name="fingerprint",
              help="Name the hardened copy a leaked model came from (per-copy fingerprints).")


def main() -> None:
    app()
