"""``nitrovault attest ...`` (placeholder: filled in by the attestation work)."""

import typer

app = typer.Typer(no_args_is_help=True)
