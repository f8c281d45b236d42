"""``nitrovault local up``: the local stack end to end (what ``make run`` calls).

``--model minilm`` (default) serves the demo MiniLM with the owner's embedding watermark;
``--model digits`` a digits classifier under every model-stealing protection
(:mod:`nitrovault.local.digits`); ``--model lm`` a small GPT-2 streaming watermarked text
(:mod:`nitrovault.local.lm_demo`); ``--model PATH`` your own model folder or safetensors file
(:mod:`nitrovault.local.own_model`, checked against the enclave's handler before anything is sealed).
``--weights dynamic`` serves any of them with the blocks' weights encrypted in enclave memory between
uses (docs/dynamic-weights.md). One home serves one model at a time.

This command owns what is printed: each step of :class:`~nitrovault.local.stack.LocalStack` as it runs
(:class:`RichProgress`), then how to call and check the running enclave. Ctrl-C or SIGTERM stops every
process the stack started; a failed step prints its name and the log folder, and exits 1.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from nitrovault.local.homes import Paths, StackError
from nitrovault.local.models import LocalModel, describe_protection
from nitrovault.local.processes import interrupt_on_sigterm
from nitrovault.local.stack import REPO_ROOT, TLS_SERVER_NAME, LocalStack, Steps

#: the demo models ``--model`` names; anything else is a path (a folder named like one: ``./lm``)
DEMOS = ("minilm", "digits", "lm")


class WeightMode(StrEnum):
    """``--weights``: the measured config's ``protection.weights.mode``."""

    resident = "resident"
    dynamic = "dynamic"


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


def _model(choice: str, home: Path, handler: str | None, steps: Steps) -> LocalModel | None:
    """The served model: a demo by name (built here, before the stack starts) or the model at a path."""
    paths = Paths(home)
    if choice not in DEMOS:
        from nitrovault.local.own_model import model_from_path

        with steps.step(f"check {choice} loads in the enclave's handler") as note:
            model = model_from_path(paths, Path(choice), handler)
            note(f"{model.model_id}: {model.handler}, protection: {describe_protection(model.protection)}")
        return model
    if handler is not None:
        raise StackError("model", f"--handler is for a model at a path; the {choice} demo names its own")
    if choice == "minilm":
        return None  # the stack's default, built lazily
    if choice == "lm":
        from nitrovault.local.lm_demo import lm_model
        from nitrovault.local.tiny_lm import DEMO, ensure_tiny_lm, project_corpus, repo_root

        with steps.step("demo LM (trained once on the project's docs, ~2 min on 2 cores)") as note:
            folder = ensure_tiny_lm(paths.lm_cache, project_corpus(repo_root()), DEMO)
            record = json.loads((folder / "nitrovault-training.json").read_text(encoding="utf-8"))
            note(f"GPT-2, {record['parameters'] / 1e6:.2f} M parameters, held-out perplexity "
                 f"{record['held_out_perplexity']:.0f} (vocabulary {record['tokenizer_vocab']}); {folder}")
        return lm_model(paths, folder)
    from nitrovault.local.digits import (
        DIGITS_HANDLER,
        DIGITS_ID,
        DIGITS_PROTECTION,
        DIGITS_VERSION,
        digits_demo,
        write_digits_weights,
    )

    weights = write_digits_weights(paths.plain / f"{DIGITS_ID}.safetensors")
    return LocalModel(DIGITS_ID, DIGITS_VERSION, DIGITS_HANDLER, weights, protection=DIGITS_PROTECTION,
                      demo_call=digits_demo)


def print_hints(console: Console, stack: LocalStack) -> None:
    """How to get a token, call the enclave, and check what it answered, against this stack."""
    paths, home, listen, model_id = stack.paths, stack.paths.home, stack.listen, stack.model.model_id
    method = stack.model.method
    trust = f"--pcr-manifest {paths.pcr_manifest} --root {paths.pki / 'root.pem'}"
    console.print(f"get a token: nitrovault token issue --keys-dir {paths.issuer} --subject you "
                  f"--scope {method}:{model_id} --ttl 1h > {home / 'my.token'}")
    saves = (f"--save-receipt {home / 'receipt.cbor'} --save-response {home / 'response.bin'} "
             f"--save-request {home / 'request.bin'}")
    call = f"--target {listen} {trust} --token-file {home / 'my.token'}"
    if method == "infer":
        console.print(f"call it: nitrovault infer {call} --input x=INPUT.npy")
    else:
        what = "--similarity 'some text' 'other text'" if method == "embed" else "-n 64 -t 0.8 'The enclave'"
        console.print(f"call it: nitrovault {method} {call} {saves} {what}")
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
    console.print(f"metrics: curl http://127.0.0.1:{stack.metrics_port}/metrics; health: curl "
                  f"http://127.0.0.1:{stack.health_port}/health; drain: kill -TERM "
                  f"{' '.join(map(str, stack.parent_pids())) or '<parent pid>'}")


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
    model: Annotated[str, typer.Option("--model", help=(
        "What to serve: a demo (minilm, digits, lm) or the path of your own model: a sentence-transformers "
        "or causal-LM folder, or a .safetensors file (with --handler)."))] = "minilm",
    handler: Annotated[str | None, typer.Option("--handler", help=(
        "The enclave handler for a model at a path, e.g. generic:mlp-classifier (default: from its "
        "files)."))] = None,
    weights: Annotated[WeightMode, typer.Option("--weights", help=(
        "resident: every tensor plaintext in enclave memory; dynamic: the blocks' weights stay encrypted "
        "in memory and are decrypted one block at a time per forward pass (docs/dynamic-weights.md)."))]
        = WeightMode.resident,
    enclaves: Annotated[int, typer.Option("--enclaves", min=1, max=4, help=(
        "Enclaves the parent runs (CIDs 16, 17, ...); the relay spreads clients across those serving."))]
        = 1,
) -> None:
    """Start the KMS emulator, the local NSM, the parent and the enclave(s); serve the sealed model."""
    console = Console(highlight=False, soft_wrap=True)
    progress = RichProgress(console)
    try:
        served = _model(model, home, handler, Steps(progress))
    except StackError as err:
        console.print(f"[bold red]✗ {err.step} failed:[/] {err}")
        raise typer.Exit(1) from None
    stack = LocalStack(home, keep_policy=keep_policy, listen=listen, isolate=not no_isolation,
                       model=served, progress=progress, weights=weights.value, enclaves=enclaves)
    raise typer.Exit(run(stack, console, once=once))
