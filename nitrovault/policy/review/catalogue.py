"""The rule catalogue: every rule the reviewer has, with its category and its severity. Pure.

A check reports a finding by rule id only; the rule decides the finding's category (one of
:data:`CATEGORIES`) and its severity: :attr:`Rule.severity`, or :attr:`Rule.raised` when the check says the
rule's raising condition (:attr:`Rule.raised_when`) holds. ``docs/review.md`` has each rule's long form;
the CLI's SARIF output lists :data:`RULES` as its driver's rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = ["CATEGORIES", "RULES", "SEVERITIES", "SEVERITY_ORDER", "Rule", "Severity"]

Severity = Literal["low", "medium", "high", "critical"]
#: The severities, weakest first (``--fail-on`` compares along this order).
SEVERITIES: tuple[Severity, ...] = ("low", "medium", "high", "critical")
SEVERITY_ORDER: Mapping[str, int] = {s: i for i, s in enumerate(SEVERITIES)}

#: The reviewer's fixed finding vocabulary; every finding has exactly one of these.
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
    """One reviewer rule: a stable id, its category from :data:`CATEGORIES`, a one-line summary, and the
    severity of its findings (``raised`` instead when ``raised_when`` holds; None: always ``severity``)."""

    rule_id: str
    category: str
    summary: str
    severity: Severity
    raised: Severity | None = None
    raised_when: str = ""


_RAISED_FOR_ANYONE = "the principal is the account root or \"*\""

#: Every rule the reviewer has, by id (the SARIF driver's rule list; docs/review.md has the long form).
RULES: Mapping[str, Rule] = {
    r.rule_id: r
    for r in (
        Rule("NV-ROOT-DELEGATION", "root-delegation",
             "The account principal is allowed a plaintext action: IAM policies decide who gets it",
             "high", "critical", "the statement has no attestation condition"),
        Rule("NV-WILDCARD-PRINCIPAL", "wildcard-principal",
             "Principal \"*\" is allowed a plaintext action without attestation conditions", "critical"),
        Rule("NV-KMS-STAR", "escalation", "kms:* (or an equivalent wildcard) to a non-administrator", "high"),
        Rule("NV-KMS-STAR-ADMIN", "escalation", "kms:* to a key administrator", "high"),
        Rule("NV-ESCALATION", "escalation",
             "CreateGrant, or PutKeyPolicy outside the administrators' break-glass statement",
             "high", "critical", _RAISED_FOR_ANYONE),
        Rule("NV-ADMIN-DECRYPT", "escalation", "A key administrator can also Decrypt", "high"),
        Rule("NV-PLAINTEXT-UNATTESTED", "plaintext-without-attestation",
             "Decrypt/ReEncryptFrom/DeriveSharedSecret without attestation conditions",
             "high", "critical", 'the principal is "*"'),
        Rule("NV-ATT-BYPASS", "plaintext-without-attestation",
             "Attestation conditions present, yet allowed without an attestation document", "critical"),
        Rule("NV-NO-DENY", "plaintext-without-attestation",
             "No explicit Deny of Decrypt without an attestation document", "medium"),
        Rule("NV-ANY-ENCLAVE", "weak-binding", "Allowed for an enclave with foreign PCRs", "critical"),
        Rule("NV-ATT-NULL-ONLY", "weak-binding", "Attestation conditions are Null-only", "critical"),
        Rule("NV-BIND-NO-IMAGE", "weak-binding", "No image measurement (PCR0/1/2 or ImageSha384) bound",
             "critical"),
        Rule("NV-BIND-MISSING-PCR", "weak-binding", "One of PCR0, PCR1, PCR2 is not bound", "medium"),
        Rule("NV-MANIFEST-UNBOUND", "weak-binding", "The manifest has PCR3/4/8 but the statement omits it",
             "low"),
        Rule("NV-ATT-OPERATOR", "weak-binding", "An attestation key under a non-string operator", "high"),
        Rule("NV-ATT-IFEXISTS", "set-operator-misuse", "...IfExists on an attestation key", "critical"),
        Rule("NV-ATT-SETOP", "set-operator-misuse",
             "ForAnyValue/ForAllValues on a single-valued attestation key", "high"),
        Rule("NV-ATT-NEGATED", "negated-element", "A negated operator on an attestation key", "high"),
        Rule("NV-NOTACTION", "negated-element", "NotAction leaves plaintext actions allowed", "medium"),
        Rule("NV-NOTPRINCIPAL", "negated-element", "NotPrincipal in an Allow with plaintext actions", "high"),
        Rule("NV-ATT-PATTERN", "pcr-pattern-match", "StringLike with a wildcard on an attestation key",
             "high"),
        Rule("NV-PCR-MALFORMED", "pcr-malformed", "A PCR value that is not 96 lower-case hex digits", "high"),
        Rule("NV-PCR-DEBUG", "debug-pcr", "An all-zero PCR0/1/2/8 (debug-mode enclave) in the policy",
             "critical"),
        Rule("NV-MANIFEST-DEBUG", "debug-pcr", "The manifest itself is a debug-mode image", "critical"),
        Rule("NV-MANIFEST-MISMATCH", "manifest-mismatch", "A bound PCR differs from the manifest", "high"),
        Rule("NV-MANIFEST-EXTRA", "manifest-mismatch", "The policy binds a PCR the manifest does not have",
             "medium"),
        Rule("NV-DATAKEY-UNCONSTRAINED", "context-unconstrained",
             "GenerateDataKey* without a specific role and an encryption-context condition",
             "medium", "high", _RAISED_FOR_ANYONE),
    )
}
