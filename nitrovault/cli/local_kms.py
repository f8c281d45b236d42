"""``nitrovault local kms``: run the KMS emulator until SIGTERM/SIGINT.

Prints one line, ``kms emulator listening on http://HOST:PORT`` (``https://`` with ``--tls-cert`` and
``--tls-key``), on stdout once it accepts connections (with ``--port 0`` the port is the one the OS
chose). Exit codes: 0 clean shutdown, 2 usage error. See ``docs/kms-emulator.md``.
"""

from __future__ import annotations

import logging
import signal
import ssl
import sys
import threading
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from nitrovault.errors import NitrovaultError


def kms(
    state_dir: Annotated[Path, typer.Option(
        "--state-dir", help="Keys, aliases and policies (created 0700).")],
    root: Annotated[Path, typer.Option(
        "--root", help="PEM root certificate attestation documents must chain to.")],
    principals: Annotated[Path, typer.Option(
        "--principals", help='JSON: {"AKID": {"secret": "...", "arn": "arn:aws:iam::..."}}')],
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to bind (0: any free port).")] = 0,
    region: Annotated[list[str] | None, typer.Option(
        "--region", help="Only accept SigV4 credentials scoped to this region; repeatable (default: any). "
        "Keys are regional either way.")] = None,
    max_document_age: Annotated[int, typer.Option(
        "--max-document-age", help="Seconds an attestation document stays acceptable.")] = 300,
    tls_cert: Annotated[Path | None, typer.Option(
        "--tls-cert", help="Serve HTTPS (TLS 1.2+) with this PEM certificate (chain) ...",
        dir_okay=False)] = None,
    tls_key: Annotated[Path | None, typer.Option(
        "--tls-key", help="... and this PEM private key (nitrovault.local.kms.tls.KmsTls makes both).",
        dir_okay=False)] = None,
    unsafe_allow_debug_attestation: Annotated[bool, typer.Option(
        "--unsafe-allow-debug-attestation",
        help="UNSAFE: accept debug-mode (all-zero PCR0) attestation documents.")] = False,
) -> None:
    """Serve the KMS JSON 1.1 protocol for boto3 clients (endpoint_url=http[s]://HOST:PORT)."""
    from nitrovault.attestation import load_root
    from nitrovault.local.kms import KmsEmulator, load_principals

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if max_document_age <= 0:
        raise typer.BadParameter("must be positive", param_hint="--max-document-age")
    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter("--tls-cert and --tls-key go together", param_hint="--tls-cert")
    context = None
    if tls_cert is not None and tls_key is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(tls_cert, tls_key)
        except (OSError, ssl.SSLError) as exc:
            typer.echo(f"cannot load the TLS certificate and key: {type(exc).__name__}", err=True)
            raise typer.Exit(2) from None
    try:
        root_cert = load_root(root.read_bytes())
        creds = load_principals(principals)
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {exc.filename}: {exc.strerror}") from None
    except NitrovaultError as exc:
        typer.echo(exc.diagnostics(), err=True)
        raise typer.Exit(2) from None
    if unsafe_allow_debug_attestation:
        typer.echo("WARNING: --unsafe-allow-debug-attestation: debug-mode enclaves (all-zero PCRs) are "
                   "accepted; never use this against real key material", err=True)
    try:
        emulator = KmsEmulator(state_dir, root_cert, creds, region or None,
                               max_document_age=timedelta(seconds=max_document_age),
                               unsafe_allow_debug_attestation=unsafe_allow_debug_attestation)
    except NitrovaultError as exc:  # e.g. a state directory of an unknown format
        typer.echo(exc.diagnostics(), err=True)
        raise typer.Exit(2) from None
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        running = emulator.serve(host, port, tls=context)
    except OSError as exc:
        typer.echo(f"cannot listen on {host}:{port}: {exc.strerror}", err=True)
        raise typer.Exit(2) from None
    print(f"kms emulator listening on {running.endpoint_url}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        emulator.shutdown()
