"""``nitrovault harden`` and ``nitrovault fingerprint identify``: function-preserving hardening of a model
under a secret, per-copy fingerprints, and naming the copy a leaked file came from (docs/hardening.md).

    nitrovault harden model.safetensors --secret owner-harden.key -o copy.safetensors \
        --copy-id eu-west-1 --registry fingerprints.json
    nitrovault fingerprint identify suspect.safetensors --registry fingerprints.json \
        --reference model.safetensors --key-file owner-harden.key

The key file holds the owner's hardening master key (32+ raw bytes or hex, as ``nitrovault watermark
keygen`` writes); each copy's secret is derived from it and the copy id, and the registry records the
copy ids (never a secret or a model). ``harden`` without ``--registry`` hardens under the copy id's
secret and records nothing. ``identify`` exits 0 when a registered copy is named, 1 when none matched,
2 on bad input (an unreadable or corrupt file, another architecture, a suspect with other shapes, a key
or reference that is not the registry's): one line ``error: <message>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from nitrovault.errors import ConfigError
from nitrovault.owner.fingerprint import DEFAULT_THRESHOLD, Registry, copy_secret, identify
from nitrovault.owner.harden import DEFAULT_TRAPS, harden
from nitrovault.owner.model_files import harden_file, read_model, read_tensors, write_model
from nitrovault.watermark.keys import parse_key_file

fingerprint_app = typer.Typer(no_args_is_help=True, help="Name the hardened copy a leaked model came from.")

AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def _error(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _master(path: Path) -> bytes:
    try:
        return parse_key_file(path.read_bytes())
    except (ConfigError, OSError) as err:
        _error(f"{path}: {err}")


def harden_command(
    model: Annotated[Path, typer.Argument(help="A .safetensors model with nitrovault metadata.", exists=True,
                                          dir_okay=False)],
    secret: Annotated[Path, typer.Option("--secret", help="The owner's hardening master key file.",
                                         exists=True, dir_okay=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the hardened copy.")],
    copy_id: Annotated[str, typer.Option("--copy-id", help="This copy's id (deployment, region, customer).")]
    = "default",
    registry: Annotated[Path | None, typer.Option(
        "--registry", help="Record the copy in this registry (created for a first copy).", dir_okay=False)]
    = None,
    traps: Annotated[int | None, typer.Option(
        "--traps", help=f"Trap units per FFN layer (a new registry's; default {DEFAULT_TRAPS}; an existing "
        "registry's own).")] = None,
    value_mark: Annotated[float | None, typer.Option(
        "--value-mark", help="Also mark each copy's values with this strength (a new registry's; default "
        "0: none; an existing registry's own). Not function preserving; the one trace that survives "
        "re-alignment to the base.")] = None,
    as_json: AsJson = False,
) -> None:
    """Harden a model: a secret permutation of units and heads, positive rescaling and trap units; the
    same function (docs/hardening.md)."""
    master = _master(secret)
    if output.resolve() == model.resolve():
        _error("the output must not be the input model")
    try:
        if registry is not None:
            report, reg = harden_file(model, output, master, copy_id, registry, traps=traps,
                                      value_strength=value_mark)
            copies, strength = len(reg.copies), reg.value_strength
        else:
            if value_mark:
                raise ConfigError("--value-mark needs --registry (identify reads its strength there)")
            reference, dtypes = read_model(model)
            hardened, report = harden(reference, copy_secret(master, copy_id),
                                      traps=DEFAULT_TRAPS if traps is None else traps)
            write_model(hardened, output, dtypes)
            copies, strength = 0, 0.0
    except (ConfigError, OSError) as err:
        _error(str(err))
    summary = {**report.as_dict(), "copy_id": copy_id, "output": str(output), "value_mark": strength,
               "registry": None if registry is None else str(registry), "registered_copies": copies}
    if as_json:
        typer.echo(json.dumps(summary, sort_keys=True))
    else:
        typer.echo(f"hardened {report.architecture} copy {copy_id!r}: {report.permuted_units} units in "
                   f"{report.groups} groups permuted, {report.rescaled_groups} groups rescaled, "
                   f"{report.trap_units} trap units"
                   + (f", value mark strength {strength:g}" if strength else " (same function)")
                   + f" -> {output}")


@fingerprint_app.command("identify")
def identify_command(
    suspect: Annotated[Path, typer.Argument(help="The suspect .safetensors file.", exists=True,
                                            dir_okay=False)],
    registry: Annotated[Path, typer.Option("--registry", help="The owner's fingerprint registry.",
                                           exists=True, dir_okay=False)],
    reference: Annotated[Path, typer.Option("--reference", help="The original model the copies came from.",
                                            exists=True, dir_okay=False)],
    key_file: Annotated[Path, typer.Option("--key-file", help="The hardening master key file.",
                                           exists=True, dir_okay=False)],
    threshold: Annotated[float, typer.Option("--threshold", help="Largest corrected p-value that names a "
                                             "copy.")] = DEFAULT_THRESHOLD,
    as_json: AsJson = False,
) -> None:
    """Name the registered copy ``SUSPECT`` came from, with its p-value (corrected for every copy tested);
    exit 0 named, 1 none matched, 2 bad input."""
    master = _master(key_file)
    try:
        reg = Registry.load(registry)
        original, _ = read_model(reference)
        # only the suspect's tensors: a leaked file need not keep our metadata (its shapes are checked)
        result = identify(read_tensors(suspect), original, reg, master, threshold=threshold)
    except (ConfigError, OSError) as err:
        _error(str(err))
    if as_json:
        typer.echo(json.dumps(result.as_dict(), sort_keys=True))
    elif result.copy_id is not None:
        best = min(result.scores, key=lambda s: s.p_value)
        typer.echo(f"IDENTIFIED copy {result.copy_id!r}: p = {result.p_value:.3g} over {len(result.scores)} "
                   f"copies ({best.order_agreeing}/{result.units} units in the copy's order, "
                   f"{best.traps_found}/{best.traps} traps found"
                   + (f", value mark p = {best.values_p:.3g})" if reg.value_strength else ")"))
    else:
        typer.echo(f"no copy matched: smallest p = {result.p_value:.3g} over {len(result.scores)} copies "
                   f"(threshold {threshold:g})")
    raise typer.Exit(0 if result.copy_id is not None else 1)
