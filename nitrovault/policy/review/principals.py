"""Per-principal checks: for each principal of an ``Allow`` statement, its escalation paths (``kms:*``,
``CreateGrant``, ``PutKeyPolicy``) and, per plaintext action, the :class:`Grant` row -- verdict and the
evaluator's three answers -- with the findings they prove; and the key administrators, who must not
be able to Decrypt. Pure.

Key administrators are the principals of a management statement (disable / schedule deletion, no
plaintext action); principals that use the key anywhere are its users. Only a pure administrator's
``PutKeyPolicy`` is break-glass: a visible, logged policy change, not a silent decrypt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nitrovault.policy.evaluate import Policy, Statement
from nitrovault.policy.manifest import PcrManifest
from nitrovault.policy.review.findings import Collector, Grant, Verdict
from nitrovault.policy.review.probes import Prober, probe_arn
from nitrovault.policy.review.reading import (
    PLAINTEXT_ACTIONS,
    SERVICE_MEDIATED_ACTIONS,
    TO_CALLER,
    Reading,
    covers,
    encryption_context,
    full_wildcard,
    has_context_condition,
    is_root,
    principals,
)

__all__ = ["Roles", "check_admin_decrypt", "check_principals", "key_roles"]

#: Management actions that mark a key-administration statement (PutKeyPolicy alone does not: a principal
#: given only PutKeyPolicy is exactly the escalation the reviewer must report).
_ADMIN_MARKERS = ("kms:ScheduleKeyDeletion", "kms:DisableKey")
_HOW = {"kms:CreateGrant": "a grant", "kms:PutKeyPolicy": "a new key policy"}


@dataclass(frozen=True)
class Roles:
    """The key's named principals (not ``*``, not an account root) by the part they play."""

    #: principals of a management statement that is not a ``kms:*`` grant
    admins: frozenset[str]
    #: principals allowed a plaintext action anywhere
    users: frozenset[str]


def key_roles(policy: Policy) -> Roles:
    """Administrators and users (a ``kms:*`` grant is judged on its own, NV-KMS-STAR)."""
    admins: set[str] = set()
    users: set[str] = set()
    for statement in policy.statements:
        if statement.effect != "Allow":
            continue
        named = [p for p in principals(statement) if p != "*" and not is_root(p)]
        if any(covers(statement, a) for a in PLAINTEXT_ACTIONS):
            users.update(named)
        elif not full_wildcard(statement) and any(covers(statement, a) for a in _ADMIN_MARKERS):
            admins.update(named)
    return Roles(frozenset(admins), frozenset(users))


@dataclass(frozen=True)
class _Principal:
    label: str
    #: the caller ARN the evaluator is asked about
    who: str
    root: bool
    everyone: bool


def check_principals(
    out: Collector,
    prober: Prober,
    reading: Reading,
    measurements: Mapping[str, str],
    roles: Roles,
    manifest: PcrManifest | None,
    probe_pcrs: Mapping[int, bytes],
) -> list[Grant]:
    """Every probeable principal of one statement: escalation findings, then one Grant row (and its
    findings) per plaintext action."""
    grants: list[Grant] = []
    for label in principals(reading.statement):
        who = probe_arn(label)
        if who is None:
            continue
        principal = _Principal(label, who, is_root(label), label == "*")
        _check_escalation(out, reading, principal, roles)
        for action in reading.plaintext:
            grant = _grant(prober, reading, measurements, principal, action, manifest, probe_pcrs)
            grants.append(grant)
            _judge(out, reading.statement, principal, action, grant)
            if grant.verdict == "attested-release" and grant.manifest_pcrs is False:
                out.prove("NV-MANIFEST-MISMATCH", reading.statement.label)
    return grants


def _check_escalation(out: Collector, reading: Reading, principal: _Principal, roles: Roles) -> None:
    """NV-KMS-STAR(-ADMIN) and NV-ESCALATION for one principal of one statement."""
    label, who = reading.statement.label, principal.label
    if reading.full and not principal.root and who not in roles.admins:
        out.add(
            "NV-KMS-STAR", label,
            "kms:* (or an equivalent wildcard) to a principal that is not a key administrator", who,
        )
    elif reading.full and who in roles.admins:
        out.add(
            "NV-KMS-STAR-ADMIN", label,
            "kms:* to a key administrator: administration and plaintext in one principal", who,
        )
    break_glass = who in roles.admins and who not in roles.users and not reading.plaintext
    # PutKeyPolicy for a pure administrator is the documented break-glass path. Everything else here is
    # an escalation.
    escalating = [a for a in reading.escalation if not (a == "kms:PutKeyPolicy" and break_glass)]
    if escalating:
        out.add(
            "NV-ESCALATION", label,
            f"{' and '.join(escalating)} let this principal give itself plaintext access through "
            + " or ".join(_HOW[a] for a in escalating),
            who, raised=principal.root or principal.everyone,
        )


