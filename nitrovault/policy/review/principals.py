"""Per-principal checks: for each principal of an ``Allow`` statement, its escalation paths (``kms:*``,
``CreateGrant``, ``PutKeyPolicy``), whether it reaches identities nobody named (the account principal,
``"*"``), and, per plaintext action, the :class:`Grant` row -- verdict and the evaluator's answers --
with the findings they prove; and the key administrators, who must not be able to Decrypt. Pure.

Key administrators are the principals of a management statement (disable / schedule deletion, no
plaintext action); principals that use the key anywhere are its users. Only a pure administrator's
``PutKeyPolicy`` is break-glass: a visible, logged policy change, not a silent decrypt.

**Exposure is decided by evaluation** (:mod:`~nitrovault.policy.review.exposure`), never by the shape of
one statement: a statement without attestation conditions is no finding when a Deny (or the statement's
own caller conditions) refuses every request it could allow without a document; its row then reads
``attested-release`` with the Deny named in the conditions column.

**Broad principals.** An account principal or ``"*"`` on a statement that releases key material is a
finding even with attestation conditions: attestation proves which code runs, not who runs it, so any
identity the principal reaches that can launch the same (public, or rebuilt from public source) image in
its own enclave obtains the key. Conditions on ``aws:PrincipalArn``, ``aws:PrincipalAccount`` and
``kms:CallerAccount`` are honoured by evaluation: the reviewer probes stand-ins for identities nobody
named (another account, "any identity of account N", a pattern's instance) with the set's own
measurements, and drops the finding only when every stand-in is ruled out by facts that hold for every
request (the statement's caller conditions, or a Deny on caller and attestation keys). A condition on any
other key (``aws:PrincipalOrgID``, ``aws:SourceVpc``, ...) never narrows it: the reviewer does not model
those keys, so it assumes the worst (the finding is then not ``proved``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nitrovault.policy.evaluate import Policy, Statement
from nitrovault.policy.manifest import PcrManifest
from nitrovault.policy.review.exposure import Outcome, probe
from nitrovault.policy.review.findings import Collector, Grant, Verdict
from nitrovault.policy.review.probes import (
    OUTSIDER_ACCOUNT,
    Caller,
    Prober,
    accepted_pcrs,
    callers,
    probe_arn,
)
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
_WHY_ATTESTATION_IS_NOT_IDENTITY = (
    "attestation proves which code runs, not who runs it: the same image (public, or rebuilt from public "
    "source) launched in their own enclave obtains the key"
)


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
    #: the callers the evaluator is asked about (:func:`~nitrovault.policy.review.probes.callers`)
    callers: tuple[Caller, ...]
    root: bool
    everyone: bool


def check_principals(
    out: Collector,
    prober: Prober,
    reading: Reading,
    measurements: Mapping[str, str],
    roles: Roles,
    manifests: Sequence[PcrManifest],
    closest: int | None,
    probe_pcrs: Mapping[int, bytes],
) -> list[Grant]:
    """Every probeable principal of one statement: escalation and broad-principal findings, then one Grant
    row (and its findings) per plaintext action. ``closest`` is the statement's closest manifest."""
    grants: list[Grant] = []
    for label in principals(reading.statement):
        who = tuple(callers(label, prober.policy, prober.key_arn))
        if not who:
            continue
        principal = _Principal(label, who, is_root(label), label == "*")
        _check_escalation(out, reading, principal, roles)
        if (principal.root or principal.everyone) and reading.plaintext:
            _check_broad(out, prober, reading, principal)
        for action in reading.plaintext:
            grant, outcome, closest_allowed = _grant(
                prober, reading, measurements, principal, action, manifests, closest, probe_pcrs
            )
            grants.append(grant)
            _judge(out, reading, principal, action, grant, outcome)
            if grant.verdict == "attested-release" and closest_allowed is False:
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


def _check_broad(out: Collector, prober: Prober, reading: Reading, principal: _Principal) -> None:
    """NV-ROOT-DELEGATION, NV-WILDCARD-PRINCIPAL, NV-WILDCARD-ATTESTED (module docstring)."""
    statement, label = reading.statement, reading.statement.label
    unnamed = [c for c in principal.callers if not c.named]
    attested = bool(reading.attestation.clauses)
    # without a document, and with the statement's own measurements (the image it accepts)
    modes: list[Mapping[int, bytes] | None] = [None, accepted_pcrs(statement)]
    found: tuple[Outcome, str] | None = None
    unattested = False
    for pcrs in modes:
        for action in reading.plaintext:
            outcome = probe(prober, statement, reading.context, action, unnamed, pcrs)
            if outcome.exposed and (found is None or (outcome.proved and not found[0].proved)):
                found = outcome, action
            unattested = unattested or (pcrs is None and outcome.exposed)
    if found is None or found[0].open is None:
        return  # every identity nobody named is ruled out: the conditions pin the caller
    who, proved = found[0].open, found[0].proved is not None
    short = found[1].split(":")[1]
    how = " " + _how(found[0]).removeprefix("and ")
    if principal.root:
        if unattested:
            message = (
                f"the account principal is allowed {short} without attestation: {who.describe} that an IAM "
                "policy allows can obtain plaintext"
            )
        else:
            message = (
                f"the account principal is allowed {short}: {who.describe} that an IAM policy allows (now or "
                f"later) can obtain the key; {_WHY_ATTESTATION_IS_NOT_IDENTITY}"
            )
        out.add("NV-ROOT-DELEGATION", label, message + how, principal.label, proved, raised=unattested)
        return
    if OUTSIDER_ACCOUNT in who.arn:
        reach = "any principal in any AWS account"
    elif who.describe.startswith("any identity"):
        reach = f"{who.describe}, with no IAM policy needed (the key policy itself allows \"*\")"
    else:
        reach = who.describe
    if attested:
        out.add(
            "NV-WILDCARD-ATTESTED", label,
            f'"*" is allowed {short} with attestation conditions: {reach} can obtain the key; '
            f"{_WHY_ATTESTATION_IS_NOT_IDENTITY}. Name the enclave role" + how,
            principal.label, proved,
        )
    else:
        out.add(
            "NV-WILDCARD-PRINCIPAL", label,
            f'"*" principal is allowed {short} without attestation conditions: {reach} can obtain it' + how,
            principal.label, proved,
        )


