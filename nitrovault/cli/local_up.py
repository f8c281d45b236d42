"""``nitrovault local up``: the local stack end to end (what ``make run`` calls).

``--model minilm`` (default) serves the demo MiniLM with the owner's embedding watermark;
``--model digits`` a digits classifier under every model-stealing protection
(:mod:`nitrovault.local.digits`). One home serves one model at a time.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from nitrovault.local.homes import Paths
from nitrovault.local.models import LocalModel
from nitrovault.local.stack import REPO_ROOT, LocalStack


class DemoModel(enum.StrEnum):
    minilm = "minilm"
    digits = "digits"


def _model(choice: DemoModel, home: Path) -> LocalModel | None:
    if choice is DemoModel.minilm:
        return None  # the stack's default, built lazily
    from nitrovault.local.digits import (
        DIGITS_HANDLER,
        DIGITS_ID,
        DIGITS_PROTECTION,
        DIGITS_VERSION,
        digits_demo,
        write_digits_weights,
    )

    weights = write_digits_weights(Paths(home).plain / f"{DIGITS_ID}.safetensors")
    return LocalModel(DIGITS_ID, DIGITS_VERSION, DIGITS_HANDLER, weights, protection=DIGITS_PROTECTION,
                      demo_call=digits_demo)


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
    model: Annotated[DemoModel, typer.Option("--model", help="The demo model to serve.")] = DemoModel.minilm,
) -> None:
    """Start the KMS emulator, the local NSM, the parent and the enclave; serve the sealed demo model."""
    stack = LocalStack(home, keep_policy=keep_policy, listen=listen, isolate=not no_isolation,
                       model=_model(model, home))
    raise typer.Exit(stack.up(once=once))
