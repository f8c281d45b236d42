"""``nitrovault seal`` and ``nitrovault inspect``: the owner's side of the sealed model format.

``seal`` asks KMS for a data key (GenerateDataKey on ``--key-id`` with the encryption context), seals
the safetensors file with it, zeroes the plaintext key and prints the sealed digest (SHA-256 of the
header; pin it in the enclave config). ``--data-key-file/--wrapped-key-file`` seal offline with a key
the owner already holds (tests, CI, air-gapped sealing): no check is skipped, so it is not ``unsafe_``.

``inspect`` prints only what is not secret: the plain header. Tensor names, shapes and dtypes are
encrypted and never printed. Exit codes: 0 ok, 1 a check failed (invalid sealed file, KMS refused),
2 usage error.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from nitrovault.envelope import DEFAULT_CHUNK_SIZE, SealedHeader, SealedModel, seal_file, zeroize
from nitrovault.errors import ConfigError, KeyReleaseError, NitrovaultError

_err = Console(stderr=True)


def _parse_context(pairs: list[str]) -> dict[str, str]:
    context: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--context")
        if key in context:
            raise typer.BadParameter(f"duplicate key {key!r}", param_hint="--context")
        context[key] = value
    return context


def _read_key_file(path: Path) -> bytearray:
    buf = bytearray(path.stat().st_size)
    with open(path, "rb", buffering=0) as f:
        n = f.readinto(buf)
    if n != len(buf) or len(buf) != 32:
        zeroize(buf)
        raise typer.BadParameter("must hold exactly 32 raw bytes", param_hint="--data-key-file")
    return buf


def _kms_data_key(
    key_id: str, context: dict[str, str], region: str | None, endpoint: str | None
) -> tuple[bytearray, bytes, str]:
    """GenerateDataKey; returns (plaintext key as a bytearray the caller zeroes, blob, key ARN)."""
    from nitrovault.kms import KmsClient, kms_client_from_env  # lazy: only the online path needs KMS

    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        raise typer.BadParameter("no region: pass --region or set AWS_REGION", param_hint="--region")
    kms = KmsClient(kms_client_from_env(region, endpoint_url=endpoint))
    dk = kms.generate_data_key(key_id, encryption_context=context, number_of_bytes=32)
    plaintext: Any = dk.plaintext
    if isinstance(plaintext, bytearray):
        return plaintext, bytes(dk.ciphertext_blob), str(dk.key_id)  # zeroing it zeroes KMS's copy
    if not isinstance(plaintext, bytes):
        raise KeyReleaseError("KMS GenerateDataKey answer has no plaintext data key")
    return bytearray(plaintext), bytes(dk.ciphertext_blob), str(dk.key_id)


def _header_summary(header: SealedHeader, path: Path) -> dict[str, Any]:
    return {
        "path": str(path),
        "version": header.version,
        "key_id": header.key_id,
        "encryption_context": dict(header.encryption_context),
        "wrapped_key_b64": base64.b64encode(header.wrapped_key).decode(),
        "header_size": header.header_length,
        "sealed_size": header.sealed_size,
        "payload_size": header.payload_size,
        "chunk_size": header.chunk_size,
        "chunk_count": header.chunk_count,
        "metadata_chunks": header.metadata_chunks,
        "digest": header.digest.hex(),
    }


def seal(
    model: Annotated[Path, typer.Argument(help="A .safetensors model.", exists=True, dir_okay=False)],
    key_id: Annotated[str, typer.Option("--key-id", help="KMS key id, ARN or alias of the model key.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the sealed model.")],
    context: Annotated[
        list[str] | None,
        typer.Option("--context", help="Encryption context pair KEY=VALUE (repeatable)."),
    ] = None,
    kms_endpoint: Annotated[str | None, typer.Option("--kms-endpoint", help="KMS endpoint URL.")] = None,
    region: Annotated[str | None, typer.Option("--region", help="AWS region of the key.")] = None,
    data_key_file: Annotated[
        Path | None, typer.Option("--data-key-file", help="Offline: 32 raw bytes of data key.")
    ] = None,
    wrapped_key_file: Annotated[
        Path | None, typer.Option("--wrapped-key-file", help="Offline: the KMS CiphertextBlob of that key.")
    ] = None,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="Plaintext bytes per chunk.")] = (
        DEFAULT_CHUNK_SIZE
    ),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Seal a safetensors model under a fresh KMS data key and print its digest."""
    ctx = _parse_context(context or [])
    if (data_key_file is None) != (wrapped_key_file is None):
        raise typer.BadParameter("--data-key-file and --wrapped-key-file go together")
    try:
        if data_key_file is not None and wrapped_key_file is not None:
            data_key = _read_key_file(data_key_file)
            wrapped, stored_key_id = wrapped_key_file.read_bytes(), key_id
        else:
            data_key, wrapped, stored_key_id = _kms_data_key(key_id, ctx, region, kms_endpoint)
    except NitrovaultError as exc:
        _err.print(exc.diagnostics(), markup=False, highlight=False)
        raise typer.Exit(1) from None
    try:
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=_err,
            disable=quiet,
        ) as bar:
            task = bar.add_task("sealing", total=model.stat().st_size)
            header = seal_file(
                model,
                output,
                data_key=data_key,
                wrapped_key=wrapped,
                key_id=stored_key_id,
                encryption_context=ctx,
                chunk_size=chunk_size,
                progress=lambda n: bar.advance(task, n),
            )
            bar.update(task, completed=model.stat().st_size)
    except ConfigError as exc:
        _err.print(exc.diagnostics(), markup=False, highlight=False)
        raise typer.Exit(2) from None
    finally:
        zeroize(data_key)
    typer.echo(header.digest.hex())


def inspect(
    sealed: Annotated[Path, typer.Argument(help="A sealed model.", exists=True, dir_okay=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Print the public header of a sealed model (never tensor names: they are encrypted)."""
    try:
        header = SealedModel.open(sealed).header
    except NitrovaultError as exc:
        _err.print(exc.diagnostics(), markup=False, highlight=False)
        raise typer.Exit(1) from None
    summary = _header_summary(header, sealed)
    if as_json:
        typer.echo(json.dumps(summary, sort_keys=True))
        return
    summary["wrapped_key"] = f"{len(header.wrapped_key)} bytes"
    del summary["wrapped_key_b64"]
    summary["encryption_context"] = ", ".join(f"{k}={v}" for k, v in header.encryption_context.items())
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        typer.echo(f"{key:<{width}}  {value}")
