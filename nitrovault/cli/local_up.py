"""``nitrovault local up``: the local stack end to end (what ``make run`` calls).

``--model minilm`` (default) serves the demo MiniLM with the owner's embedding watermark;
``--model digits`` a digits classifier under every model-stealing protection
(:mod:`nitrovault.local.digits`). One home serves one model at a time.

This command owns what is printed: each step of :class:`~nitrovault.local.stack.LocalStack` as it runs
(:class:`RichProgress`), then how to call and check the running enclave. Ctrl-C or SIGTERM stops every
process the stack started; a failed step prints its name and the log folder, and exits 1.
"""

from __future__ import annotations

import enum
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from nitrovault.local.homes import Paths, StackError
from nitrovault.local.models import LocalModel
from nitrovault.local.processes import interrupt_on_sigterm
from nitrovault.local.stack import REPO_ROOT, TLS_SERVER_NAME, LocalStack


class DemoModel(enum.StrEnum):
    minilm = "minilm"
    digits = "digits"


class RichProgress:
    """The stack's steps on a rich console: ▶ as a step starts, ✓ with its duration and notes."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def started(self, step: str) -> None:
        self.console.print(f"[bold cyan]▶[/] {step} …")

    def finished(self, step: str, seconds: float, notes: list[str]) -> None:
        detail = f" — {'; '.join(notes)}" if notes else ""
        self.console.print(f"  [green]✓[/] {step} [dim]({seconds:.2f}s)[/]{detail}")

    def detail(self, line: str) -> None:
        self.console.print(f"    {line}")


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


def print_hints(console: Console, stack: LocalStack) -> None:
    """How to get a token, call the enclave, and check what it answered, against this stack."""
    paths, home, listen, model_id = stack.paths, stack.paths.home, stack.listen, stack.model.model_id
    method = "embed" if stack.model.embeds else "infer"
    trust = f"--pcr-manifest {paths.pcr_manifest} --root {paths.pki / 'root.pem'}"
    console.print(f"get a token: nitrovault token issue --keys-dir {paths.issuer} --subject you "
                  f"--scope {method}:{model_id} --ttl 1h > {home / 'my.token'}")
    if stack.model.embeds:
        console.print(f"call it: nitrovault embed --target {listen} {trust} --token-file {home / 'my.token'} "
                      f"--save-receipt {home / 'receipt.cbor'} --save-response {home / 'response.bin'} "
                      f"--save-request {home / 'request.bin'} --similarity 'some text' 'other text'")
    else:
        console.print(f"call it: nitrovault infer --target {listen} {trust} "
                      f"--token-file {home / 'my.token'} --input x=INPUT.npy")
    console.print(f"check it: nitrovault attest fetch --target {listen} {trust} "
                  f"-o {home / 'attestation.cose'} && nitrovault receipt verify {home / 'receipt.cbor'} "
                  f"--response {home / 'response.bin'} "
                  f"--request {home / 'request.bin'} --attestation {home / 'attestation.cose'} "
                  f"--root {paths.pki / 'root.pem'}")
    console.print(f"other clients: nitrovault attest pin --target {listen} {trust} "
                  f"-o {home / 'enclave.pem'}, "
                  f"then e.g. grpcurl -cacert {home / 'enclave.pem'} -servername {TLS_SERVER_NAME} "
                  f"{listen} grpc.health.v1.Health/Check")
    console.print(f"audit log (one folder per enclave boot): {paths.audit}")


def run(stack: LocalStack, console: Console, *, once: bool) -> int:
    """Start the stack, serve until Ctrl-C / SIGTERM (or just the demo with ``once``), stop everything."""
    total = time.perf_counter()
    with interrupt_on_sigterm():
        try:
            boot = stack.start()
            summary = ", ".join(f"{k.removesuffix('_s')} {v:.2f}s" for k, v in boot.items())
            console.print(f"[bold green]serving[/] sealed {stack.model.model_id} on {stack.listen} — boot: "
                          f"{summary}; whole run {time.perf_counter() - total:.1f}s")
            if once:
                return 0
            print_hints(console, stack)
            console.print("Ctrl-C stops the stack")
            stack.processes.wait_any()
            console.print(f"[bold red]a local process exited[/]; logs: {stack.paths.logs}")
            return 1
        except StackError as err:
            console.print(f"[bold red]✗ {err.step} failed:[/] {err}")
            console.print(f"  logs: {stack.paths.logs}")
            return 1
        except KeyboardInterrupt as stop:
            console.print(f"stopping ({stop or 'Ctrl-C'})")
            return 0
        finally:
            stack.close()


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
    console = Console(highlight=False, soft_wrap=True)
    stack = LocalStack(home, keep_policy=keep_policy, listen=listen, isolate=not no_isolation,
                       model=_model(model, home), progress=RichProgress(console))
    raise typer.Exit(run(stack, console, once=once))
