"""The key-policy reviewer: who can obtain plaintext key material, under which measurements? Pure.

Input is a parsed key policy (or a CloudFormation template's ``AWS::KMS::Key`` resources), optionally with
the image's :class:`~nitrovault.policy.manifest.PcrManifest`; output is a :class:`KeyReview` per key: one
:class:`Grant` row per (statement, principal, action) that can yield plaintext or escalate to it, and the
:class:`Finding` list. File and folder reading (JSON, YAML, ``cdk.out``) and the text/JSON/SARIF
renderings live in ``nitrovault.cli.review_cmd`` (the I/O shell); the synth-time CDK aspect in
``infra/review_aspect.py``.

How a claim is established:

1. **Static reading** of each ``Allow`` statement: which plaintext-yielding actions it covers (wildcards and
   ``NotAction`` included, :data:`PLAINTEXT_ACTIONS`), which principals, and how its
   ``kms:RecipientAttestation:*`` conditions are written (operator, set prefix, ``IfExists``, value shape).
2. **Proof with the evaluator** that the KMS emulator uses (:func:`~nitrovault.policy.evaluate_key_policy`):
   for every principal and action the reviewer builds the request KMS would build -- with the
   encryption context the statement itself demands, so the check is not vacuous -- and evaluates it
   (a) without an attestation document, (b) with *foreign* PCRs (:data:`PROBE_PCRS`, values no real image
   has), (c) with the manifest's PCRs. "X can Decrypt without attestation" is reported only as
   ``proved`` when (a) is allowed; "any enclave can decrypt" when (b) is.
3. **Comparison** of the bound PCR values with the manifest: match, MISMATCH, or debug zeros.

Invariants:

* Reviewing never raises on a policy that :func:`~nitrovault.policy.parse_policy` accepts; a malformed
  policy raises :class:`~nitrovault.errors.PolicyError`.
* The policy of :func:`nitrovault.policy.build.model_key_policy` with a matching manifest has no finding.
* Account principals are assumed to delegate to IAM (the evaluator's worst case): a reviewer cannot see
  the account's IAM policies, so it must assume they allow.
* ``GenerateRandom`` is not reviewed: it takes no key, so no key policy governs it.
* Every finding's ``rule_id`` is in :data:`RULES` and its ``category`` is that rule's, one of the issue's
  vocabulary (:data:`CATEGORIES`); severities are :data:`SEVERITIES` (low < medium < high < critical).
* Key administrators are the principals of a management statement (disable / schedule deletion, no
  plaintext action). Only their ``PutKeyPolicy`` is break-glass; ``PutKeyPolicy`` to anyone else (an
  administrator that also uses the key included) and ``CreateGrant`` to anyone are escalations.
* **Service-mediated** use (``Decrypt`` / ``GenerateDataKey`` by a named role or user, in a statement with
  no attestation condition, pinned with ``StringEquals`` ``kms:ViaService`` to one regional endpoint of
  one service *and* with that service's own ``kms:EncryptionContext:aws:<service>:arn`` limited to named
  resources, as SSE-KMS on one S3 bucket): the service receives the key material, never the caller, so
  the row's verdict is ``service-mediated`` and it is no finding -- unless the evaluator allows the call
  *directly* (without the service), which is NV-PLAINTEXT-UNATTESTED, proved. The account root and
  ``"*"`` are never service-mediated; ``ReEncryptFrom``, ``DeriveSharedSecret`` and
  ``GenerateDataKeyPair`` never are.
* NV-NO-DENY (the defence-in-depth Deny of ``Decrypt`` without attestation) is not asked of an
  **at-rest key**: one with no attestation condition anywhere, in which every ``Allow`` yielding plaintext
  is service-mediated (above) or names only AWS service principals and covers neither ``CreateGrant``,
  ``PutKeyPolicy`` nor ``kms:*``. Such a key hands no key material to any caller, and that Deny would
  break the service it serves. A key with any attestation condition (a model key) always needs the Deny.

What this cannot prove: anything outside the key policy (IAM policies, grants already created, SCPs), and
whether the manifest describes the code you reviewed (that is the reproducible build's job).

Example::

    >>> from nitrovault.policy import parse_policy
    >>> review = review_policy({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
    ...     "Principal": {"AWS": "arn:aws:iam::111122223333:root"}, "Action": "kms:*", "Resource": "*"}]},
    ...     key="default")
    >>> sorted({f.category for f in review.findings})
    ['context-unconstrained', 'escalation', 'plaintext-without-attestation', 'root-delegation']
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from nitrovault.policy.conditions import ConditionClause, wildcard_match
from nitrovault.policy.evaluate import (
    Policy,
    Statement,
    build_request_context,
    evaluate_key_policy,
    parse_policy,
)
from nitrovault.policy.manifest import DEBUG_ZERO_PCRS, REQUIRED_PCRS, PcrManifest

__all__ = [
    "CATEGORIES",
    "ESCALATION_ACTIONS",
    "PLAINTEXT_ACTIONS",
    "PROBE_PCRS",
    "RULES",
    "SEVERITIES",
    "Finding",
    "Grant",
    "KeyReview",
    "Review",
    "Rule",
    "TemplateEnv",
    "keys_from_template",
    "reaching",
    "render_intrinsics",
    "review_policy",
    "review_template",
]

Severity = Literal["low", "medium", "high", "critical"]
#: The severities, weakest first (``--fail-on`` compares along this order).
SEVERITIES: tuple[Severity, ...] = ("low", "medium", "high", "critical")
SEVERITY_ORDER: Mapping[str, int] = {s: i for i, s in enumerate(SEVERITIES)}

#: The issue's finding vocabulary; every finding has exactly one of these.
CATEGORIES = (
    "plaintext-without-attestation",
    "root-delegation",
    "wildcard-principal",
    "pcr-pattern-match",
    "pcr-malformed",
    "debug-pcr",
    "set-operator-misuse",
    "negated-element",
    "escalation",
    "manifest-mismatch",
    "context-unconstrained",
    "weak-binding",
)


@dataclass(frozen=True)
class Rule:
    """One reviewer rule: a stable id, its category from :data:`CATEGORIES`, a one-line summary."""

    rule_id: str
    category: str
    summary: str


#: Every rule the reviewer has, by id (the SARIF driver's rule list; docs/review.md has the long form).
RULES: Mapping[str, Rule] = {
    r.rule_id: r
    for r in (
        Rule("NV-ROOT-DELEGATION", "root-delegation",
             "The account principal is allowed a plaintext action: IAM policies decide who gets it"),
        Rule("NV-WILDCARD-PRINCIPAL", "wildcard-principal",
             "Principal \"*\" is allowed a plaintext action without attestation conditions"),
        Rule("NV-KMS-STAR", "escalation", "kms:* (or an equivalent wildcard) to a non-administrator"),
        Rule("NV-KMS-STAR-ADMIN", "escalation", "kms:* to a key administrator"),
        Rule("NV-ESCALATION", "escalation",
             "CreateGrant, or PutKeyPolicy outside the administrators' break-glass statement"),
        Rule("NV-ADMIN-DECRYPT", "escalation", "A key administrator can also Decrypt"),
        Rule("NV-PLAINTEXT-UNATTESTED", "plaintext-without-attestation",
             "Decrypt/ReEncryptFrom/DeriveSharedSecret without attestation conditions"),
        Rule("NV-ATT-BYPASS", "plaintext-without-attestation",
             "Attestation conditions present, yet allowed without an attestation document"),
        Rule("NV-NO-DENY", "plaintext-without-attestation",
             "No explicit Deny of Decrypt without an attestation document"),
        Rule("NV-ANY-ENCLAVE", "weak-binding", "Allowed for an enclave with foreign PCRs"),
        Rule("NV-ATT-NULL-ONLY", "weak-binding", "Attestation conditions are Null-only"),
        Rule("NV-BIND-NO-IMAGE", "weak-binding", "No image measurement (PCR0/1/2 or ImageSha384) bound"),
        Rule("NV-BIND-MISSING-PCR", "weak-binding", "One of PCR0, PCR1, PCR2 is not bound"),
        Rule("NV-MANIFEST-UNBOUND", "weak-binding", "The manifest has PCR3/4/8 but the statement omits it"),
        Rule("NV-ATT-OPERATOR", "weak-binding", "An attestation key under a non-string operator"),
        Rule("NV-ATT-IFEXISTS", "set-operator-misuse", "...IfExists on an attestation key"),
        Rule("NV-ATT-SETOP", "set-operator-misuse",
             "ForAnyValue/ForAllValues on a single-valued attestation key"),
        Rule("NV-ATT-NEGATED", "negated-element", "A negated operator on an attestation key"),
        Rule("NV-NOTACTION", "negated-element", "NotAction leaves plaintext actions allowed"),
        Rule("NV-NOTPRINCIPAL", "negated-element", "NotPrincipal in an Allow with plaintext actions"),
        Rule("NV-ATT-PATTERN", "pcr-pattern-match", "StringLike with a wildcard on an attestation key"),
        Rule("NV-PCR-MALFORMED", "pcr-malformed", "A PCR value that is not 96 lower-case hex digits"),
        Rule("NV-PCR-DEBUG", "debug-pcr", "An all-zero PCR0/1/2/8 (debug-mode enclave) in the policy"),
        Rule("NV-MANIFEST-DEBUG", "debug-pcr", "The manifest itself is a debug-mode image"),
        Rule("NV-MANIFEST-MISMATCH", "manifest-mismatch", "A bound PCR differs from the manifest"),
        Rule("NV-MANIFEST-EXTRA", "manifest-mismatch", "The policy binds a PCR the manifest does not have"),
        Rule("NV-DATAKEY-UNCONSTRAINED", "context-unconstrained",
             "GenerateDataKey* without a specific role and an encryption-context condition"),
    )
}

#: Actions whose answer carries plaintext key material (or re-wraps it under a key the caller may own).
#: GenerateDataKey/GenerateDataKeyPair return a *new* key in plaintext ("plaintext to caller");
#: Decrypt, ReEncryptFrom and DeriveSharedSecret release what this key protects.
PLAINTEXT_ACTIONS = (
    "kms:Decrypt",
    "kms:ReEncryptFrom",
    "kms:DeriveSharedSecret",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyPair",
)
_TO_CALLER = ("kms:GenerateDataKey", "kms:GenerateDataKeyPair")
#: Actions that let a principal give itself (or anyone) the above: grants, or a new policy.
ESCALATION_ACTIONS = ("kms:CreateGrant", "kms:PutKeyPolicy")
#: Management actions that mark a key-administration statement (PutKeyPolicy alone does not: a principal
#: given only PutKeyPolicy is exactly the escalation the reviewer must report).
_ADMIN_MARKERS = ("kms:ScheduleKeyDeletion", "kms:DisableKey")
#: An action no policy names: a statement covering it (and Decrypt) covers everything (``kms:*``).
_UNNAMED_ACTION = "kms:NitrovaultReviewUnnamedAction"

_ATTESTATION_PREFIX = "kms:recipientattestation:"
_CONTEXT_PREFIX = "kms:encryptioncontext:"
_PCR_KEY = re.compile(r"kms:recipientattestation:pcr(\d+)", re.IGNORECASE)
_IMAGE_KEY = "kms:recipientattestation:imagesha384"
_HEX96 = re.compile(r"[0-9a-f]{96}")
_ROOT_ARN = re.compile(r"arn:([^:]+):iam::([^:]+):root")
_ACCOUNT_ID = re.compile(r"\d{12}")
_PINNING_OPERATORS = ("StringEquals", "StringEqualsIgnoreCase")
#: What an AWS service calls on a caller's behalf for envelope encryption (S3 SSE-KMS, ...): the only
#: actions a statement can make service-mediated.
_SERVICE_MEDIATED_ACTIONS = ("kms:Decrypt", "kms:GenerateDataKey")
#: One regional endpoint of one service, as ``kms:ViaService`` names it (``s3.eu-west-1.amazonaws.com``).
_VIA_SERVICE = re.compile(r"([a-z0-9-]+)\.[a-z]{2}(?:-[a-z]+)+-\d{1,2}\.amazonaws\.com")
#: Operators that can limit a service's resource-ARN encryption context to named resources.
_RESOURCE_OPERATORS = ("StringEquals", "StringEqualsIgnoreCase", "StringLike", "ArnEquals", "ArnLike")

#: Foreign measurements for the "any enclave" proof: derived from a fixed label so the review is
#: deterministic, and (being SHA-384 outputs of a label no build hashes) equal to no real image's PCRs.
PROBE_PCRS: Mapping[int, bytes] = {
    i: hashlib.sha384(f"nitrovault-review-foreign-pcr{i}".encode()).digest() for i in (0, 1, 2, 3, 4, 8)
}
_OUTSIDER_ACCOUNT = "999988887777"


# -- results ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One problem. ``rule_id`` is stable across releases; ``message`` never carries key material."""

    rule_id: str
    category: str
    severity: Severity
    key: str
    statement: str
    message: str
    principal: str | None = None
    #: True when the evaluator confirmed the claim (see the module docstring)
    proved: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule_id": self.rule_id,
            "category": self.category,
            "severity": self.severity,
            "key": self.key,
            "statement": self.statement,
            "principal": self.principal,
            "message": self.message,
            "proved": self.proved,
        }


