"""``nitrovault policy review``: who can obtain plaintext key material, under which measurements?

    nitrovault policy review INPUT... [--pcr-manifest FILE]... [--format text|json|sarif] [--fail-on SEVERITY]

The I/O shell around :mod:`nitrovault.policy.review` (pure): it reads the inputs and the manifests (one per
image the policy should accept: give ``--pcr-manifest`` once per image during a rollout), renders text,
JSON or SARIF, and maps the result to an exit code. Each INPUT is one of

* a key policy JSON: the bare policy, or what ``aws kms get-key-policy`` prints
  (``{"Policy": "<policy as a JSON string>", "PolicyName": "default"}``);
* a CloudFormation template, JSON or YAML (every ``AWS::KMS::Key``'s ``KeyPolicy``; YAML short tags such
  as ``!Ref``/``!Sub``/``!GetAtt`` are read as their long forms);
* a ``cdk.out`` folder (every ``*.template.json``, nested stage assemblies included; the account and
  region come from ``manifest.json`` when the stack is environment-bound).

Exit codes: **0** no finding reaches ``--fail-on`` (default ``high``; low < medium < high < critical),
**3** at least one does, **2** unreadable input or manifest, malformed policy, or bad usage.

Why a hand-written YAML loader: PyYAML's safe loader refuses CloudFormation's short tags and
``cfn-flip``/``cfn-lint`` would be a heavy dependency for a dozen constructors; :class:`_CfnLoader` maps
each tag to the long form (``!Ref X`` -> ``{"Ref": "X"}``, ``!GetAtt A.B`` -> ``{"Fn::GetAtt": ["A", "B"]}``),
which :func:`~nitrovault.policy.cfn.render_intrinsics` then renders like a JSON template's.

Why SARIF is built by hand: it is a fixed JSON shape (SARIF 2.1.0, OASIS); a SARIF library would add a
dependency for one dict. :func:`to_sarif` is pure; a test validates it against the schema's required keys.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from nitrovault.errors import ConfigError, NitrovaultError
from nitrovault.policy.manifest import PcrManifest, load_manifest
from nitrovault.policy.review import (
    RULES,
    KeyReview,
    Review,
    reaching,
    review_policy,
    review_template,
)
from nitrovault.policy.review.findings import MeasurementSet

__all__ = ["EXIT_FINDINGS", "EXIT_OK", "EXIT_UNREADABLE", "app", "load_cfn_yaml", "review", "to_sarif"]

EXIT_OK = 0
EXIT_UNREADABLE = 2
EXIT_FINDINGS = 3

app = typer.Typer(no_args_is_help=True, help="Review KMS key policies: who can obtain plaintext, and how.")

_err = Console(stderr=True)
_ENV = re.compile(r"aws://(\d{12})/([a-z0-9-]+)")
_STYLE = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "cyan"}
_SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
_SARIF_LEVEL = {"critical": "error", "high": "error", "medium": "warning", "low": "note"}
#: GitHub code scanning reads this property to rank security results (0.1-10).
_SECURITY_SEVERITY = {"critical": "9.5", "high": "8.0", "medium": "5.0", "low": "2.0"}


class Format(StrEnum):
    text = "text"
    json = "json"
    sarif = "sarif"


class FailOn(StrEnum):
    low = "low"
    medium = "medium"
    high = "high"
    critical = "critical"


# -- reading inputs ---------------------------------------------------------------------------------------


#: A safe YAML loader that also reads CloudFormation's short-form intrinsic tags (a SafeLoader subclass
#: made with ``type()``: PyYAML ships no type stubs, and mypy cannot check a subclass of ``Any``).
_CfnLoader: Any = type("_CfnLoader", (yaml.SafeLoader,), {})


def _long_form(name: str) -> Any:
    def construct(loader: Any, node: Any) -> Any:
        if isinstance(node, yaml.ScalarNode):
            value: Any = loader.construct_scalar(node)
            if name == "Fn::GetAtt" and isinstance(value, str):
                value = value.split(".", 1)  # !GetAtt Role.Arn -> ["Role", "Arn"]
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            assert isinstance(node, yaml.MappingNode)
            value = loader.construct_mapping(node, deep=True)
        return {name: value}

    return construct


_CFN_TAGS = {
    "!Ref": "Ref",
    "!Condition": "Condition",
    **{
        f"!{fn}": f"Fn::{fn}"
        for fn in (
            "And", "Base64", "Cidr", "Equals", "FindInMap", "GetAtt", "GetAZs", "If", "ImportValue",
            "Join", "Length", "Not", "Or", "Select", "Split", "Sub", "ToJsonString", "Transform",
        )
    },
}
for _tag, _name in _CFN_TAGS.items():
    _CfnLoader.add_constructor(_tag, _long_form(_name))


def load_cfn_yaml(text: str | bytes) -> Any:
    """Parse YAML with CloudFormation short tags (``!Ref``, ``!Sub``, ``!GetAtt``, ``!Join`` ...) mapped
    to their long JSON forms; :class:`ConfigError` when it is not YAML."""
    try:
        return yaml.load(text, Loader=_CfnLoader)  # noqa: S506 - _CfnLoader is a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid JSON or YAML ({type(exc).__name__})") from None


def _read_document(path: Path) -> Any:
    """A JSON or YAML document from ``path`` (JSON first: the common case, and exact)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {str(path)!r}: {exc.strerror}") from exc
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        pass
    try:
        doc = load_cfn_yaml(data)
    except ConfigError as exc:
        raise ConfigError(f"{str(path)!r}: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{str(path)!r} is not a JSON/YAML object (a key policy or a template)")
    return doc