def _grant(
    prober: Prober,
    reading: Reading,
    measurements: Mapping[str, str],
    principal: _Principal,
    action: str,
    manifest: PcrManifest | None,
    probe_pcrs: Mapping[int, bytes],
) -> Grant:
    """The row for one (statement, principal, plaintext action): the verdict and the evaluator's answers."""
    who, context = principal.who, reading.context
    unattested = prober.allowed(action, who, context, None)
    foreign = prober.allowed(action, who, context, probe_pcrs)
    expected = prober.allowed(action, who, context, manifest.pcrs) if manifest is not None else None
    verdict: Verdict
    if reading.attestation.clauses:
        verdict = "attested-release"
    elif (
        reading.service
        and action in SERVICE_MEDIATED_ACTIONS
        and not (principal.root or principal.everyone)
    ):
        verdict = "service-mediated"
        expected = None  # no enclave is involved: the manifest does not apply
    elif action in TO_CALLER:
        verdict = "plaintext-to-caller"
    else:
        verdict = "unattested-plaintext"
    return Grant(
        reading.statement.label, principal.label, (action,), reading.attestation.summary, measurements,
        verdict, unattested, foreign, expected,
    )


def _judge(out: Collector, statement: Statement, principal: _Principal, action: str, grant: Grant) -> None:
    """Findings for one (statement, principal, plaintext action) from the static reading and the proofs."""
    label, who = statement.label, principal.label
    root, everyone = principal.root, principal.everyone
    verdict, unattested, foreign = grant.verdict, grant.unattested, grant.foreign_pcrs
    short = action.split(":")[1]
    if root:
        out.add(
            "NV-ROOT-DELEGATION", label,
            f"the account principal is allowed {short}: any IAM identity an IAM policy allows can use it",
            who, unattested or foreign, raised=verdict != "attested-release",
        )
    if everyone and verdict != "attested-release":
        out.add(
            "NV-WILDCARD-PRINCIPAL", label,
            f'"*" principal is allowed {short} without attestation conditions', who, unattested,
        )
    if verdict == "service-mediated":
        if unattested:  # the service conditions did not stop a direct call: the reading was wrong
            out.add(
                "NV-PLAINTEXT-UNATTESTED", label,
                f"{who} can {short} directly, not only through the service (proved by evaluation)", who, True,
            )
        return
    if verdict == "plaintext-to-caller":
        if root or everyone or not has_context_condition(statement):
            out.add(
                "NV-DATAKEY-UNCONSTRAINED", label,
                f"{short} returns a plaintext data key: restrict it to one sealing role AND the model's "
                "encryption context (kms:EncryptionContext:*)",
                who, unattested, raised=root or everyone,
            )
        return
    if verdict == "unattested-plaintext" and unattested:
        out.add(
            "NV-PLAINTEXT-UNATTESTED", label,
            f"{who} can {short} without any attestation (proved by evaluation)", who, True, raised=everyone,
        )
    elif verdict == "unattested-plaintext" and foreign:
        out.add(
            "NV-ANY-ENCLAVE", label,
            f"{who} can {short} from ANY enclave image (proved with foreign PCRs)", who, True,
        )
    elif verdict == "unattested-plaintext":  # e.g. guarded only by keys the probe cannot satisfy
        out.add(
            "NV-PLAINTEXT-UNATTESTED", label,
            f"{who} is allowed {short} without attestation conditions (not proved: other "
            "conditions or a Deny stopped the probe)", who, False, raised=everyone,
        )
    if verdict == "attested-release":
        if unattested:
            out.add(
                "NV-ATT-BYPASS", label,
                f"{who} can {short} WITHOUT an attestation document despite the attestation "
                "conditions (proved by evaluation)",
                who, True,
            )
        elif foreign:
            out.add(
                "NV-ANY-ENCLAVE", label,
                f"{who} can {short} from an enclave with foreign PCRs (proved by evaluation)", who, True,
            )


def check_admin_decrypt(
    out: Collector,
    prober: Prober,
    statements: Sequence[Statement],
    roles: Roles,
    manifest: PcrManifest | None,
    probe_pcrs: Mapping[int, bytes],
) -> None:
    """NV-ADMIN-DECRYPT: administration and use must be separate, with or without an enclave."""
    for admin in sorted(roles.admins):
        who = probe_arn(admin)
        if who is None:
            continue
        contexts = [encryption_context(s) for s in statements if s.effect == "Allow"] or [{}]
        pcr_sets: list[Mapping[int, bytes] | None] = [None, probe_pcrs]
        if manifest is not None:
            pcr_sets.append(manifest.pcrs)
        if any(prober.allowed("kms:Decrypt", who, ctx, pcrs) for ctx in contexts for pcrs in pcr_sets):
            out.add(
                "NV-ADMIN-DECRYPT", "policy",
                "a key administrator can also Decrypt: administration and use must be separate", admin, True,
            )