def _grant(
    prober: Prober,
    reading: Reading,
    measurements: Mapping[str, str],
    principal: _Principal,
    action: str,
    manifests: Sequence[PcrManifest],
    closest: int | None,
    probe_pcrs: Mapping[int, bytes],
) -> tuple[Grant, Outcome, bool | None]:
    """The row for one (statement, principal, plaintext action): the verdict and the evaluator's answers,
    the unattested outcome, and whether the closest manifest's image is allowed (None: no manifest)."""
    context, who = reading.context, principal.callers

    def anyone(pcrs: Mapping[int, bytes] | None) -> bool:
        return any(prober.allowed(action, c.arn, context, pcrs) for c in who)

    outcome = probe(prober, reading.statement, context, action, who, None)
    unattested, foreign = anyone(None), anyone(probe_pcrs)
    per_manifest = [anyone(m.pcrs) for m in manifests]
    expected: bool | None = all(per_manifest) if manifests else None
    closest_allowed = per_manifest[closest] if closest is not None else None
    conditions = reading.attestation.summary
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
    elif not outcome.exposed and outcome.refused_by:
        verdict = "attested-release"  # a Deny refuses every request without a document
        conditions += f"; enforced by Deny {', '.join(outcome.refused_by)}"
    elif action in TO_CALLER:
        verdict = "plaintext-to-caller"
    else:
        verdict = "unattested-plaintext"
    if verdict != "service-mediated":  # a mediated row's question is the direct call's, asked above
        unattested = unattested or outcome.proved is not None
    grant = Grant(
        reading.statement.label, principal.label, (action,), conditions, measurements,
        verdict, unattested, foreign, expected,
    )
    return grant, outcome, closest_allowed


def _how(outcome: Outcome) -> str:
    """How an exposure stands: proved (and for which request), or not ruled out (and why)."""
    if outcome.proved is not None:
        with_keys = f", for a request with {', '.join(outcome.witness)}" if outcome.witness else ""
        return f"(proved by evaluation{with_keys})"
    keys = ", ".join(outcome.depends_on) or "the request"
    return f"and the evaluator could not rule it out (not proved: depends on {keys})"


def _judge(
    out: Collector, reading: Reading, principal: _Principal, action: str, grant: Grant, outcome: Outcome
) -> None:
    """Findings for one (statement, principal, plaintext action) from the proofs."""
    statement = reading.statement
    label, who = statement.label, principal.label
    everyone = principal.everyone
    verdict, proved = grant.verdict, outcome.proved is not None
    caller = outcome.open.describe if outcome.open is not None else who
    short = action.split(":")[1]
    if verdict == "service-mediated":
        if grant.unattested:  # the service conditions did not stop a direct call: the reading was wrong
            out.add(
                "NV-PLAINTEXT-UNATTESTED", label,
                f"{who} can {short} directly, not only through the service (proved by evaluation)", who, True,
            )
        return
    if verdict == "plaintext-to-caller":
        if outcome.exposed and (principal.root or everyone or not has_context_condition(statement)):
            out.add(
                "NV-DATAKEY-UNCONSTRAINED", label,
                f"{short} returns a plaintext data key: restrict it to one sealing role AND the model's "
                "encryption context (kms:EncryptionContext:*)",
                who, proved, raised=principal.root or everyone,
            )
        return
    if verdict == "unattested-plaintext":
        if outcome.exposed:
            out.add(
                "NV-PLAINTEXT-UNATTESTED", label,
                f"{caller} can {short} without any attestation {_how(outcome)}", who, proved, raised=everyone,
            )
        return
    # attested-release: by the statement's own conditions, or enforced by a Deny
    if outcome.exposed and reading.attestation.clauses:
        out.add(
            "NV-ATT-BYPASS", label,
            f"{caller} can {short} WITHOUT an attestation document despite the attestation conditions "
            f"{_how(outcome)}",
            who, proved,
        )
    elif grant.foreign_pcrs:
        out.add(
            "NV-ANY-ENCLAVE", label,
            f"{who} can {short} from an enclave with foreign PCRs, i.e. ANY enclave image (proved by "
            "evaluation)", who, True,
        )


def check_admin_decrypt(
    out: Collector,
    prober: Prober,
    statements: Sequence[Statement],
    roles: Roles,
    manifests: Sequence[PcrManifest],
    probe_pcrs: Mapping[int, bytes],
) -> None:
    """NV-ADMIN-DECRYPT: administration and use must be separate, with or without an enclave."""
    for admin in sorted(roles.admins):
        who = probe_arn(admin)
        if who is None:
            continue
        contexts = [encryption_context(s) for s in statements if s.effect == "Allow"] or [{}]
        pcr_sets: list[Mapping[int, bytes] | None] = [None, probe_pcrs, *(m.pcrs for m in manifests)]
        if any(prober.allowed("kms:Decrypt", who, ctx, pcrs) for ctx in contexts for pcrs in pcr_sets):
            out.add(
                "NV-ADMIN-DECRYPT", "policy",
                "a key administrator can also Decrypt: administration and use must be separate", admin, True,
            )
