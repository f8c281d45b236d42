"""``nitrovault review``: who can obtain plaintext key material, under which measurements?

The I/O shell around :mod:`nitrovault.policy.review` (pure): it reads the input and the manifest, renders
the table or JSON, and maps the result to an exit code. INPUT is one of

* a key policy JSON (the ``Policy`` string ``aws kms get-key-policy`` returns, or its wrapper object),
* a CloudFormation template (JSON; every ``AWS::KMS::Key``'s ``KeyPolicy``),
* a ``cdk.out`` folder (every ``*.template.json``; the account and region come from ``manifest.json``
  when the stack is environment-bound).

Exit codes: 0 no finding, 1 at least one finding, 2 usage error (unreadable input or manifest, malformed
policy). Registered by the lead as a top-level command: ``app.command("review")(review_cmd.review)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from nitrovault.errors import ConfigError, NitrovaultError
from nitrovault.policy.manifest import PcrManifest, load_manifest
from nitrovault.policy.review import KeyReview, Review, review_policy, review_template

_err = Console(stderr=True)
_ENV = re.compile(r"aws://(\d{12})/([a-z0-9-]+)")
_STYLE = {"critical": "bold red", "high": "red", "medium": "yellow"}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {str(path)!r}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"{str(path)!r} is not valid JSON (YAML templates: convert with cfn-flip)") from exc


def _cdk_environments(folder: Path) -> dict[str, tuple[str | None, str | None]]:
    """templateFile -> (account, region) from cdk.out/manifest.json, for environment-bound stacks."""
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        return {}
    doc = _read_json(manifest)
    out: dict[str, tuple[str | None, str | None]] = {}
    artifacts = doc.get("artifacts", {}) if isinstance(doc, dict) else {}
    for artifact in artifacts.values() if isinstance(artifacts, dict) else ():
        if not isinstance(artifact, dict) or artifact.get("type") != "aws:cloudformation:stack":
            continue
        template = (artifact.get("properties") or {}).get("templateFile")
        match = _ENV.fullmatch(str(artifact.get("environment", "")))
        if isinstance(template, str) and match:
            out[template] = (match.group(1), match.group(2))
    return out


def _review_path(path: Path, manifest: PcrManifest | None, account: str | None) -> list[KeyReview]:
    if path.is_dir():
        templates = sorted(path.glob("*.template.json"))
        if not templates:
            raise ConfigError(f"{str(path)!r} holds no *.template.json (is it a cdk.out folder?)")
        envs = _cdk_environments(path)
        keys: list[KeyReview] = []
        for template in templates:
            env_account, region = envs.get(template.name, (None, None))
            doc = _read_json(template)
            keys += review_template(
                doc, source=template.name, manifest=manifest, account=account or env_account, region=region
            )
        return keys
    doc = _read_json(path)
    if isinstance(doc, dict) and "Resources" in doc:
        return review_template(doc, source=path.name, manifest=manifest, account=account)
    if isinstance(doc, dict) and isinstance(doc.get("Policy"), str):  # aws kms get-key-policy output
        doc = doc["Policy"]
    return [review_policy(doc, key=path.name, source=path.name, manifest=manifest)]


def _short(values: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "-"


def _render(review: Review) -> None:
    _out = Console()  # created per call: it picks up the terminal width (COLUMNS) of this run
    if review.manifest is not None and review.manifest.is_debug:
        _out.print("[bold red]The manifest is a DEBUG-mode image (all-zero PCRs).[/]")
    for key in review.keys:
        table = Table(title=f"key {key.key}", show_lines=False)
        for column in ("statement", "principal", "action", "conditions", "measurements", "verdict"):
            table.add_column(column, overflow="fold")
        for g in key.grants:
            proof = []
            if g.unattested:
                proof.append("NO attestation needed")
            elif g.foreign_pcrs:
                proof.append("ANY enclave")
            if g.manifest_pcrs is False:
                proof.append("manifest image denied")
            verdict = g.verdict + (f" ({'; '.join(proof)})" if proof else "")
            table.add_row(
                g.statement, g.principal, ", ".join(g.actions), g.conditions, _short(dict(g.measurements)),
                verdict,
            )
        _out.print(table)
    if not review.findings:
        _out.print("[green]no findings[/]")
        return
    findings = Table(title="findings")
    for column in ("severity", "rule", "category", "key", "statement", "principal", "message"):
        findings.add_column(column, overflow="fold")
    for f in review.findings:
        message = f.message + (" [proved]" if f.proved else "")
        findings.add_row(
            f"[{_STYLE[f.severity]}]{f.severity}[/]", f.rule_id, f.category, f.key, f.statement,
            f.principal or "-", message,
        )
    _out.print(findings)


def review(
    input_path: Annotated[
        Path, typer.Argument(metavar="INPUT", help="key policy JSON, CloudFormation template, or cdk.out/")
    ],
    manifest_path: Annotated[
        Path | None, typer.Option("--manifest", help="pcr-manifest.json of the reviewed image")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    account: Annotated[
        str | None, typer.Option("--account", help="resolve ${AWS::AccountId} in templates to this account")
    ] = None,
) -> None:
    """Say who can obtain plaintext key material, and under which enclave measurements."""
    try:
        manifest = load_manifest(manifest_path) if manifest_path is not None else None
        keys = _review_path(input_path, manifest, account)
    except NitrovaultError as exc:
        _err.print(f"error: {exc.diagnostics()}", markup=False, highlight=False)
        raise typer.Exit(2) from exc
    result = Review(tuple(keys), manifest)
    if as_json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
    else:
        if not keys:
            typer.echo("no AWS::KMS::Key found")
        _render(result)
    raise typer.Exit(1 if result.findings else 0)