Verdict = Literal[
    "attested-release", "plaintext-to-caller", "unattested-plaintext", "service-mediated", "escalation"
]


@dataclass(frozen=True)
class Grant:
    """Who may do what under which measurements: one row of the review table."""

    statement: str
    principal: str
    actions: tuple[str, ...]
    #: condition operators and keys, e.g. ``StringEqualsIgnoreCase(PCR0,PCR1,PCR2)``; never values
    conditions: str
    #: PCRn -> "match" / "MISMATCH" / "debug-zeros" / "bound" (no manifest) / "malformed"
    measurements: Mapping[str, str]
    verdict: Verdict
    #: evaluator answers: allowed without attestation / with foreign PCRs / with the manifest's PCRs
    #: (``manifest_pcrs`` is None without a manifest, and for a ``service-mediated`` row: no enclave there)
    unattested: bool
    foreign_pcrs: bool
    manifest_pcrs: bool | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "statement": self.statement,
            "principal": self.principal,
            "actions": list(self.actions),
            "conditions": self.conditions,
            "measurements": dict(self.measurements),
            "verdict": self.verdict,
            "allowed_without_attestation": self.unattested,
            "allowed_with_foreign_pcrs": self.foreign_pcrs,
            "allowed_with_manifest_pcrs": self.manifest_pcrs,
        }


