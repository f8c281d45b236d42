"""The rule catalogue: every rule the reviewer has, with its category and its severity. Pure.

A check reports a finding by rule id only; the rule decides the finding's category (one of
:data:`CATEGORIES`) and its severity: :attr:`Rule.severity`, or :attr:`Rule.raised` when the check says the
rule's raising condition (:attr:`Rule.raised_when`) holds. ``docs/review.md`` has each rule's long form and
the categories as a stable contract; the CLI's SARIF output lists :data:`RULES` as its driver's rules.

Every category has one **kind** (:data:`CATEGORY_KINDS`), so a reader can trust the category alone:

* ``exposure``: someone other than the reviewed image can obtain key material, or give itself that. The
  evaluator either proved it (``proved: true``) or could not rule it out because the policy depends on
  condition keys the reviewer does not model (``proved: false``). Never advice.
* ``measurement-set``: what an accepted measurement set (one release statement's PCRs) or a manifest is:
  debug-mode, malformed, unsigned, or not the reviewed image.
* ``construction``: how a condition or element is written (a set operator, a negation) when that is
  wrong whatever else the policy holds.
* ``recommendation``: defence in depth; never above ``medium`` (tested).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "CATEGORIES",
    "CATEGORY_KINDS",
    "KINDS",
    "RECOMMENDATION_MAX",
    "RULES",
    "SEVERITIES",
    "SEVERITY_ORDER",
    "Kind",
    "Rule",
    "Severity",
]

Severity = Literal["low", "medium", "high", "critical"]
#: The severities, weakest first (``--fail-on`` compares along this order).
SEVERITIES: tuple[Severity, ...] = ("low", "medium", "high", "critical")
SEVERITY_ORDER: Mapping[str, int] = {s: i for i, s in enumerate(SEVERITIES)}

Kind = Literal["exposure", "measurement-set", "construction", "recommendation"]
KINDS: tuple[Kind, ...] = ("exposure", "measurement-set", "construction", "recommendation")
#: The highest severity a recommendation may have.
RECOMMENDATION_MAX: Severity = "medium"

#: The reviewer's fixed finding vocabulary and the kind of each category (module docstring).
CATEGORY_KINDS: Mapping[str, Kind] = {
    "plaintext-without-attestation": "exposure",
    "root-delegation": "exposure",
    "wildcard-principal": "exposure",
    "escalation": "exposure",
    "weak-binding": "exposure",
    "context-unconstrained": "exposure",
    "debug-pcr": "measurement-set",
    "pcr-malformed": "measurement-set",
    "pcr-pattern-match": "measurement-set",
    "manifest-mismatch": "measurement-set",
    "malformed-measurement-set": "measurement-set",
    "unsigned-measurement-set": "measurement-set",
    "set-operator-misuse": "construction",
    "negated-element": "construction",
    "recommendation": "recommendation",
}
#: Every finding has exactly one of these.
CATEGORIES: tuple[str, ...] = tuple(CATEGORY_KINDS)


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

    @property
    def kind(self) -> Kind:
        return CATEGORY_KINDS[self.category]


_RAISED_FOR_ANYONE = "the principal is the account root or \"*\""

#: Every rule the reviewer has, by id (the SARIF driver's rule list; docs/review.md has the long form).
RULES: Mapping[str, Rule] = {
    r.rule_id: r
    for r in (
        # -- exposures ------------------------------------------------------------------------------------
        Rule("NV-PLAINTEXT-UNATTESTED", "plaintext-without-attestation",
             "A plaintext action is allowed without an attestation document (decided by evaluation)",
             "high", "critical", 'the principal is "*"'),
        Rule("NV-ATT-BYPASS", "plaintext-without-attestation",
             "Attestation conditions present, yet allowed without an attestation document", "critical"),
        Rule("NV-ROOT-DELEGATION", "root-delegation",
             "The account principal is allowed a plaintext action: IAM policies decide who gets it",
             "high", "critical", "an identity of the account obtains it without attestation (by evaluation)"),
        Rule("NV-WILDCARD-PRINCIPAL", "wildcard-principal",
             "Principal \"*\" is allowed a plaintext action without attestation conditions", "critical"),
        Rule("NV-WILDCARD-ATTESTED", "wildcard-principal",
             "Principal \"*\" is allowed a plaintext action with attestation conditions: any account that "
             "runs the same image gets the key", "high"),
        Rule("NV-KMS-STAR", "escalation", "kms:* (or an equivalent wildcard) to a non-administrator", "high"),
        Rule("NV-KMS-STAR-ADMIN", "escalation", "kms:* to a key administrator", "high"),
        Rule("NV-ESCALATION", "escalation",
             "CreateGrant, or PutKeyPolicy outside the administrators' break-glass statement",
             "high", "critical", _RAISED_FOR_ANYONE),
        Rule("NV-ADMIN-DECRYPT", "escalation", "A key administrator can also Decrypt", "high"),
        Rule("NV-ANY-ENCLAVE", "weak-binding", "Allowed for an enclave with foreign PCRs", "critical"),
        Rule("NV-ATT-NULL-ONLY", "weak-binding", "Attestation conditions are Null-only", "critical"),
        Rule("NV-BIND-NO-IMAGE", "weak-binding",
             "No image measurement (PCR0/1/2, ImageSha384 or a signing certificate's PCR8) bound",
             "critical"),
        Rule("NV-DATAKEY-UNCONSTRAINED", "context-unconstrained",
             "GenerateDataKey* without a specific role and an encryption-context condition",
             "medium", "high", _RAISED_FOR_ANYONE),
        # -- measurement sets -----------------------------------------------------------------------------
        Rule("NV-SET-DEBUG", "debug-pcr",
             "A measurement set whose PCR0/1/2/8 are all zeros: a debug-mode enclave", "critical"),
        Rule("NV-PCR-DEBUG", "debug-pcr", "An all-zero PCR0/1/2 (debug-mode enclave) in the policy",
             "critical"),
        Rule("NV-MANIFEST-DEBUG", "debug-pcr", "The manifest itself is a debug-mode image", "critical"),
        Rule("NV-SET-MALFORMED", "malformed-measurement-set",
             "A measurement set with a malformed value, several values for one PCR, or a non-equality "
             "operator", "high"),
        Rule("NV-SET-UNSIGNED", "unsigned-measurement-set",
             "A measurement set that binds PCR8 to all zeros (an unsigned image), or neither PCR0 nor PCR8",
             "medium", "high",
             "the set binds no PCR0 and no signing certificate: nothing identifies the image"),
        Rule("NV-PCR-MALFORMED", "pcr-malformed", "A PCR value that is not 96 lower-case hex digits", "high"),
        Rule("NV-ATT-OPERATOR", "pcr-malformed", "An attestation key under a non-string operator", "high"),
        Rule("NV-ATT-PATTERN", "pcr-pattern-match", "StringLike with a wildcard on an attestation key",
             "high"),
        Rule("NV-MANIFEST-MISMATCH", "manifest-mismatch", "A bound PCR differs from the manifest", "high"),
        Rule("NV-MANIFEST-EXTRA", "manifest-mismatch", "The policy binds a PCR the manifest does not have",
             "medium"),
        # -- construction ---------------------------------------------------------------------------------
        Rule("NV-ATT-IFEXISTS", "set-operator-misuse", "...IfExists on an attestation key", "critical"),
        Rule("NV-ATT-SETOP", "set-operator-misuse",
             "ForAnyValue/ForAllValues on a single-valued attestation key", "high"),
        Rule("NV-ATT-NEGATED", "negated-element", "A negated operator on an attestation key", "high"),
        Rule("NV-NOTACTION", "negated-element", "NotAction leaves plaintext actions allowed", "medium"),
        Rule("NV-NOTPRINCIPAL", "negated-element", "NotPrincipal in an Allow with plaintext actions", "high"),
        # -- recommendations ------------------------------------------------------------------------------
        Rule("NV-NO-DENY", "recommendation",
             "No explicit Deny of Decrypt without an attestation document (defence in depth)", "medium"),
        Rule("NV-BIND-MISSING-PCR", "recommendation",
             "An image set does not bind all of PCR0, PCR1 and PCR2 (defence in depth)", "medium"),
        Rule("NV-MANIFEST-UNBOUND", "recommendation",
             "The manifest has PCR3/4/8 but the set omits it (defence in depth)", "low"),
    )
}
