"""Deny checks: NV-NO-DENY, the recommended (defence-in-depth) explicit Deny of ``Decrypt`` without an
attestation document, and the at-rest keys that are exempt from it. Pure.

An **at-rest key** has no attestation condition anywhere, and every ``Allow`` yielding plaintext is
service-mediated (:func:`~nitrovault.policy.review.reading.service_mediated`, by named non-root
principals, for ``Decrypt`` / ``GenerateDataKey`` only) or names only AWS service principals; neither
kind covers ``CreateGrant``, ``PutKeyPolicy`` or ``kms:*``. Such a key hands no key material to any
caller, and the Deny would break the service it serves. A key with any attestation condition (a model
key) always needs the Deny.
"""

from __future__ import annotations

from nitrovault.policy.evaluate import Policy, Statement
from nitrovault.policy.review.findings import Collector
from nitrovault.policy.review.probes import Prober, anyone_arn
from nitrovault.policy.review.reading import (
    CALLER_KEYS,
    ESCALATION_ACTIONS,
    PLAINTEXT_ACTIONS,
    SERVICE_MEDIATED_ACTIONS,
    attestation,
    covers,
    full_wildcard,
    is_attestation_key,
    is_root,
    principals,
    service_mediated,
)

__all__ = ["check_deny", "is_at_rest_key"]


def check_deny(out: Collector, prober: Prober) -> None:
    """NV-NO-DENY (a recommendation): no Deny refuses every ``Decrypt`` without an attestation document to
    a caller from no named account. Only a Deny whose conditions are all on attestation or caller keys
    counts: one that also depends on another key (``aws:SourceVpc``, an encryption context ...) refuses
    some unattested requests, not all of them."""
    if is_at_rest_key(prober.policy):
        return
    who = anyone_arn()
    refuses_all = any(
        d.effect == "Deny"
        and all(is_attestation_key(c.key) or c.key.lower() in CALLER_KEYS for c in d.conditions)
        and prober.statement_matches(d, "kms:Decrypt", who, {}, None)
        for d in prober.policy.statements
    )
    if not refuses_all:
        out.add(
            "NV-NO-DENY", "policy",
            "recommendation: no explicit Deny refuses every kms:Decrypt without an attestation document "
            '(defence in depth; add one for everyone: Condition {"Null": {"kms:RecipientAttestation:PCR0": '
            '"true"}})',
        )


def _service_principals_only(statement: Statement) -> bool:
    """Allowed only to AWS service principals, with no escalation action and no ``kms:*``."""
    principal = statement.principal
    return (
        principal is not None
        and not principal.everyone
        and not principal.aws
        and bool(principal.service)
        and not any(covers(statement, a) for a in ESCALATION_ACTIONS)
        and not full_wildcard(statement)
    )


def _service_bound(statement: Statement) -> bool:
    """A plaintext-yielding ``Allow`` that hands no key material to its caller (module docstring)."""
    if _service_principals_only(statement):
        return True
    if service_mediated(statement) is None or statement.principal is None or statement.principal.everyone:
        return False
    named = principals(statement)
    return (
        all(p.startswith("arn:") and not is_root(p) for p in named)
        and all(a in SERVICE_MEDIATED_ACTIONS for a in PLAINTEXT_ACTIONS if covers(statement, a))
        and not any(covers(statement, a) for a in ESCALATION_ACTIONS)
    )


def is_at_rest_key(policy: Policy) -> bool:
    """No attestation condition anywhere, and every plaintext-yielding ``Allow`` is service-bound: such a
    key needs no Deny of Decrypt without attestation."""
    if any(attestation(s).clauses for s in policy.statements):
        return False
    granting = [
        s for s in policy.statements if s.effect == "Allow" and any(covers(s, a) for a in PLAINTEXT_ACTIONS)
    ]
    return bool(granting) and all(_service_bound(s) for s in granting)