@dataclass(frozen=True)
class KeyReview:
    key: str
    source: str
    grants: tuple[Grant, ...]
    findings: tuple[Finding, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "source": self.source,
            "grants": [g.as_dict() for g in self.grants],
            "findings": len(self.findings),
        }


@dataclass(frozen=True)
class Review:
    keys: tuple[KeyReview, ...]
    manifest: PcrManifest | None = None

    @property
    def findings(self) -> tuple[Finding, ...]:
        return tuple(f for k in self.keys for f in k.findings)

    def as_dict(self) -> dict[str, Any]:
        """Exactly ``{"keys": [...], "findings": [...]}`` (the CLI's ``--format json``)."""
        return {"keys": [k.as_dict() for k in self.keys], "findings": [f.as_dict() for f in self.findings]}


def reaching(findings: Iterable[Finding], fail_on: str) -> tuple[Finding, ...]:
    """The findings at or above severity ``fail_on`` (one of :data:`SEVERITIES`)."""
    if fail_on not in SEVERITY_ORDER:
        raise ValueError(f"unknown severity {fail_on!r} (one of {', '.join(SEVERITIES)})")
    return tuple(f for f in findings if SEVERITY_ORDER[f.severity] >= SEVERITY_ORDER[fail_on])


# -- static reading of a statement ------------------------------------------------------------------------


def _covers(statement: Statement, action: str) -> bool:
    if statement.actions is not None:
        return any(wildcard_match(a, action, ignore_case=True) for a in statement.actions)
    assert statement.not_actions is not None
    return not any(wildcard_match(a, action, ignore_case=True) for a in statement.not_actions)


def _full_wildcard(statement: Statement) -> bool:
    return _covers(statement, _UNNAMED_ACTION) and _covers(statement, "kms:Decrypt")


