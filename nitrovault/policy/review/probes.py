"""Proof with the evaluator: the requests KMS would build for the reviewer's claims, evaluated by
:func:`~nitrovault.policy.evaluate_key_policy` (the KMS emulator's evaluator). Pure.

A claim is checked (a) without an attestation document, (b) with *foreign* PCRs (:data:`PROBE_PCRS`,
values no real image has), (c) with a manifest's PCRs, (d) with a measurement set's own PCRs
(:func:`accepted_pcrs`). A principal label is probed as the callers it covers (:func:`callers`): the
identity it names, or for an account principal or ``"*"`` stand-ins for the identities nobody named
(:data:`OUTSIDER_ACCOUNT`, "any identity of account N") and every identity the policy names anywhere
(in a ``Principal`` or as a value of ``aws:PrincipalArn``), so a statement or a Deny that treats some
identities differently is seen from each side.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from nitrovault.policy.evaluate import (
    Decision,
    Policy,
    Statement,
    build_request_context,
    evaluate_key_policy,
)
from nitrovault.policy.review.reading import (
    CALLER_KEYS,
    pcr_index,
    pinned_values,
    principals,
    root_arn,
)

__all__ = [
    "OUTSIDER_ACCOUNT",
    "PROBE_PCRS",
    "Caller",
    "Prober",
    "accepted_pcrs",
    "anyone_arn",
    "callers",
    "default_key_arn",
    "delegate_arn",
    "probe_arn",
]

#: Foreign measurements for the "any enclave" proof: derived from a fixed label so the review is
#: deterministic, and (being SHA-384 outputs of a label no build hashes) equal to no real image's PCRs.
PROBE_PCRS: Mapping[int, bytes] = {
    i: hashlib.sha384(f"nitrovault-review-foreign-pcr{i}".encode()).digest() for i in (0, 1, 2, 3, 4, 8)
}
#: An account no policy names: the caller for ``"*"``, and the key's account when none is known.
OUTSIDER_ACCOUNT = "999988887777"
_ACCOUNT = re.compile(r"\d{12}|<[A-Za-z]+>")
_HEX96 = re.compile(r"[0-9a-f]{96}")
#: What a wildcard in an ``aws:PrincipalArn`` pattern stands for in a probe caller.
_ANY_NAME = "nitrovault-review-any"


def anyone_arn() -> str:
    """A caller in no account the policy names (what ``"*"`` covers and nothing else does)."""
    return f"arn:aws:iam::{OUTSIDER_ACCOUNT}:role/nitrovault-review-anyone"


def delegate_arn(account: str, partition: str = "aws") -> str:
    """An IAM identity of ``account`` that no policy names (what an account principal delegates to)."""
    return f"arn:{partition}:iam::{account}:role/nitrovault-review-iam-delegate"


def default_key_arn(key: str, region: str | None = None, account: str | None = None) -> str:
    """The key ARN the requests name when the caller gives none."""
    return f"arn:aws:kms:{region or 'us-east-1'}:{account or OUTSIDER_ACCOUNT}:key/{key}"


def probe_arn(label: str) -> str | None:
    """A caller ARN that the principal ``label`` covers, for the evaluator (None: not probeable)."""
    if label == "*":
        return anyone_arn()
    root = root_arn(label)
    if root:  # any IAM identity of the account, via delegation
        return delegate_arn(root.group(2), root.group(1))
    if label.startswith("arn:"):
        return label
    return None


def accepted_pcrs(statement: Statement) -> dict[int, bytes]:
    """The measurements a request must carry to satisfy ``statement``'s own PCR bindings: each PCR it pins
    to one well-formed value, and :data:`PROBE_PCRS` (foreign) for the rest."""
    pcrs = dict(PROBE_PCRS)
    for key, value in pinned_values(statement).items():
        index = pcr_index(key)
        if index is not None and _HEX96.fullmatch(value):
            pcrs[index] = bytes.fromhex(value)
    return pcrs


# -- callers ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """One identity the evaluator is asked about."""

    arn: str
    #: an identity the policy names itself (a role or user ARN), not a stand-in for unnamed identities
    named: bool
    #: how a finding describes it
    describe: str


def _instance(pattern: str) -> str | None:
    """An IAM ARN that an ``aws:PrincipalArn`` pattern matches, wildcards filled in (None: not IAM)."""
    parts = pattern.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn" or parts[2] != "iam":
        return None
    account = parts[4] if _ACCOUNT.fullmatch(parts[4]) else OUTSIDER_ACCOUNT
    resource = parts[5].replace("*", _ANY_NAME).replace("?", "x")
    partition = parts[1] if "*" not in parts[1] and "?" not in parts[1] else "aws"
    return f"arn:{partition}:iam::{account}:{resource}"


@dataclass(frozen=True)
class _Identities:
    named: tuple[str, ...]
    patterns: tuple[str, ...]
    accounts: tuple[tuple[str, str], ...]


def _identities(policy: Policy, key_arn: str) -> _Identities:
    """Every identity and account the policy names, in its principals or in caller conditions."""
    named: dict[str, None] = {}
    patterns: dict[str, None] = {}
    accounts: dict[tuple[str, str], None] = {}
    for statement in policy.statements:
        labels = principals(statement) if statement.principal is not None else []
        if statement.not_principal is not None:
            labels = [
                f"arn:aws:iam::{p}:root" if p.isdigit() else p for p in statement.not_principal.aws
            ]
        for label in labels:
            root = root_arn(label)
            if root:
                accounts[(root.group(1), root.group(2))] = None
            elif label.startswith("arn:"):
                named[label] = None
        for c in statement.conditions:
            key = c.key.lower()
            if key not in CALLER_KEYS:
                continue
            for value in c.values:
                if key == "aws:principalarn":
                    wild = "*" in value or "?" in value
                    instance = _instance(value)
                    if instance is not None:
                        (patterns if wild else named)[instance] = None
                elif _ACCOUNT.fullmatch(value):
                    accounts[("aws", value)] = None
    for arn in named:
        parts = arn.split(":", 5)
        if len(parts) == 6 and _ACCOUNT.fullmatch(parts[4]):
            accounts[(parts[1], parts[4])] = None
    key_parts = key_arn.split(":", 5)
    if len(key_parts) == 6 and key_parts[4] != OUTSIDER_ACCOUNT and _ACCOUNT.fullmatch(key_parts[4]):
        accounts[(key_parts[1], key_parts[4])] = None
    return _Identities(tuple(named), tuple(patterns), tuple(accounts))


def _account_of(arn: str) -> str:
    parts = arn.split(":", 5)
    return parts[4] if len(parts) == 6 else ""


def callers(label: str, policy: Policy, key_arn: str) -> list[Caller]:
    """The callers principal ``label`` covers, for the evaluator: unnamed stand-ins first, then the named
    identities it covers (the module docstring says why both)."""
    found = _identities(policy, key_arn)
    out: list[Caller] = []
    if label == "*":
        out.append(Caller(anyone_arn(), False, f"a principal of another AWS account ({OUTSIDER_ACCOUNT})"))
        out += [
            Caller(delegate_arn(account, partition), False, f"any identity of account {account}")
            for partition, account in found.accounts
        ]
        out += [Caller(p, False, f"an identity whose ARN matches a pattern ({p})") for p in found.patterns]
        out += [Caller(arn, True, arn) for arn in found.named]
        return out
    root = root_arn(label)
    if root:
        partition, account = root.group(1), root.group(2)
        out.append(Caller(delegate_arn(account, partition), False, f"any identity of account {account}"))
        out += [
            Caller(p, False, f"an identity whose ARN matches a pattern ({p})")
            for p in found.patterns
            if _account_of(p) == account
        ]
        out += [Caller(arn, True, arn) for arn in found.named if _account_of(arn) == account]
        return out
    if label.startswith("arn:"):
        return [Caller(label, True, label)]
    return []


def _caller_keys(who: str) -> dict[str, str]:
    """The caller keys for a caller whose account is a template placeholder (``<AccountId>``): the
    evaluator derives them only for 12-digit accounts, and a caller condition must not fail for want of
    them (that would rule the caller out unsoundly)."""
    parts = who.split(":", 5)
    if len(parts) != 6 or not parts[4].startswith("<"):
        return {}
    return {"aws:PrincipalArn": who, "aws:PrincipalAccount": parts[4], "kms:CallerAccount": parts[4]}


@dataclass(frozen=True)
class Prober:
    """Evaluates requests against one parsed key policy, for the key ``key_arn``."""

    policy: Policy
    key_arn: str

    def decide(
        self,
        action: str,
        who: str,
        context: Mapping[str, str],
        pcrs: Mapping[int, bytes] | None,
        extra: Mapping[str, str] | None = None,
        *,
        policy: Policy | None = None,
    ) -> Decision:
        """The decision for one request; ``extra`` adds other condition keys, ``policy`` evaluates another
        policy (one statement, say) against the same key."""
        extra = {**_caller_keys(who), **(extra or {})}
        request = build_request_context(action, who, self.key_arn, context, pcrs, extra_context=extra)
        return evaluate_key_policy(policy or self.policy, request)

    def allowed(
        self, action: str, who: str, context: Mapping[str, str], pcrs: Mapping[int, bytes] | None
    ) -> bool:
        return self.decide(action, who, context, pcrs).allowed

    def statement_matches(
        self,
        statement: Statement,
        action: str,
        who: str,
        context: Mapping[str, str],
        pcrs: Mapping[int, bytes] | None,
        extra: Mapping[str, str] | None = None,
    ) -> bool:
        """Whether ``statement`` alone applies to the request (an Allow allows it, a Deny denies it)."""
        alone = Policy(self.policy.version, None, (statement,))
        decision = self.decide(action, who, context, pcrs, extra, policy=alone)
        return decision.deny if statement.effect == "Deny" else decision.allowed

