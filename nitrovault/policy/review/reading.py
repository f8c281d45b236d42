"""Static reading of one ``Allow`` statement: which actions it covers, which principals it names, how its
attestation and encryption-context conditions are written, whether it is service-mediated. Pure; reports
no finding (the checks in :mod:`~nitrovault.policy.review.statements`,
:mod:`~nitrovault.policy.review.principals` and :mod:`~nitrovault.policy.review.denies` do).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from nitrovault.policy.conditions import ConditionClause, wildcard_match
from nitrovault.policy.evaluate import Statement

__all__ = [
    "CALLER_KEYS",
    "ESCALATION_ACTIONS",
    "MULTIVALUED_KEYS",
    "PINNING_OPERATORS",
    "PLAINTEXT_ACTIONS",
    "SERVICE_MEDIATED_ACTIONS",
    "TO_CALLER",
    "Attestation",
    "Reading",
    "attestation",
    "covers",
    "encryption_context",
    "full_wildcard",
    "has_context_condition",
    "is_attestation_key",
    "is_root",
    "pcr_index",
    "pinned_values",
    "principals",
    "read",
    "root_arn",
    "service_mediated",
]

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
TO_CALLER = ("kms:GenerateDataKey", "kms:GenerateDataKeyPair")
#: Actions that let a principal give itself (or anyone) the above: grants, or a new policy.
ESCALATION_ACTIONS = ("kms:CreateGrant", "kms:PutKeyPolicy")
#: What an AWS service calls on a caller's behalf for envelope encryption (S3 SSE-KMS, ...): the only
#: actions a statement can make service-mediated.
SERVICE_MEDIATED_ACTIONS = ("kms:Decrypt", "kms:GenerateDataKey")
#: An action no policy names: a statement covering it (and Decrypt) covers everything (``kms:*``).
_UNNAMED_ACTION = "kms:NitrovaultReviewUnnamedAction"

#: Operators that pin a condition key to the listed values.
PINNING_OPERATORS = ("StringEquals", "StringEqualsIgnoreCase")
_ATTESTATION_PREFIX = "kms:recipientattestation:"
_CONTEXT_PREFIX = "kms:encryptioncontext:"
_PCR_KEY = re.compile(r"kms:recipientattestation:pcr(\d+)", re.IGNORECASE)
_IMAGE_KEY = "kms:recipientattestation:imagesha384"
_ROOT_ARN = re.compile(r"arn:([^:]+):iam::([^:]+):root")
#: Condition keys whose value the evaluator derives from the caller's ARN (``evaluate._derived_context``):
#: fixed by who calls, so evaluating one caller decides them for that caller.
CALLER_KEYS = frozenset({"aws:principalarn", "aws:principalaccount", "kms:calleraccount"})
#: Condition keys a request may carry with several values (IAM User Guide, "Single-valued vs. multivalued
#: context keys"): a positive operator admits a request whose values merely include the policy's, so
#: such a key is never *pinned* (:func:`pinned_values`).
MULTIVALUED_KEYS = frozenset({
    "aws:calledvia",
    "aws:principalorgpaths",
    "aws:principalservicenameslist",
    "aws:resourceorgpaths",
    "aws:sourceorgpaths",
    "aws:tagkeys",
    "kms:encryptioncontextkeys",
    "kms:grantoperations",
})
_ACCOUNT_ID = re.compile(r"\d{12}")
#: One regional endpoint of one service, as ``kms:ViaService`` names it (``s3.eu-west-1.amazonaws.com``).
_VIA_SERVICE = re.compile(r"([a-z0-9-]+)\.[a-z]{2}(?:-[a-z]+)+-\d{1,2}\.amazonaws\.com")
#: Operators that can limit a service's resource-ARN encryption context to named resources.
_RESOURCE_OPERATORS = ("StringEquals", "StringEqualsIgnoreCase", "StringLike", "ArnEquals", "ArnLike")


# -- actions ----------------------------------------------------------------------------------------------


def covers(statement: Statement, action: str) -> bool:
    """``statement`` applies to ``action`` (its ``Action`` wildcards, or what its ``NotAction`` leaves)."""
    if statement.actions is not None:
        return any(wildcard_match(a, action, ignore_case=True) for a in statement.actions)
    assert statement.not_actions is not None
    return not any(wildcard_match(a, action, ignore_case=True) for a in statement.not_actions)


def full_wildcard(statement: Statement) -> bool:
    """``statement`` covers every action (``kms:*`` or an equivalent wildcard / ``NotAction``)."""
    return covers(statement, _UNNAMED_ACTION) and covers(statement, "kms:Decrypt")


# -- principals -------------------------------------------------------------------------------------------


def principals(statement: Statement) -> list[str]:
    """Principals as labels: ``*``, account roots (normalised to ARNs), role/user ARNs, ``NOT(...)``."""
    if statement.principal is not None:
        if statement.principal.everyone:
            return ["*"]
        out = [f"arn:aws:iam::{p}:root" if _ACCOUNT_ID.fullmatch(p) else p for p in statement.principal.aws]
        return out + [f"service:{s}" for s in statement.principal.service]
    assert statement.not_principal is not None
    return ["*"]  # NotPrincipal in an Allow: everyone but a few, reviewed as everyone


def root_arn(label: str) -> re.Match[str] | None:
    """The match (partition, account) when ``label`` is an account principal ``arn:...:iam::N:root``."""
    return _ROOT_ARN.fullmatch(label)


def is_root(label: str) -> bool:
    return root_arn(label) is not None


# -- conditions -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attestation:
    """A statement's ``kms:RecipientAttestation:*`` conditions."""

    clauses: tuple[ConditionClause, ...]
    #: PCR index -> the policy values bound by a pinning operator (ImageSha384 counts as PCR0)
    bound: Mapping[int, tuple[str, ...]]
    #: the Grant row's conditions column: operators and keys, never values
    summary: str