def _principals(statement: Statement) -> list[str]:
    """Principals as labels: ``*``, account roots (normalised to ARNs), role/user ARNs, ``NOT(...)``."""
    if statement.principal is not None:
        if statement.principal.everyone:
            return ["*"]
        out = [f"arn:aws:iam::{p}:root" if _ACCOUNT_ID.fullmatch(p) else p for p in statement.principal.aws]
        return out + [f"service:{s}" for s in statement.principal.service]
    assert statement.not_principal is not None
    return ["*"]  # NotPrincipal in an Allow: everyone but a few, reviewed as everyone


def _probe_arn(label: str) -> str | None:
    """A caller ARN that the principal ``label`` covers, for the evaluator (None: not probeable)."""
    if label == "*":
        return f"arn:aws:iam::{_OUTSIDER_ACCOUNT}:role/nitrovault-review-anyone"
    root = _ROOT_ARN.fullmatch(label)
    if root:  # any IAM identity of the account, via delegation
        return f"arn:{root.group(1)}:iam::{root.group(2)}:role/nitrovault-review-iam-delegate"
    if label.startswith("arn:"):
        return label
    return None


def _is_root(label: str) -> bool:
    return _ROOT_ARN.fullmatch(label) is not None


@dataclass(frozen=True)
class _Attestation:
    clauses: tuple[ConditionClause, ...]
    #: PCR index -> the policy values bound by a pinning operator (ImageSha384 counts as PCR0)
    bound: Mapping[int, tuple[str, ...]]
    summary: str


def _attestation(statement: Statement) -> _Attestation:
    clauses = tuple(c for c in statement.conditions if c.key.lower().startswith(_ATTESTATION_PREFIX))
    bound: dict[int, tuple[str, ...]] = {}
    for c in clauses:
        if c.base not in _PINNING_OPERATORS and c.base != "StringLike":
            continue
        if c.negated:
            continue
        index = _pcr_index(c.key)
        if index is not None:
            bound[index] = bound.get(index, ()) + c.values
    ops: dict[str, list[str]] = {}
    for c in statement.conditions:
        short = c.key.split(":")[-1] if c.key.lower().startswith(_ATTESTATION_PREFIX) else c.key
        ops.setdefault(c.operator, []).append(short)
    summary = "; ".join(f"{op}({','.join(keys)})" for op, keys in ops.items()) or "none"
    return _Attestation(clauses, bound, summary)


def _pcr_index(key: str) -> int | None:
    if key.lower() == _IMAGE_KEY:
        return 0
    match = _PCR_KEY.fullmatch(key)
    return int(match.group(1)) if match else None


def _encryption_context(statement: Statement) -> dict[str, str]:
    """A context satisfying the statement's own positive encryption-context conditions."""
    context: dict[str, str] = {}
    for c in statement.conditions:
        if c.negated or c.base not in (*_PINNING_OPERATORS, "StringLike", "ArnEquals", "ArnLike"):
            continue
        if c.key.lower().startswith(_CONTEXT_PREFIX):
            name = c.key[len(_CONTEXT_PREFIX) :]
            context[name] = c.values[0].replace("*", "x").replace("?", "x")
    return context


def _has_context_condition(statement: Statement) -> bool:
    return any(
        not c.negated
        and not c.if_exists
        and c.base in _PINNING_OPERATORS
        and c.key.lower().startswith(_CONTEXT_PREFIX)
        for c in statement.conditions
    )


def _resource_in(value: str, service: str) -> bool:
    """``value`` names resources of ``service`` only: an ARN of that service with a non-empty resource and
    no wildcard, except one trailing ``/*`` (the objects under one bucket, the groups under one path)."""
    body = value[:-2] if value.endswith("/*") else value
    parts = body.split(":", 5)
    return (
        len(parts) == 6
        and parts[0] == "arn"
        and parts[1].startswith("aws")
        and parts[2] == service
        and parts[5] not in ("", "/")
        and "*" not in body
        and "?" not in body
    )


def _service_mediated(statement: Statement) -> str | None:
    """The one AWS service through which alone ``statement`` can be used, or None (module docstring:
    ``kms:ViaService`` pinned to that service's regional endpoints and its resource-ARN encryption
    context limited to named resources; any weaker clause on either key makes it None)."""
    via = [c for c in statement.conditions if c.key.lower() == "kms:viaservice"]
    if not via:
        return None
    services: set[str] = set()
    for c in via:
        if c.base != "StringEquals" or c.negated or c.if_exists or c.set_operator is not None:
            return None
        for value in c.values:
            match = _VIA_SERVICE.fullmatch(value)
            if match is None:
                return None
            services.add(match.group(1))
    if len(services) != 1:
        return None
    (service,) = services
    context_key = f"{_CONTEXT_PREFIX}aws:{service}:arn"
    scoped = [c for c in statement.conditions if c.key.lower() == context_key]
    if not scoped:
        return None
    for c in scoped:
        if c.base not in _RESOURCE_OPERATORS or c.negated or c.if_exists or c.set_operator is not None:
            return None
        if not all(_resource_in(v, service) for v in c.values):
            return None
    return service


def _service_principals_only(statement: Statement) -> bool:
    """Allowed only to AWS service principals, with no escalation action and no ``kms:*``."""
    principal = statement.principal
    return (
        principal is not None
        and not principal.everyone
        and not principal.aws
        and bool(principal.service)
        and not any(_covers(statement, a) for a in ESCALATION_ACTIONS)
        and not _full_wildcard(statement)
    )


