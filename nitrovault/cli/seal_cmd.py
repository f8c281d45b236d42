"""``nitrovault seal`` and ``nitrovault inspect``: the owner's side of the sealed model format.

``seal`` asks KMS for a data key (GenerateDataKey on ``--key-id`` with the encryption context), seals
the safetensors file with it, zeroes the plaintext key and prints the sealed digest (SHA-256 of the
header; pin it in the enclave config). ``--data-key-file/--wrapped-key-file`` seal offline with a key
the owner already holds (tests, CI, air-gapped sealing): no check is skipped, so it is not ``unsafe_``.

Extras released with the model key (``nitrovault.envelope.extras``): ``--watermark-key`` puts the owner's
watermark secret into the sealed metadata (the enclave derives its output-watermark keys from it),
``--watermark-candidates`` the embedding mark's candidate words, ``--reference`` (a ``.npy`` array of
natural inputs) the extraction detector's coverage reference. The plaintext copy they need lives in a
private temporary folder next to the output and is removed after sealing. ``--harden-key`` with
``--copy-id`` and ``--registry`` seals a hardened copy instead (a per-copy fingerprint,
:mod:`nitrovault.owner.fingerprint`), recorded in the owner's registry before it is sealed.

Every sealed model carries the enclave fleet's **TLS identity** (``nitrovault.identity``): TLS ends inside
the enclave with it. By default a fresh self-signed one for ``--tls-name`` (its private key then exists
only inside the sealed file, so only attested enclaves ever hold it); ``--tls-key``/``--tls-chain`` seal
an owner-supplied key and certificate chain (for example from the owner's CA) instead. A model whose
metadata already holds an identity keeps it. The certificate chain (public) is written next to the
output as ``OUTPUT.tls.pem``; its fingerprint goes to stderr, the digest alone to stdout.

``inspect`` prints only what is not secret: the plain header. Tensor names, shapes and dtypes are
encrypted and never printed. Exit codes: 0 ok, 1 a check failed (invalid sealed file, KMS refused),
2 usage error.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from nitrovault.clock import utc_now
from nitrovault.envelope import DEFAULT_CHUNK_SIZE, SealedHeader, SealedModel, seal_file, zeroize
from nitrovault.envelope.extras import (
    REFERENCE_TENSOR,
    STATE_STORE_PASSWORD_KEY,
    WATERMARK_CANDIDATES_KEY,
    WATERMARK_SECRET_KEY,
    read_header,
    with_extras,
)
from nitrovault.errors import ConfigError, KeyReleaseError, NitrovaultError, TlsIdentityError
from nitrovault.identity import DEFAULT_SERVER_NAME, SEALED_KEY, TlsIdentity

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
        "key_committing": header.version >= 2,
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
    watermark_key: Annotated[
        Path | None, typer.Option("--watermark-key", help="Owner watermark key file (sealed with the model).",
                                  exists=True, dir_okay=False)
    ] = None,
    watermark_candidates: Annotated[
        Path | None, typer.Option("--watermark-candidates", help="Embedding-mark candidate words.",
                                  exists=True, dir_okay=False)
    ] = None,
    reference: Annotated[
        Path | None, typer.Option("--reference", help="Extraction reference sample (.npy).",
                                  exists=True, dir_okay=False)
    ] = None,
    tls_name: Annotated[str, typer.Option(
        "--tls-name", help="DNS name of the self-signed TLS identity made for the enclaves.")] = (
        DEFAULT_SERVER_NAME),
    tls_key: Annotated[Path | None, typer.Option(
        "--tls-key", help="Owner-supplied TLS private key (PEM) instead of a fresh one.", exists=True,
        dir_okay=False)] = None,
    tls_chain: Annotated[Path | None, typer.Option(
        "--tls-chain", help="Its certificate chain (PEM, leaf first).", exists=True, dir_okay=False)] = None,
    state_store_password_file: Annotated[Path | None, typer.Option(
        "--state-store-password-file", help="The shared state store user's password (sealed with the "
        "model: only attested enclaves can authenticate to the store).", exists=True,
        dir_okay=False)] = None,
    harden_key: Annotated[Path | None, typer.Option(
        "--harden-key", help="Harden this copy first (docs/hardening.md): the owner's hardening master key "
        "file; with --copy-id and --registry.", exists=True, dir_okay=False)] = None,
    copy_id: Annotated[str | None, typer.Option(
        "--copy-id", help="The hardened copy's id (deployment, region, customer).")] = None,
    registry: Annotated[Path | None, typer.Option(
        "--registry", help="The fingerprint registry the copy is recorded in (created for a first copy).",
        dir_okay=False)] = None,
) -> None:
    """Seal a safetensors model under a fresh KMS data key and print its digest."""
    with _maybe_hardened(model, output, harden_key, copy_id, registry) as model:
        ctx = _parse_context(context or [])
        try:
            extras = _extras(watermark_key, watermark_candidates, reference)
            if state_store_password_file is not None:
                extras[0][STATE_STORE_PASSWORD_KEY] = _store_password(state_store_password_file)
            identity = _tls_identity(model, tls_name, tls_key, tls_chain)
        except (ConfigError, TlsIdentityError, OSError, ValueError) as exc:
            _err.print(f"extras: {exc}", markup=False, highlight=False)
            raise typer.Exit(2) from None
        if identity is not None:
            extras[0].update(identity.sealed_metadata())
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
            with _prepared(model, output, extras) as source, Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=_err,
                disable=quiet,
            ) as bar:
                task = bar.add_task("sealing", total=source.stat().st_size)
                header = seal_file(
                    source,
                    output,
                    data_key=data_key,
                    wrapped_key=wrapped,
                    key_id=stored_key_id,
                    encryption_context=ctx,
                    chunk_size=chunk_size,
                    progress=lambda n: bar.advance(task, n),
                )
                bar.update(task, completed=source.stat().st_size)
        except ConfigError as exc:
            _err.print(exc.diagnostics(), markup=False, highlight=False)
            raise typer.Exit(2) from None
        finally:
            zeroize(data_key)
        if identity is not None:
            certificate = output.with_name(output.name + ".tls.pem")
            certificate.write_bytes(identity.chain_pem)
            _err.print(f"TLS identity {identity.server_name}, certificate SHA-256 {identity.fingerprint} "
                       f"-> {certificate}", markup=False, highlight=False)
        typer.echo(header.digest.hex())


@contextlib.contextmanager
def _maybe_hardened(model: Path, output: Path, key: Path | None, copy_id: str | None,
                    registry: Path | None) -> Iterator[Path]:
    """``model`` itself, or its hardened copy ``copy_id`` (recorded in ``registry``) in a private temporary
    folder next to the output, removed after sealing."""
    if key is None:
        if copy_id is not None or registry is not None:
            raise typer.BadParameter("--copy-id and --registry go with --harden-key")
        yield model
        return
    if copy_id is None or registry is None:
        raise typer.BadParameter("--harden-key needs --copy-id and --registry")
    from nitrovault.owner.model_files import harden_file
    from nitrovault.watermark.keys import parse_key_file

    with tempfile.TemporaryDirectory(dir=output.resolve().parent, prefix=".nitrovault-harden-") as tmp:
        hardened = Path(tmp) / "hardened.safetensors"
        try:
            report, _ = harden_file(model, hardened, parse_key_file(key.read_bytes()), copy_id, registry)
        except (ConfigError, OSError) as exc:
            _err.print(f"harden: {exc}", markup=False, highlight=False)
            raise typer.Exit(2) from None
        _err.print(f"hardened copy {copy_id!r}: {report.permuted_units} units permuted, {report.trap_units} "
                   f"trap units; recorded in {registry}", markup=False, highlight=False)
        yield hardened


def _tls_identity(model: Path, name: str, key: Path | None, chain: Path | None) -> TlsIdentity | None:
    """The identity to seal: the owner's, a fresh self-signed one, or None when the model has one."""
    if (key is None) != (chain is None):
        raise ConfigError("--tls-key and --tls-chain go together")
    if key is not None and chain is not None:
        return TlsIdentity.from_pem(key.read_bytes(), chain.read_bytes())
    if SEALED_KEY in read_header(model)[0].get("__metadata__", {}):
        return None
    return TlsIdentity.generate(name, now=utc_now())


