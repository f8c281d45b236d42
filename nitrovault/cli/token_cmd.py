"""``nitrovault token ...``: issuer keys and bearer tokens for the local stack.

Production tokens come from the owner's own issuer; these commands make a local one whose public keys
(``DIR/jwks.json``) are baked into the local enclave config. The token is printed on stdout and nowhere else.
``--ttl`` is at most the enclave's default ``access.max_token_lifetime_s`` (one day, the local stack's
value): a longer token would only be refused by the enclave (audit reason ``lifetime``), so it is a usage
error here.

    nitrovault token keygen --keys-dir .nitrovault/issuer
    nitrovault token issue --subject alice --scope embed:all-minilm-l6-v2 --ttl 1h --tier free
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer

from nitrovault.access.tokens import DEFAULT_MAX_LIFETIME_S
from nitrovault.errors import ConfigError
from nitrovault.owner.issuer import LOCAL_AUDIENCE, LOCAL_ISSUER, generate_issuer_keys, load_issuer

app = typer.Typer(no_args_is_help=True, help="Issuer keys and bearer tokens for the local stack.")

DEFAULT_KEYS_DIR = Path(".nitrovault/issuer")
_TTL = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

KeysDir = Annotated[Path, typer.Option("--keys-dir", envvar="NITROVAULT_ISSUER_KEYS", file_okay=False,
                                       help="Local issuer key directory (created on first use).")]


def parse_ttl(text: str, *, max_seconds: int = DEFAULT_MAX_LIFETIME_S) -> timedelta:
    """``90``, ``45s``, ``30m``, ``1h``, ``1d`` -> timedelta (positive, at most ``max_seconds``)."""
    match = _TTL.match(text.strip())
    if not match or int(match.group(1)) <= 0:
        raise typer.BadParameter(f"not a duration like 30m, 1h or 1d: {text!r}", param_hint="--ttl")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds > max_seconds:  # checked before timedelta(), which overflows on absurd values
        raise typer.BadParameter(
            f"{text!r} is longer than the enclave's access.max_token_lifetime_s ({max_seconds} s); "
            "the enclave would refuse the token", param_hint="--ttl")
    return timedelta(seconds=seconds)


@app.command()
def keygen(
    keys_dir: KeysDir = DEFAULT_KEYS_DIR,
    issuer: Annotated[str, typer.Option(help="The iss claim the enclave config expects.")] = LOCAL_ISSUER,
    audience: Annotated[str, typer.Option(help="The aud claim the enclave config expects.")] = LOCAL_AUDIENCE,
    rotate: Annotated[bool, typer.Option(
        help="Make a new signing key; keep old public keys in the JWKS.")] = False,
) -> None:
    """Create (or keep) the local issuer key; print the path of the JWKS to bake into the enclave config."""
    _, jwks = generate_issuer_keys(keys_dir, issuer=issuer, audience=audience, rotate=rotate)
    typer.echo(str(jwks))


@app.command()
def issue(
    subject: Annotated[str, typer.Option("--subject", help="The sub claim: who the token speaks for.")],
    scope: Annotated[list[str] | None, typer.Option(
        "--scope", help="Repeatable: infer:<model>, embed:<model>, generate:<model>, or <action>:*; "
                        "info, attest.")] = None,
    ttl: Annotated[str, typer.Option("--ttl", help="Lifetime: 90, 45s, 30m, 1h, 1d (at most 1d).")] = "1h",
    tier: Annotated[str | None, typer.Option("--tier", help="Quota tier claim (default: config's).")] = None,
    keys_dir: KeysDir = DEFAULT_KEYS_DIR,
) -> None:
    """Print a signed token (creating the local issuer key on first use)."""
    lifetime = parse_ttl(ttl)
    generate_issuer_keys(keys_dir)
    try:
        token = load_issuer(keys_dir).issue(subject, scope or [], lifetime, tier=tier)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(token)