def _is_at_rest_key(parsed: Policy) -> bool:
    """No attestation condition anywhere, and every plaintext-yielding ``Allow`` is service-bound (module
    docstring): such a key needs no Deny of Decrypt without attestation."""
    if any(_attestation(s).clauses for s in parsed.statements):
        return False
    granting = [
        s for s in parsed.statements if s.effect == "Allow" and any(_covers(s, a) for a in PLAINTEXT_ACTIONS)
    ]

    def bound(s: Statement) -> bool:
        if _service_principals_only(s):
            return True
        if _service_mediated(s) is None or s.principal is None or s.principal.everyone:
            return False
        named = _principals(s)
        return (
            all(p.startswith("arn:") and not _is_root(p) for p in named)
            and all(a in _SERVICE_MEDIATED_ACTIONS for a in PLAINTEXT_ACTIONS if _covers(s, a))
            and not any(_covers(s, a) for a in ESCALATION_ACTIONS)
        )

    return bool(granting) and all(bound(s) for s in granting)


# -- the review -------------------------------------------------------------------------------------------


@dataclass
class _Collector:
    key: str
    findings: dict[tuple[str, str, str | None], Finding] = field(default_factory=dict)

    def add(
        self,
        rule_id: str,
        category: str,
        severity: Severity,
        statement: str,
        message: str,
        principal: str | None = None,
        proved: bool = False,
    ) -> None:
        assert RULES[rule_id].category == category, (rule_id, category)
        slot = (rule_id, statement, principal)
        if slot not in self.findings:
            self.findings[slot] = Finding(
                rule_id, category, severity, self.key, statement, message, principal, proved
            )
        elif proved:
            self.prove(rule_id, statement, principal)

    def prove(self, rule_id: str, statement: str, principal: str | None = None) -> None:
        """Mark a finding as confirmed by the evaluator (no-op when there is no such finding)."""
        slot = (rule_id, statement, principal)
        if slot in self.findings:
            self.findings[slot] = replace(self.findings[slot], proved=True)


def _check_attestation_clauses(
    out: _Collector, statement: Statement, att: _Attestation, manifest: PcrManifest | None
) -> dict[str, str]:
    """Static checks of the attestation conditions; returns the measurements column."""
    label = statement.label
    measurements: dict[str, str] = {}
    for c in att.clauses:
        name = c.key.split(":")[-1]
        if c.if_exists:
            out.add(
                "NV-ATT-IFEXISTS", "set-operator-misuse", "critical", label,
                f"{c.operator} on {name}: a request WITHOUT an attestation document satisfies it",
            )
        if c.set_operator is not None:
            out.add(
                "NV-ATT-SETOP", "set-operator-misuse", "high", label,
                f"{c.operator} on {name}: single-valued attestation keys take no set operator; "
                "ForAnyValue/ForAllValues make the binding bypassable",
            )
        if c.negated:
            out.add(
                "NV-ATT-NEGATED", "negated-element", "high", label,
                f"{c.operator} on {name}: a negated operator admits every other measurement",
            )
        if c.base == "StringLike" and any("*" in v or "?" in v for v in c.values):
            out.add(
                "NV-ATT-PATTERN", "pcr-pattern-match", "high", label,
                f"StringLike with a wildcard on {name}: a pattern admits other images",
            )
        if c.base not in (*_PINNING_OPERATORS, "StringLike", "Null"):
            out.add(
                "NV-ATT-OPERATOR", "weak-binding", "high", label,
                f"{c.operator} on {name}: use StringEqualsIgnoreCase to pin a measurement",
            )
        if c.base == "Null" or c.negated:
            continue
        index = _pcr_index(c.key)
        for value in c.values:
            if not _HEX96.fullmatch(value):
                hint = " (stray '0x' prefix)" if value.lower().startswith("0x") else ""
                out.add(
                    "NV-PCR-MALFORMED", "pcr-malformed", "high", label,
                    f"{name} value is not 96 lower-case hex digits{hint}: it never matches a real PCR",
                )
                measurements[name] = "malformed"
                continue
            if index in DEBUG_ZERO_PCRS and not any(bytes.fromhex(value)):
                out.add(
                    "NV-PCR-DEBUG", "debug-pcr", "critical", label,
                    f"{name} is all zeros: that is a DEBUG-mode enclave, which anyone can run with any code",
                )
                measurements[name] = "debug-zeros"
                continue
            if manifest is None or index is None:
                measurements.setdefault(name, "bound")
            elif index not in manifest.pcrs:
                out.add(
                    "NV-MANIFEST-EXTRA", "manifest-mismatch", "medium", label,
                    f"{name} is bound but the manifest has no PCR{index}: the reviewed image is unknown here",
                )
                measurements[name] = "MISMATCH"
            elif value != manifest.pcr_hex(index):
                out.add(
                    "NV-MANIFEST-MISMATCH", "manifest-mismatch", "high", label,
                    f"{name} does not match the manifest: the policy releases to a different image",
                )
                measurements[name] = "MISMATCH"
            else:
                measurements.setdefault(name, "match")

    only_null = bool(att.clauses) and all(c.base == "Null" for c in att.clauses)
    if only_null:
        out.add(
            "NV-ATT-NULL-ONLY", "weak-binding", "critical", label,
            "attestation conditions are Null-only: they test that a document is present, not which image",
        )
        return measurements
    image_bound = [i for i in (0, 1, 2) if i in att.bound]
    if not image_bound:
        out.add(
            "NV-BIND-NO-IMAGE", "weak-binding", "critical", label,
            "no image measurement (PCR0/1/2 or ImageSha384) is bound: any enclave code qualifies",
        )
    else:
        missing = [f"PCR{i}" for i in REQUIRED_PCRS if i not in att.bound]
        if missing:
            out.add(
                "NV-BIND-MISSING-PCR", "weak-binding", "medium", label,
                f"{' and '.join(missing)} not bound: bind PCR0, PCR1 and PCR2 (defence in depth)",
            )
    if manifest is not None:
        for index in manifest.pcrs:
            if index not in att.bound and index not in REQUIRED_PCRS:
                out.add(
                    "NV-MANIFEST-UNBOUND", "weak-binding", "low", label,
                    f"the manifest has PCR{index} but the statement does not bind it",
                )
    return measurements