def _store_password(path: Path) -> str:
    """The password file's one line (printable ASCII, 16 to 128 characters: ElastiCache's rules)."""
    try:
        password = path.read_bytes().decode("ascii").strip()
    except UnicodeDecodeError:  # the decoder's message would echo a byte of the secret
        password = ""
    if not 16 <= len(password) <= 128 or not password.isascii() or not password.isprintable() or (
            any(c in password for c in " \"@/")):
        raise ConfigError("the state store password must be 16-128 printable ASCII characters without "
                          "spaces, quotes, '@' or '/'")
    return password


def _extras(key_file: Path | None, candidates: Path | None,
            reference: Path | None) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(metadata, tensors) to add before sealing; the secret is only ever in memory and in the sealed file."""
    from nitrovault.watermark.keys import parse_key_file

    metadata: dict[str, str] = {}
    tensors: dict[str, np.ndarray] = {}
    if key_file is not None:
        metadata[WATERMARK_SECRET_KEY] = parse_key_file(key_file.read_bytes()).hex()
    if candidates is not None:
        words = candidates.read_text().split()
        if len(words) < 2:
            raise ConfigError("the candidate words file holds fewer than 2 words")
        metadata[WATERMARK_CANDIDATES_KEY] = json.dumps(words)
    if reference is not None:
        array = np.load(reference, allow_pickle=False)
        if array.ndim < 2 or array.shape[0] < 2 or array.dtype.kind != "f":
            raise ConfigError("the reference sample must be a float array [n >= 2, ...]")
        tensors[REFERENCE_TENSOR] = array
    return metadata, tensors


@contextlib.contextmanager
def _prepared(model: Path, output: Path,
              extras: tuple[dict[str, str], dict[str, np.ndarray]]) -> Iterator[Path]:
    """``model`` itself, or a private temporary copy with the extras added (removed afterwards)."""
    metadata, tensors = extras
    if not metadata and not tensors:
        yield model
        return
    with tempfile.TemporaryDirectory(dir=output.resolve().parent, prefix=".nitrovault-seal-") as tmp:
        prepared = Path(tmp) / "model.safetensors"  # mkdtemp makes the folder 0700
        with_extras(model, prepared, metadata=metadata, tensors=tensors)
        yield prepared


def inspect(
    sealed: Annotated[Path, typer.Argument(help="A sealed model.", exists=True, dir_okay=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Print the public header of a sealed model (never tensor names: they are encrypted)."""
    try:
        header = SealedModel.open(sealed, allow_legacy_v1=True).header  # shown, marked as legacy
    except NitrovaultError as exc:
        _err.print(exc.diagnostics(), markup=False, highlight=False)
        raise typer.Exit(1) from None
    summary = _header_summary(header, sealed)
    if header.version == 1:
        _err.print("legacy sealed format version 1: not key-committing, enclaves refuse it; re-seal it",
                   markup=False, highlight=False)
    if as_json:
        typer.echo(json.dumps(summary, sort_keys=True))
        return
    summary["wrapped_key"] = f"{len(header.wrapped_key)} bytes"
    del summary["wrapped_key_b64"]
    summary["encryption_context"] = ", ".join(f"{k}={v}" for k, v in header.encryption_context.items())
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        typer.echo(f"{key:<{width}}  {value}")