def _cdk_environments(manifest: Path) -> dict[str, tuple[str | None, str | None]]:
    """templateFile -> (account, region) from a cloud assembly's manifest.json (environment-bound stacks)."""
    if not manifest.is_file():
        return {}
    doc = _read_document(manifest)
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


def _review_folder(
    folder: Path, manifest: PcrManifest | list[PcrManifest] | None, account: str | None
) -> list[KeyReview]:
    templates = sorted(folder.rglob("*.template.json"))
    if not templates:
        raise ConfigError(f"{str(folder)!r} holds no *.template.json (is it a cdk.out folder?)")
    keys: list[KeyReview] = []
    for template in templates:
        env_account, region = _cdk_environments(template.parent / "manifest.json").get(
            template.name, (None, None)
        )
        doc = _read_document(template)
        if not isinstance(doc, dict):
            raise ConfigError(f"{str(template)!r} is not a CloudFormation template")
        name = template.relative_to(folder).as_posix()
        reviews = review_template(
            doc, source=name, manifest=manifest, account=account or env_account, region=region
        )
        keys += [replace(k, source=str(template)) for k in reviews]
    return keys


def review_path(
    path: Path, manifest: PcrManifest | list[PcrManifest] | None, account: str | None = None
) -> list[KeyReview]:
    """Review one INPUT (policy file, template file or cdk.out folder) against the manifest(s);
    :class:`NitrovaultError` when it cannot be read or holds a malformed policy."""
    if path.is_dir():
        return _review_folder(path, manifest, account)
    doc = _read_document(path)
    if isinstance(doc, dict) and "Resources" in doc:
        reviews = review_template(doc, source=path.name, manifest=manifest, account=account)
        return [replace(k, source=str(path)) for k in reviews]
    if isinstance(doc, dict) and "Policy" in doc:  # aws kms get-key-policy output
        if not isinstance(doc["Policy"], str):
            raise ConfigError(f"{str(path)!r}: \"Policy\" must be the policy as a JSON string")
        doc = doc["Policy"]
    return [review_policy(doc, key=path.name, source=str(path), manifest=manifest)]


# -- rendering --------------------------------------------------------------------------------------------