def review_policy(
    policy: Mapping[str, Any] | str | bytes | Policy,
    *,
    key: str = "policy",
    source: str = "",
    manifest: PcrManifest | None = None,
    key_arn: str | None = None,
    probe_pcrs: Mapping[int, bytes] = PROBE_PCRS,
) -> KeyReview:
    """Review one key policy; :class:`~nitrovault.errors.PolicyError` when it is malformed.

    ``probe_pcrs`` are the "foreign" measurements (a parameter so tests can pass their own randomness).
    """
    parsed = policy if isinstance(policy, Policy) else parse_policy(policy)
    arn = key_arn or f"arn:aws:kms:us-east-1:{_OUTSIDER_ACCOUNT}:key/{key}"
    out = _Collector(key)
    grants: list[Grant] = []

    if manifest is not None and manifest.is_debug:
        names = ", ".join(f"PCR{i}" for i in manifest.debug_pcrs)
        out.add(
            "NV-MANIFEST-DEBUG", "debug-pcr", "critical", "manifest",
            f"the manifest's {names} are all zeros: a debug-mode image; never bind a production key to it",
        )

    # Key administrators: named in a management statement (one that deletes/disables the key and yields no
    # plaintext). A kms:* grant is judged on its own (NV-KMS-STAR). Principals that also use the key
    # (any plaintext action anywhere) are "users": their PutKeyPolicy is an escalation, not break-glass.
    admins: set[str] = set()
    users: set[str] = set()
    for statement in parsed.statements:
        if statement.effect != "Allow":
            continue
        named = [p for p in _principals(statement) if p != "*" and not _is_root(p)]
        if any(_covers(statement, a) for a in PLAINTEXT_ACTIONS):
            users.update(named)
        elif not _full_wildcard(statement) and any(_covers(statement, a) for a in _ADMIN_MARKERS):
            admins.update(named)

    def allowed(action: str, who: str, ctx: Mapping[str, str], pcrs: Mapping[int, bytes] | None) -> bool:
        request = build_request_context(action, who, arn, ctx, pcrs)
        return evaluate_key_policy(parsed, request).allowed

    for statement in parsed.statements:
        if statement.effect != "Allow":
            continue
        label = statement.label
        plaintext = [a for a in PLAINTEXT_ACTIONS if _covers(statement, a)]
        escalation = [a for a in ESCALATION_ACTIONS if _covers(statement, a)]
        if not plaintext and not escalation:
            continue
        if statement.not_actions is not None and plaintext:
            out.add(
                "NV-NOTACTION", "negated-element", "medium", label,
                f"NotAction leaves plaintext actions allowed: {', '.join(plaintext)}",
            )
        if statement.not_principal is not None and plaintext:
            out.add(
                "NV-NOTPRINCIPAL", "negated-element", "high", label,
                "NotPrincipal in an Allow grants plaintext actions to everyone not listed",
            )
        att = _attestation(statement)
        mediated = None if att.clauses else _service_mediated(statement)
        full = _full_wildcard(statement)
        measurements = _check_attestation_clauses(out, statement, att, manifest) if att.clauses else {}
        context = _encryption_context(statement)
        for principal in _principals(statement):
            who = _probe_arn(principal)
            if who is None:
                continue
            root, everyone = _is_root(principal), principal == "*"
            if full and not root and principal not in admins:
                out.add(
                    "NV-KMS-STAR", "escalation", "high", label,
                    "kms:* (or an equivalent wildcard) to a principal that is not a key administrator",
                    principal,
                )
            elif full and principal in admins:
                out.add(
                    "NV-KMS-STAR-ADMIN", "escalation", "high", label,
                    "kms:* to a key administrator: administration and plaintext in one principal", principal
                )
            break_glass = principal in admins and principal not in users and not plaintext
            # PutKeyPolicy for a pure administrator is the documented break-glass path: a visible,
            # logged policy change, not a silent decrypt. Everything else here is an escalation.
            escalating = [a for a in escalation if not (a == "kms:PutKeyPolicy" and break_glass)]
            if escalating:
                how = {"kms:CreateGrant": "a grant", "kms:PutKeyPolicy": "a new key policy"}
                out.add(
                    "NV-ESCALATION", "escalation", "critical" if (root or everyone) else "high", label,
                    f"{' and '.join(escalating)} let this principal give itself plaintext access through "
                    + " or ".join(how[a] for a in escalating),
                    principal,
                )
            for action in plaintext:
                unattested = allowed(action, who, context, None)
                foreign = allowed(action, who, context, probe_pcrs)
                expected = allowed(action, who, context, manifest.pcrs) if manifest is not None else None
                if att.clauses:
                    verdict: Verdict = "attested-release"
                elif mediated and action in _SERVICE_MEDIATED_ACTIONS and not (root or everyone):
                    verdict = "service-mediated"
                    expected = None  # no enclave is involved: the manifest does not apply
                elif action in _TO_CALLER:
                    verdict = "plaintext-to-caller"
                else:
                    verdict = "unattested-plaintext"
                grants.append(
                    Grant(label, principal, (action,), att.summary, measurements, verdict,
                          unattested, foreign, expected)
                )
                _judge(out, statement, principal, action, verdict, unattested, foreign, root, everyone)
                if verdict == "attested-release" and expected is False:
                    out.prove("NV-MANIFEST-MISMATCH", label)

    # Administrators must not be able to decrypt, with or without an enclave.
    for admin in sorted(admins):
        who = _probe_arn(admin)
        if who is None:
            continue
        contexts = [_encryption_context(s) for s in parsed.statements if s.effect == "Allow"] or [{}]
        pcr_sets: list[Mapping[int, bytes] | None] = [None, probe_pcrs]
        if manifest is not None:
            pcr_sets.append(manifest.pcrs)
        if any(allowed("kms:Decrypt", who, ctx, pcrs) for ctx in contexts for pcrs in pcr_sets):
            out.add(
                "NV-ADMIN-DECRYPT", "escalation", "high", "policy",
                "a key administrator can also Decrypt: administration and use must be separate", admin, True,
            )

    # Defence in depth: an explicit Deny of Decrypt without attestation, for everyone.
    outsider = f"arn:aws:iam::{_OUTSIDER_ACCOUNT}:role/nitrovault-review-anyone"
    decision = evaluate_key_policy(parsed, build_request_context("kms:Decrypt", outsider, arn, {}, None))
    if not decision.deny and not _is_at_rest_key(parsed):
        out.add(
            "NV-NO-DENY", "plaintext-without-attestation", "medium", "policy",
            "no explicit Deny of kms:Decrypt without an attestation document (add one for everyone: "
            'Condition {"Null": {"kms:RecipientAttestation:PCR0": "true"}})',
        )

    findings = sorted(
        out.findings.values(), key=lambda f: (-SEVERITY_ORDER[f.severity], f.statement, f.rule_id)
    )
    return KeyReview(key, source, tuple(grants), tuple(findings))