def attestation(statement: Statement) -> Attestation:
    clauses = tuple(c for c in statement.conditions if c.key.lower().startswith(_ATTESTATION_PREFIX))
    bound: dict[int, tuple[str, ...]] = {}
    for c in clauses:
        if c.base not in PINNING_OPERATORS and c.base != "StringLike":
            continue
        if c.negated:
            continue
        index = pcr_index(c.key)
        if index is not None:
            bound[index] = bound.get(index, ()) + c.values
    ops: dict[str, list[str]] = {}
    for c in statement.conditions:
        short = c.key.split(":")[-1] if c.key.lower().startswith(_ATTESTATION_PREFIX) else c.key
        ops.setdefault(c.operator, []).append(short)
    summary = "; ".join(f"{op}({','.join(keys)})" for op, keys in ops.items()) or "none"
    return Attestation(clauses, bound, summary)


def is_attestation_key(key: str) -> bool:
    """A ``kms:RecipientAttestation:*`` key (absent from every request without an attestation document)."""
    return key.lower().startswith(_ATTESTATION_PREFIX)


def pinned_values(statement: Statement) -> dict[str, str]:
    """Condition keys (lower-cased) that every request ``statement`` allows carries with exactly one value.

    A clause pins its key when it is a positive ``StringEquals`` (no ``IfExists``, no set operator) with one
    value, on a single-valued key (not :data:`MULTIVALUED_KEYS`); on an attestation key
    ``StringEqualsIgnoreCase`` pins too, because KMS writes PCRs as lower-case hex (the pinned value is then
    lower-cased). ``ImageSha384`` and ``PCR0`` are the same measurement, so pinning one pins the other.
    Keys bound twice to different values are left out (the statement then matches nothing; the
    measurement-set checks report it).
    """
    seen: dict[str, set[str]] = {}
    for c in statement.conditions:
        if c.negated or c.if_exists or c.set_operator is not None or len(set(c.values)) != 1:
            continue
        key = c.key.lower()
        if key in MULTIVALUED_KEYS:
            continue
        if is_attestation_key(key):
            if c.base not in PINNING_OPERATORS:
                continue
            value = c.values[0].lower()
            names = {key}
            if pcr_index(key) == 0:
                names = {_IMAGE_KEY, "kms:recipientattestation:pcr0"}
        elif c.base == "StringEquals":
            value, names = c.values[0], {key}
        else:
            continue
        for name in names:
            seen.setdefault(name, set()).add(value)
    return {k: next(iter(v)) for k, v in seen.items() if len(v) == 1}


def pcr_index(key: str) -> int | None:
    """The PCR an attestation condition key names (``ImageSha384`` is PCR0), or None."""
    if key.lower() == _IMAGE_KEY:
        return 0
    match = _PCR_KEY.fullmatch(key)
    return int(match.group(1)) if match else None


def encryption_context(statement: Statement) -> dict[str, str]:
    """A context satisfying the statement's own positive encryption-context conditions."""
    context: dict[str, str] = {}
    for c in statement.conditions:
        if c.negated or c.base not in (*PINNING_OPERATORS, "StringLike", "ArnEquals", "ArnLike"):
            continue
        if c.key.lower().startswith(_CONTEXT_PREFIX):
            name = c.key[len(_CONTEXT_PREFIX) :]
            context[name] = c.values[0].replace("*", "x").replace("?", "x")
    return context


def has_context_condition(statement: Statement) -> bool:
    """A pinning (not ``IfExists``, not negated) ``kms:EncryptionContext:*`` condition."""
    return any(
        not c.negated
        and not c.if_exists
        and c.base in PINNING_OPERATORS
        and c.key.lower().startswith(_CONTEXT_PREFIX)
        for c in statement.conditions
    )


# -- service-mediated use ---------------------------------------------------------------------------------


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


def service_mediated(statement: Statement) -> str | None:
    """The one AWS service through which alone ``statement`` can be used, or None (package docstring:
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


# -- one statement, read once -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """What the checks need to know of one ``Allow`` statement."""

    statement: Statement
    #: the plaintext-yielding actions it covers, in :data:`PLAINTEXT_ACTIONS` order
    plaintext: tuple[str, ...]
    #: the escalation actions it covers, in :data:`ESCALATION_ACTIONS` order
    escalation: tuple[str, ...]
    attestation: Attestation
    #: the one service it is limited to (:func:`service_mediated`); None with attestation conditions
    service: str | None
    #: it covers every action (:func:`full_wildcard`)
    full: bool
    #: an encryption context its own conditions accept (for the evaluator's requests)
    context: Mapping[str, str]


def read(statement: Statement) -> Reading:
    att = attestation(statement)
    return Reading(
        statement,
        tuple(a for a in PLAINTEXT_ACTIONS if covers(statement, a)),
        tuple(a for a in ESCALATION_ACTIONS if covers(statement, a)),
        att,
        None if att.clauses else service_mediated(statement),
        full_wildcard(statement),
        encryption_context(statement),
    )