def to_sarif(review: Review, *, tool_version: str = "0") -> dict[str, Any]:
    """The review as a SARIF 2.1.0 log (one run; every rule in the driver; one result per finding, located
    at its input file and, logically, at ``key/statement``). Pure."""
    rule_ids = sorted(RULES)
    rules = [
        {
            "id": rule_id,
            "name": rule_id.removeprefix("NV-").title().replace("-", ""),
            "shortDescription": {"text": RULES[rule_id].summary},
            "help": {"text": "docs/review.md (Findings) explains the rule and its fix"},
            "properties": {
                "category": RULES[rule_id].category,
                "kind": RULES[rule_id].kind,
                "tags": ["security", "kms"],
            },
        }
        for rule_id in rule_ids
    ]
    results = []
    for key in review.keys:
        for f in key.findings:
            results.append(
                {
                    "ruleId": f.rule_id,
                    "ruleIndex": rule_ids.index(f.rule_id),
                    "level": _SARIF_LEVEL[f.severity],
                    "message": {"text": f.message},
                    "locations": [
                        {
                            "physicalLocation": {"artifactLocation": {"uri": Path(key.source).as_posix()}},
                            "logicalLocations": [
                                {"fullyQualifiedName": f"{f.key}/{f.statement}", "kind": "resource"}
                            ],
                        }
                    ],
                    "properties": {
                        "category": f.category,
                        "kind": RULES[f.rule_id].kind,
                        "severity": f.severity,
                        "security-severity": _SECURITY_SEVERITY[f.severity],
                        "key": f.key,
                        "statement": f.statement,
                        "principal": f.principal,
                        "proved": f.proved,
                    },
                }
            )
    return {
        "$schema": _SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "nitrovault-policy-review",
                        "version": tool_version,
                        "rules": rules,
                    }
                },
                "results": results,
            }
        ],
    }


def _short(values: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "-"


def _set_row(m: MeasurementSet, labels: list[str]) -> tuple[str, ...]:
    binds = ", ".join(f"{pcr}={cell}" for pcr, cell in m.pcrs.items())
    manifest = labels[m.manifest] if m.manifest is not None else ("none" if labels else "-")
    return (
        m.statement, ", ".join(m.principals), m.kind, binds, manifest, ", ".join(m.problems) or "ok",
    )


def _render(review: Review, labels: list[str] | None = None) -> None:
    out = Console()  # created per call: it picks up the terminal width (COLUMNS) of this run
    manifests = review.all_manifests
    labels = labels or [f"manifest {i}" for i in range(len(manifests))]
    for label, manifest in zip(labels, manifests, strict=False):
        if manifest.is_debug:
            out.print(f"[bold red]{label} is a DEBUG-mode image (all-zero PCRs).[/]", highlight=False)
    if not review.keys:
        out.print("no AWS::KMS::Key found")
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
        out.print(table)
        if key.measurement_sets:
            sets = Table(title=f"accepted measurement sets of {key.key}")
            for column in ("statement", "principals", "kind", "binds", "manifest", "problems"):
                sets.add_column(column, overflow="fold")
            for m in key.measurement_sets:
                sets.add_row(*_set_row(m, labels))
            out.print(sets)
    if not review.findings:
        out.print("[green]no findings[/]")
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
    out.print(findings)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nitrovault")
    except PackageNotFoundError:
        return "0"


@app.command("review")
def review(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            metavar="INPUT", help="key policy JSON, CloudFormation template (JSON/YAML), or cdk.out/"
        ),
    ],
    manifest_paths: Annotated[
        list[Path] | None,
        typer.Option(
            "--pcr-manifest",
            help="pcr-manifest.json of a reviewed image; once per image the policy should accept",
        ),
    ] = None,
    output_format: Annotated[Format, typer.Option("--format", help="text, json or sarif")] = Format.text,
    fail_on: Annotated[
        FailOn, typer.Option("--fail-on", help="exit 3 when a finding is at least this severe")
    ] = FailOn.high,
    account: Annotated[
        str | None, typer.Option("--account", help="resolve ${AWS::AccountId} in templates to this account")
    ] = None,
) -> None:
    """Say who can obtain plaintext key material, and under which enclave measurements."""
    try:
        manifests = [load_manifest(p) for p in manifest_paths or []]
        manifest: PcrManifest | list[PcrManifest] | None = (
            manifests[0] if len(manifests) == 1 else manifests or None
        )
        keys: list[KeyReview] = []
        for path in inputs:
            keys += review_path(path, manifest, account)
    except NitrovaultError as exc:
        _err.print(f"error: {exc.diagnostics()}", markup=False, highlight=False)
        raise typer.Exit(EXIT_UNREADABLE) from exc
    result = Review(tuple(keys), manifests[0] if manifests else None, tuple(manifests))
    if output_format is Format.json:
        typer.echo(json.dumps(result.as_dict(), indent=2))
    elif output_format is Format.sarif:
        typer.echo(json.dumps(to_sarif(result, tool_version=_version()), indent=2))
    else:
        _render(result, [f"manifest {i} ({p.name})" for i, p in enumerate(manifest_paths or [])])
    raise typer.Exit(EXIT_FINDINGS if reaching(result.findings, fail_on.value) else EXIT_OK)