def _judge(
    out: _Collector,
    statement: Statement,
    principal: str,
    action: str,
    verdict: Verdict,
    unattested: bool,
    foreign: bool,
    root: bool,
    everyone: bool,
) -> None:
    """Findings for one (statement, principal, plaintext action) from the static reading and the proofs."""
    label = statement.label
    short = action.split(":")[1]
    if root:
        out.add(
            "NV-ROOT-DELEGATION", "root-delegation", "critical" if verdict != "attested-release" else "high",
            label,
            f"the account principal is allowed {short}: any IAM identity an IAM policy allows can use it",
            principal, unattested or foreign,
        )
    if everyone and verdict != "attested-release":
        out.add(
            "NV-WILDCARD-PRINCIPAL", "wildcard-principal", "critical", label,
            f'"*" principal is allowed {short} without attestation conditions', principal, unattested,
        )
    if verdict == "service-mediated":
        if unattested:  # the service conditions did not stop a direct call: the reading was wrong
            out.add(
                "NV-PLAINTEXT-UNATTESTED", "plaintext-without-attestation", "high", label,
                f"{principal} can {short} directly, not only through the service (proved by evaluation)",
                principal, True,
            )
        return
    if verdict == "plaintext-to-caller":
        if root or everyone or not _has_context_condition(statement):
            out.add(
                "NV-DATAKEY-UNCONSTRAINED",
                "context-unconstrained",
                "high" if (root or everyone) else "medium",
                label,
                f"{short} returns a plaintext data key: restrict it to one sealing role AND the model's "
                "encryption context (kms:EncryptionContext:*)",
                principal, unattested,
            )
        return
    if verdict == "unattested-plaintext" and unattested:
        out.add(
            "NV-PLAINTEXT-UNATTESTED", "plaintext-without-attestation", "critical" if everyone else "high",
            label, f"{principal} can {short} without any attestation (proved by evaluation)", principal, True,
        )
    elif verdict == "unattested-plaintext" and foreign:
        out.add(
            "NV-ANY-ENCLAVE", "weak-binding", "critical", label,
            f"{principal} can {short} from ANY enclave image (proved with foreign PCRs)", principal, True,
        )
    elif verdict == "unattested-plaintext":  # e.g. guarded only by keys the probe cannot satisfy
        out.add(
            "NV-PLAINTEXT-UNATTESTED", "plaintext-without-attestation", "critical" if everyone else "high",
            label, f"{principal} is allowed {short} without attestation conditions (not proved: other "
            "conditions or a Deny stopped the probe)", principal, False,
        )
    if verdict == "attested-release":
        if unattested:
            out.add(
                "NV-ATT-BYPASS", "plaintext-without-attestation", "critical", label,
                f"{principal} can {short} WITHOUT an attestation document despite the attestation "
                "conditions (proved by evaluation)",
                principal, True,
            )
        elif foreign:
            out.add(
                "NV-ANY-ENCLAVE", "weak-binding", "critical", label,
                f"{principal} can {short} from an enclave with foreign PCRs (proved by evaluation)",
                principal, True,
            )


# -- CloudFormation ---------------------------------------------------------------------------------------

_PSEUDO = {"AWS::Partition": "aws", "AWS::URLSuffix": "amazonaws.com", "AWS::NoValue": ""}


@dataclass(frozen=True)
class TemplateEnv:
    """What intrinsics resolve against: the template's resources and parameters, the account and region."""

    resources: Mapping[str, Any]
    parameters: Mapping[str, Any]
    account: str | None
    region: str | None


