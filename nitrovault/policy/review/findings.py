"""What a review produces: :class:`Grant` rows, :class:`MeasurementSet` s, :class:`Finding` s, a
:class:`KeyReview` per key and the whole :class:`Review`; the :class:`Collector` the checks report into;
severity filters. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from nitrovault.policy.manifest import PcrManifest
from nitrovault.policy.review.catalogue import RULES, SEVERITIES, SEVERITY_ORDER, Severity

__all__ = [
    "Collector",
    "Finding",
    "Grant",
    "KeyReview",
    "MeasurementSet",
    "Review",
    "SetKind",
    "Verdict",
    "reaching",
    "worst",
]


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
    #: True when the evaluator confirmed the claim (see :mod:`nitrovault.policy.review`)
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
    #: PCRn -> "match" / "MISMATCH" / "debug-zeros" / "unsigned" / "bound" (no manifest) / "malformed"
    measurements: Mapping[str, str]
    verdict: Verdict
    #: evaluator answers, for some identity the principal covers: allowed without attestation / with
    #: foreign PCRs / with every manifest's PCRs (``manifest_pcrs`` is None without a manifest, and for a
    #: ``service-mediated`` row: no enclave there)
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


SetKind = Literal["image", "signer", "unidentified"]


@dataclass(frozen=True)
class MeasurementSet:
    """One accepted measurement set: the PCRs one release statement binds (one statement per set is how
    a policy accepts several images, e.g. the current and the next during a rollout)."""

    statement: str
    principals: tuple[str, ...]
    actions: tuple[str, ...]
    #: ``PCRn`` (``ImageSha384`` is PCR0) -> "bound" (no manifest), "match" / "MISMATCH" (with the set's
    #: manifest, or the closest), "debug-zeros", "unsigned" (PCR8 zeros), "malformed", "several-values",
    #: "not-equality"; never a value
    pcrs: Mapping[str, str]
    #: "image" (binds PCR0), "signer" (a non-zero PCR8 without PCR0: every image signed with that
    #: certificate), or "unidentified" (neither)
    kind: SetKind
    #: the index (in the order given) of the manifest every bound PCR equals; None: none, or no manifest
    manifest: int | None
    #: what is wrong with it, among "debug", "malformed", "unsigned"; empty when nothing is
    problems: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "statement": self.statement,
            "principals": list(self.principals),
            "actions": list(self.actions),
            "pcrs": dict(self.pcrs),
            "kind": self.kind,
            "manifest": self.manifest,
            "problems": list(self.problems),
        }


@dataclass(frozen=True)
class KeyReview:
    key: str
    source: str
    grants: tuple[Grant, ...]
    findings: tuple[Finding, ...]
    #: every accepted measurement set, in statement order
    measurement_sets: tuple[MeasurementSet, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "source": self.source,
            "grants": [g.as_dict() for g in self.grants],
            "measurement_sets": [m.as_dict() for m in self.measurement_sets],
            "findings": len(self.findings),
        }


@dataclass(frozen=True)
class Review:
    keys: tuple[KeyReview, ...]
    #: the manifest reviewed against (the first, with several)
    manifest: PcrManifest | None = None
    #: every manifest reviewed against, in order (``manifest`` alone when this is empty)
    manifests: tuple[PcrManifest, ...] = ()

    @property
    def all_manifests(self) -> tuple[PcrManifest, ...]:
        if self.manifests:
            return self.manifests
        return (self.manifest,) if self.manifest is not None else ()

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


def worst(findings: Iterable[Finding]) -> str | None:
    """The highest severity among ``findings`` (None when there are none)."""
    levels: Sequence[Finding] = list(findings)
    if not levels:
        return None
    return max(levels, key=lambda f: SEVERITY_ORDER[f.severity]).severity


@dataclass
class Collector:
    """The findings of one key, at most one per (rule, statement, principal); the first report wins,
    a later *proved* report of the same slot marks it proved."""

    key: str
    findings: dict[tuple[str, str, str | None], Finding] = field(default_factory=dict)

    def add(
        self,
        rule_id: str,
        statement: str,
        message: str,
        principal: str | None = None,
        proved: bool = False,
        *,
        raised: bool = False,
    ) -> None:
        """Report ``rule_id``; its category and severity are the rule's (:data:`RULES`), the raised
        severity when ``raised`` (the rule's ``raised_when`` holds)."""
        rule = RULES[rule_id]
        severity = rule.raised if raised and rule.raised is not None else rule.severity
        slot = (rule_id, statement, principal)
        if slot not in self.findings:
            self.findings[slot] = Finding(
                rule_id, rule.category, severity, self.key, statement, message, principal, proved
            )
        elif proved:
            self.prove(rule_id, statement, principal)

    def prove(self, rule_id: str, statement: str, principal: str | None = None) -> None:
        """Mark a finding as confirmed by the evaluator (no-op when there is no such finding)."""
        slot = (rule_id, statement, principal)
        if slot in self.findings:
            self.findings[slot] = replace(self.findings[slot], proved=True)

    def sorted(self) -> tuple[Finding, ...]:
        """The findings, most severe first, then by statement and rule."""
        def order(f: Finding) -> tuple[int, str, str]:
            return -SEVERITY_ORDER[f.severity], f.statement, f.rule_id

        return tuple(sorted(self.findings.values(), key=order))
