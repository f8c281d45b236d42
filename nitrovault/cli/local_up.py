"""``nitrovault local up``: the local stack end to end (what ``make run`` calls)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nitrovault.local.stack import REPO_ROOT, LocalStack


def up(
    once: Annotated[bool, typer.Option("--once", help="Serve, make the demo call, then stop.")] = False,
    keep_policy: Annotated[
        bool, typer.Option("--keep-policy", help="Do not re-bind the key policy to the current code's PCRs.")
    ] = False,
    home: Annotated[Path, typer.Option(help="Where the local stack keeps its state.")] = REPO_ROOT
    / ".nitrovault",
    listen: Annotated[str, typer.Option(help="The parent's public gRPC address.")] = "127.0.0.1:50051",
    no_isolation: Annotated[
        bool, typer.Option("--no-isolation", help="Run the enclave without its own network namespace.")
    ] = False,
) -> None:
    """Start the KMS emulator, the local NSM, the parent and the enclave; serve the sealed demo model."""
    stack = LocalStack(home, keep_policy=keep_policy, listen=listen, isolate=not no_isolation)
    raise typer.Exit(stack.up(once=once))