def _ref(name: str, env: TemplateEnv) -> str:
    if name in _PSEUDO:
        return _PSEUDO[name]
    if name == "AWS::AccountId":
        return env.account or "<AccountId>"
    if name == "AWS::Region":
        return env.region or "<Region>"
    if name.startswith("AWS::"):
        return f"<{name[5:]}>"
    param = env.parameters.get(name)
    if isinstance(param, Mapping) and isinstance(param.get("Default"), str):
        return str(param["Default"])
    return f"<{name}>"


def _get_att(logical: str, attribute: str, env: TemplateEnv) -> str:
    resource = env.resources.get(logical)
    kind = resource.get("Type") if isinstance(resource, Mapping) else None
    props = resource.get("Properties", {}) if isinstance(resource, Mapping) else {}
    if attribute == "Arn" and kind in ("AWS::IAM::Role", "AWS::IAM::User"):
        noun = "role" if kind == "AWS::IAM::Role" else "user"
        name_key = "RoleName" if noun == "role" else "UserName"
        name = props.get(name_key) if isinstance(props, Mapping) else None
        rendered = render_intrinsics(name, env) if name is not None else logical
        account = env.account or "<AccountId>"
        return f"arn:aws:iam::{account}:{noun}/{rendered}"
    return f"<{logical}.{attribute}>"


def _sub(template: str, variables: Mapping[str, Any], env: TemplateEnv) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name.startswith("!"):
            return "${" + name[1:] + "}"
        if name in variables:
            return str(render_intrinsics(variables[name], env))
        if "." in name:
            logical, attribute = name.split(".", 1)
            return _get_att(logical, attribute, env)
        return _ref(name, env)

    return re.sub(r"\$\{([^}]+)\}", one, template)


def render_intrinsics(value: Any, env: TemplateEnv) -> Any:
    """Replace CloudFormation intrinsics with readable strings (``Ref AWS::AccountId`` -> the account or
    ``<AccountId>``; a role's ``Fn::GetAtt Arn`` -> ``arn:aws:iam::<AccountId>:role/<LogicalId>``)."""
    if isinstance(value, list):
        return [render_intrinsics(v, env) for v in value]
    if not isinstance(value, Mapping):
        return value
    if len(value) == 1:
        (name, arg), = value.items()
        if name == "Ref" and isinstance(arg, str):
            return _ref(arg, env)
        if name == "Fn::GetAtt":
            parts = arg.split(".", 1) if isinstance(arg, str) else list(arg)
            if len(parts) == 2:
                return _get_att(str(parts[0]), str(render_intrinsics(parts[1], env)), env)
        if name == "Fn::Join" and isinstance(arg, list) and len(arg) == 2 and isinstance(arg[1], list):
            return str(arg[0]).join(str(render_intrinsics(v, env)) for v in arg[1])
        if name == "Fn::Sub":
            if isinstance(arg, str):
                return _sub(arg, {}, env)
            if isinstance(arg, list) and len(arg) == 2 and isinstance(arg[1], Mapping):
                return _sub(str(arg[0]), arg[1], env)
        if name == "Fn::Select" and isinstance(arg, list) and len(arg) == 2:
            items = render_intrinsics(arg[1], env)
            if isinstance(items, list) and str(arg[0]).isdigit() and int(arg[0]) < len(items):
                return items[int(arg[0])]
        if name == "Fn::ImportValue":
            return f"<ImportValue:{render_intrinsics(arg, env)}>"
        if name.startswith("Fn::"):
            return f"<{name[4:]}>"
    return {k: render_intrinsics(v, env) for k, v in value.items()}


def keys_from_template(
    template: Mapping[str, Any], *, account: str | None = None, region: str | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """Every ``AWS::KMS::Key``'s ``KeyPolicy`` as ``(logical id, rendered policy)``, in template order."""
    resources = template.get("Resources")
    if not isinstance(resources, Mapping):
        return []
    params = template.get("Parameters")
    env = TemplateEnv(resources, params if isinstance(params, Mapping) else {}, account, region)
    keys = []
    for logical, resource in resources.items():
        if not isinstance(resource, Mapping) or resource.get("Type") != "AWS::KMS::Key":
            continue
        props = resource.get("Properties")
        policy = props.get("KeyPolicy") if isinstance(props, Mapping) else None
        if policy is None:  # KMS then applies its default policy: root kms:*
            policy = _DEFAULT_KEY_POLICY
        rendered = render_intrinsics(policy, env)
        keys.append((str(logical), rendered if isinstance(rendered, dict) else {"Statement": rendered}))
    return keys


_DEFAULT_KEY_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Sid": "Enable IAM User Permissions (KMS default)",
            "Effect": "Allow",
            "Principal": {"AWS": {"Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:root"}},
            "Action": "kms:*",
            "Resource": "*",
        }
    ],
}


def review_template(
    template: Mapping[str, Any],
    *,
    source: str = "template",
    manifest: PcrManifest | None = None,
    account: str | None = None,
    region: str | None = None,
) -> list[KeyReview]:
    """Review every KMS key of a CloudFormation template (a key without KeyPolicy gets KMS's default)."""
    reviews = []
    for logical, policy in keys_from_template(template, account=account, region=region):
        key_arn = f"arn:aws:kms:{region or 'us-east-1'}:{account or _OUTSIDER_ACCOUNT}:key/{logical}"
        name = f"{source}/{logical}"
        reviews.append(review_policy(policy, key=name, source=source, manifest=manifest, key_arn=key_arn))
    return reviews


def worst(findings: Iterable[Finding]) -> str | None:
    """The highest severity among ``findings`` (None when there are none)."""
    levels: Sequence[Finding] = list(findings)
    if not levels:
        return None
    return max(levels, key=lambda f: SEVERITY_ORDER[f.severity]).severity
