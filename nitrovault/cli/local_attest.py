"""``nitrovault local attest``: write a local attestation document signed by the fake Nitro PKI.

The PKI is created in ``--pki-dir`` on first use; its root is ``DIR/root.pem`` (what other commands take
as ``--root``). PCR0/1/2 are measured from this checkout (``nitrovault.local.measure``); ``--pcr N=HEX``
sets PCR N (0..15) and overrides a measured value. Exit codes: 0 written, 2 usage error.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

import nitrovault
from nitrovault.cli.times import AT_FORMAT, parse_at
from nitrovault.clock import utc_now
from nitrovault.errors import NitrovaultError
from nitrovault.local.measure import default_lock_file, measure_enclave
from nitrovault.local.nsm import DEFAULT_MODULE_ID, PCR_LEN, make_local_nsm
from nitrovault.nsm import MAX_AUX_LEN


def _parse_pcr(spec: str) -> tuple[int, bytes]:
    index_text, sep, hex_text = spec.partition("=")
    if not sep:
        raise typer.BadParameter(f"{spec!r} is not N=HEX", param_hint="--pcr")
    try:
        index = int(index_text)
        value = bytes.fromhex(hex_text)
    except ValueError:
        raise typer.BadParameter(f"{spec!r} is not N=HEX", param_hint="--pcr") from None
    if not 0 <= index < 16:
        raise typer.BadParameter(f"PCR index {index} is outside 0..15", param_hint="--pcr")
    if len(value) != PCR_LEN:
        raise typer.BadParameter(f"PCR{index} must be {PCR_LEN} bytes, got {len(value)}", param_hint="--pcr")
    return index, value


def _read_aux(path: Path, option: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror}", param_hint=option) from None
    if len(data) > MAX_AUX_LEN:
        raise typer.BadParameter(f"{path} is {len(data)} bytes; at most {MAX_AUX_LEN}", param_hint=option)
    return data


def repo_root() -> Path:
    """The checkout this CLI runs from: the parent of the ``nitrovault`` package directory."""
    return Path(nitrovault.__file__).resolve().parent.parent


def attest(
    pki_dir: Annotated[Path, typer.Option("--pki-dir", help="Local PKI directory (created on first use).")],
    public_key_file: Annotated[Path, typer.Option("--public-key-file",
                                                  help="DER public key to embed (public_key).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the raw COSE document.")],
    pcr: Annotated[list[str] | None,
                   typer.Option("--pcr", metavar="N=HEX", help="Set PCR N (0..15); repeatable.")] = None,
    user_data_file: Annotated[Path | None, typer.Option("--user-data-file", help="user_data bytes.")] = None,
    nonce: Annotated[str | None, typer.Option("--nonce", metavar="HEX", help="Nonce, hex.")] = None,
    module_id: Annotated[str, typer.Option("--module-id",
                                           help="Module id (i-...-enc...).")] = DEFAULT_MODULE_ID,
    at: Annotated[str | None, typer.Option("--at", help=f"Document time, {AT_FORMAT} "
                                                        "(default: now).")] = None,
) -> None:
    """Write a local attestation document (real COSE_Sign1 format) signed by the fake Nitro PKI."""
    overrides = dict(_parse_pcr(spec) for spec in pcr or [])
    public_key = _read_aux(public_key_file, "--public-key-file")
    user_data = _read_aux(user_data_file, "--user-data-file") if user_data_file is not None else None
    nonce_bytes: bytes | None = None
    if nonce is not None:
        try:
            nonce_bytes = bytes.fromhex(nonce)
        except ValueError:
            raise typer.BadParameter("not hex", param_hint="--nonce") from None
        if len(nonce_bytes) > MAX_AUX_LEN:
            raise typer.BadParameter(f"at most {MAX_AUX_LEN} bytes", param_hint="--nonce")
    clock = utc_now
    if at is not None:
        pinned = parse_at(at)

        def clock() -> datetime:
            return pinned

    pcrs: dict[int, bytes] = {}
    if not {0, 1, 2} <= overrides.keys():
        root = repo_root()
        pcrs = measure_enclave(root, default_lock_file(root)).as_pcrs()
    pcrs.update(overrides)
    try:
        nsm = make_local_nsm(pki_dir, pcrs, module_id=module_id, clock=clock)
        document = nsm.attestation(user_data=user_data, nonce=nonce_bytes, public_key=public_key)
    except NitrovaultError as exc:
        typer.echo(exc.diagnostics(), err=True)
        raise typer.Exit(2) from None
    try:
        output.write_bytes(document)
    except OSError as exc:
        typer.echo(f"cannot write {output}: {exc.strerror}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {output} ({len(document)} bytes); root {pki_dir / 'root.pem'}", err=True)
