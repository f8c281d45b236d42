"""Evaluate an AWS KMS key policy for one request. Pure: JSON in, :class:`Decision` out.

Shared by the local KMS emulator (which must refuse exactly what real KMS would refuse for the parts
that matter to us) and by the policy reviewer (which asks "who can obtain key material, under which
measurements?"). Decision logic follows the IAM User Guide, "Policy evaluation logic", restricted to a
single resource-based policy:

1. A statement *matches* when its principal, action, resource and every condition clause match.
2. An explicit ``Deny`` in any matching statement wins.
3. Otherwise any matching ``Allow`` allows.
4. Otherwise the request is implicitly denied.

Invariants:

* A malformed policy raises :class:`~nitrovault.errors.PolicyError` at parse time (fail closed);
  evaluating a parsed policy never raises, whatever the request context holds.
* Adding a ``Deny`` statement can never turn a denial into an allow (tested as a property).
* Reasons name statements (``Sid`` or ``statement[i]``), the action and the principal ARN; they never
  contain condition values, so no encryption context or PCR ever reaches a log through them.

Deliberate simplifications (documented in ``docs/policy-evaluation.md``):

* **Account principals** (``"111122223333"``, ``arn:aws:iam::111122223333:root``) delegate to the IAM
  policies of that account in AWS. We have no IAM, so with ``account_root_delegates=True`` (the
  default) an account principal matches *every* principal of that account, i.e. we assume IAM allows:
  the worst case, which is what a reviewer must assume. With ``False`` only the root itself matches.
* **Role sessions**: ``arn:aws:sts::ACCT:assumed-role/ROLE/SESSION`` is treated as the role
  ``arn:aws:iam::ACCT:role/ROLE``; roles are matched by partition, account and role name (role names are
  unique in an account, and session ARNs carry no role path).
* ``"Principal": {"AWS": "*"}`` is treated like ``"Principal": "*"`` (everyone).
* Only the statement's own key policy is evaluated: no IAM policies, grants, SCPs, RCPs or sessions
  policies.

Example::

    >>> policy = {"Version": "2012-10-17", "Statement": [{"Sid": "Use", "Effect": "Allow",
    ...     "Principal": {"AWS": "arn:aws:iam::111122223333:role/app"}, "Action": "kms:Decrypt",
    ...     "Resource": "*"}]}
    >>> evaluate_key_policy(policy, RequestContext("kms:Decrypt",
    ...     "arn:aws:sts::111122223333:assumed-role/app/i-0abc")).allowed
    True
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from nitrovault.errors import PolicyError
from nitrovault.policy.conditions import (
    ConditionClause,
    ContextValue,
    evaluate_conditions,
    normalize_context,
    parse_condition_block,
    wildcard_match,
)

__all__ = [
    "Decision",
    "Policy",
    "PrincipalSet",
    "RequestContext",
    "Statement",
    "build_request_context",
    "evaluate_key_policy",
    "parse_policy",
]

_VERSIONS = ("2012-10-17", "2008-10-17")
_POLICY_KEYS = frozenset({"Version", "Id", "Statement"})
_STATEMENT_KEYS = frozenset(
    {"Sid", "Effect", "Principal", "NotPrincipal", "Action", "NotAction", "Resource", "NotResource"}
    | {"Condition"}
)
_PRINCIPAL_TYPES = {
    "AWS": "aws",
    "Service": "service",
    "Federated": "federated",
    "CanonicalUser": "canonical_user",
}
_ACCOUNT_ID = re.compile(r"\d{12}")
_MAX_PCR_INDEX = 31


# -- the parsed policy ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrincipalSet:
    """A ``Principal`` / ``NotPrincipal`` element. ``everyone`` is ``"*"`` or ``{"AWS": "*"}``."""

    everyone: bool = False
    #: AWS principals as written: account ids, account root ARNs, user and role ARNs
    aws: tuple[str, ...] = ()
    service: tuple[str, ...] = ()
    #: parsed but never matched: we model no federation and no S3 canonical users
    federated: tuple[str, ...] = ()
    canonical_user: tuple[str, ...] = ()


@dataclass(frozen=True)
class Statement:
    """One statement. Exactly one of each pair (principal/not_principal, ...) is not ``None``."""

    index: int
    sid: str | None
    effect: Literal["Allow", "Deny"]
    principal: PrincipalSet | None
    not_principal: PrincipalSet | None
    actions: tuple[str, ...] | None
    not_actions: tuple[str, ...] | None
    resources: tuple[str, ...] | None
    not_resources: tuple[str, ...] | None
    conditions: tuple[ConditionClause, ...] = ()

    @property
    def label(self) -> str:
        """The ``Sid``, or ``statement[i]`` (0-based) when the statement has none."""
        return self.sid if self.sid else f"statement[{self.index}]"


@dataclass(frozen=True)
class Policy:
    version: str | None
    id: str | None
    statements: tuple[Statement, ...]


@dataclass(frozen=True)
class RequestContext:
    """What is asked, by whom, on what, with which condition keys.

    ``context`` keys are matched case-insensitively; values as given (a sequence is a multivalued key).
    ``aws:PrincipalArn``, ``aws:PrincipalAccount`` and ``kms:CallerAccount`` are derived from
    ``principal_arn`` unless the context already has them.
    """

    action: str
    principal_arn: str
    resource: str = "*"
    context: Mapping[str, ContextValue] = field(default_factory=dict)
    principal_service: str | None = None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    #: which statement allowed or denied, or "no statement allows ..."
    reason: str
    #: labels of the statements that decided: the matching Deny statements, else the matching Allows
    matched_sids: tuple[str, ...] = ()
    #: True for an explicit Deny (as opposed to an implicit one)
    deny: bool = False


# -- parsing ----------------------------------------------------------------------------------------------


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # Duplicate keys are resolved differently by different parsers: never guess.
            raise PolicyError(f"duplicate JSON key {key!r} in policy")
        out[key] = value
    return out


def _strings(raw: object, where: str) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise PolicyError(f"{where}: must not be an empty list")
    for item in items:
        if not isinstance(item, str) or not item:
            raise PolicyError(f"{where}: must be a non-empty string or a list of them")
    return tuple(items)


def _parse_principal(raw: object, where: str) -> PrincipalSet:
    if raw == "*":
        return PrincipalSet(everyone=True)
    if not isinstance(raw, Mapping) or not raw:
        raise PolicyError(f'{where}: must be "*" or an object such as {{"AWS": [...]}}')
    found: dict[str, tuple[str, ...]] = {}
    for kind, values in raw.items():
        if kind not in _PRINCIPAL_TYPES:
            raise PolicyError(f"{where}: unknown principal type {kind!r}")
        found[_PRINCIPAL_TYPES[kind]] = _strings(values, f"{where}.{kind}")
    aws = found.get("aws", ())
    for value in aws:
        if value != "*" and ("*" in value or "?" in value):
            raise PolicyError(f"{where}.AWS: wildcards are only allowed as the whole value '*'")
    return PrincipalSet(
        everyone="*" in aws,
        aws=tuple(v for v in aws if v != "*"),
        service=found.get("service", ()),
        federated=found.get("federated", ()),
        canonical_user=found.get("canonical_user", ()),
    )


def _pair(
    raw: Mapping[str, Any], positive: str, negative: str, where: str
) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    if (positive in raw) == (negative in raw):
        raise PolicyError(f"{where}: needs exactly one of {positive} or {negative}")
    if positive in raw:
        return _strings(raw[positive], f"{where}.{positive}"), None
    return None, _strings(raw[negative], f"{where}.{negative}")


def _parse_statement(raw: object, index: int) -> Statement:
    where = f"Statement[{index}]"
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: must be an object")
    unknown = set(raw) - _STATEMENT_KEYS
    if unknown:
        raise PolicyError(f"{where}: unknown keys {sorted(map(str, unknown))}")
    sid = raw.get("Sid")
    if sid is not None and not isinstance(sid, str):
        raise PolicyError(f"{where}.Sid: must be a string")
    effect = raw.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise PolicyError(f"{where}.Effect: must be Allow or Deny")
    if ("Principal" in raw) == ("NotPrincipal" in raw):
        raise PolicyError(f"{where}: a key policy statement needs exactly one of Principal or NotPrincipal")
    principal = _parse_principal(raw["Principal"], f"{where}.Principal") if "Principal" in raw else None
    not_principal = (
        _parse_principal(raw["NotPrincipal"], f"{where}.NotPrincipal") if "NotPrincipal" in raw else None
    )
    actions, not_actions = _pair(raw, "Action", "NotAction", where)
    resources, not_resources = _pair(raw, "Resource", "NotResource", where)
    conditions = (
        parse_condition_block(raw["Condition"], where=f"{where}.Condition") if "Condition" in raw else ()
    )
    return Statement(
        index=index,
        sid=sid,
        effect="Allow" if effect == "Allow" else "Deny",
        principal=principal,
        not_principal=not_principal,
        actions=actions,
        not_actions=not_actions,
        resources=resources,
        not_resources=not_resources,
        conditions=conditions,
    )


def parse_policy(doc: str | bytes | Mapping[str, Any]) -> Policy:
    """Parse and validate a key policy; :class:`PolicyError` for anything malformed or unknown."""
    if isinstance(doc, str | bytes):
        try:
            raw: object = json.loads(doc, object_pairs_hook=_reject_duplicates)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and bad UTF-8 are ValueErrors
            raise PolicyError("policy is not valid JSON") from exc
    else:
        raw = doc
    if not isinstance(raw, Mapping):
        raise PolicyError("policy must be a JSON object")
    unknown = set(raw) - _POLICY_KEYS
    if unknown:
        raise PolicyError(f"policy: unknown top-level keys {sorted(map(str, unknown))}")
    version = raw.get("Version")
    if version is not None and version not in _VERSIONS:
        raise PolicyError(f"policy: Version must be one of {list(_VERSIONS)}")
    policy_id = raw.get("Id")
    if policy_id is not None and not isinstance(policy_id, str):
        raise PolicyError("policy: Id must be a string")
    if "Statement" not in raw:
        raise PolicyError("policy: Statement is missing")
    statements = raw["Statement"]
    items = statements if isinstance(statements, list) else [statements]
    if not items:
        raise PolicyError("policy: Statement must not be empty")
    return Policy(
        version=version,
        id=policy_id,
        statements=tuple(_parse_statement(item, i) for i, item in enumerate(items)),
    )


# -- principals -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Arn:
    partition: str
    service: str
    region: str
    account: str
    resource: str

    @classmethod
    def parse(cls, text: str) -> _Arn | None:
        parts = text.split(":", 5)
        if len(parts) != 6 or parts[0] != "arn":
            return None
        return cls(*parts[1:])

    def __str__(self) -> str:
        return f"arn:{self.partition}:{self.service}:{self.region}:{self.account}:{self.resource}"


def _caller(principal_arn: str) -> _Arn | None:
    """The caller as an IAM identity: role sessions become their role (without its path)."""
    arn = _Arn.parse(principal_arn)
    if arn is None:
        return None
    if arn.service == "sts" and arn.resource.startswith("assumed-role/"):
        role = arn.resource.split("/")[1]
        if role:
            return _Arn(arn.partition, "iam", "", arn.account, f"role/{role}")
    return arn


def _aws_principal_matches(value: str, request: RequestContext, *, account_root_delegates: bool) -> bool:
    if _ACCOUNT_ID.fullmatch(value):
        value = f"arn:aws:iam::{value}:root"
    wanted = _Arn.parse(value)
    caller = _caller(request.principal_arn)
    if caller is None:
        return False
    if value == request.principal_arn or (wanted is not None and str(wanted) == str(caller)):
        return True
    if wanted is None or wanted.service != "iam":
        return False
    same_account = (wanted.partition, wanted.account) == (caller.partition, caller.account)
    if wanted.resource == "root":
        return account_root_delegates and same_account
    both_roles = wanted.resource.startswith("role/") and caller.resource.startswith("role/")
    if both_roles and caller.service == "iam":
        return same_account and wanted.resource.rsplit("/", 1)[1] == caller.resource.rsplit("/", 1)[1]
    return False


def _principal_matches(
    principals: PrincipalSet, request: RequestContext, *, account_root_delegates: bool
) -> bool:
    if principals.everyone:
        return True
    if request.principal_service is not None and any(
        s.lower() == request.principal_service.lower() for s in principals.service
    ):
        return True
    return any(
        _aws_principal_matches(value, request, account_root_delegates=account_root_delegates)
        for value in principals.aws
    )


# -- evaluation -------------------------------------------------------------------------------------------


def _derived_context(request: RequestContext) -> dict[str, tuple[str, ...]]:
    context = normalize_context(request.context)
    caller = _caller(request.principal_arn)
    if caller is not None and _ACCOUNT_ID.fullmatch(caller.account):
        context.setdefault("aws:principalarn", (str(caller),))
        context.setdefault("aws:principalaccount", (caller.account,))
        context.setdefault("kms:calleraccount", (caller.account,))
    return context


def _statement_matches(
    statement: Statement,
    request: RequestContext,
    context: Mapping[str, tuple[str, ...]],
    *,
    account_root_delegates: bool,
) -> bool:
    delegates = account_root_delegates
    if statement.principal is not None:
        if not _principal_matches(statement.principal, request, account_root_delegates=delegates):
            return False
    elif statement.not_principal is not None and _principal_matches(
        statement.not_principal, request, account_root_delegates=delegates
    ):
        return False
    if statement.actions is not None:
        if not any(wildcard_match(a, request.action, ignore_case=True) for a in statement.actions):
            return False
    elif statement.not_actions is not None and any(
        wildcard_match(a, request.action, ignore_case=True) for a in statement.not_actions
    ):
        return False
    if statement.resources is not None:
        if not any(wildcard_match(r, request.resource) for r in statement.resources):
            return False
    elif statement.not_resources is not None and any(
        wildcard_match(r, request.resource) for r in statement.not_resources
    ):
        return False
    return evaluate_conditions(statement.conditions, context)


def evaluate_key_policy(
    policy: Policy | str | bytes | Mapping[str, Any],
    request: RequestContext,
    *,
    account_root_delegates: bool = True,
) -> Decision:
    """Decide one request against one key policy (see the module docstring for the rules)."""
    parsed = policy if isinstance(policy, Policy) else parse_policy(policy)
    context = _derived_context(request)
    denies: list[str] = []
    allows: list[str] = []
    for statement in parsed.statements:
        if _statement_matches(statement, request, context, account_root_delegates=account_root_delegates):
            (denies if statement.effect == "Deny" else allows).append(statement.label)
    if denies:
        return Decision(False, f"explicitly denied by {', '.join(denies)}", tuple(denies), deny=True)
    if allows:
        return Decision(True, f"allowed by {', '.join(allows)}", tuple(allows))
    who = request.principal_arn or request.principal_service or "anonymous"
    return Decision(False, f"no statement allows {request.action} for {who}")


# -- KMS request contexts ---------------------------------------------------------------------------------


def build_request_context(
    action: str,
    principal_arn: str,
    key_arn: str,
    encryption_context: Mapping[str, str] | None = None,
    attestation_pcrs: Mapping[int, bytes] | None = None,
    *,
    extra_context: Mapping[str, ContextValue] | None = None,
) -> RequestContext:
    """The request context KMS builds for a cryptographic operation on ``key_arn``.

    * ``kms:EncryptionContext:<k>`` for each pair and ``kms:EncryptionContextKeys`` (multivalued);
      both absent without an encryption context.
    * Only when ``attestation_pcrs`` is given (the caller must have *verified* the attestation
      document): ``kms:RecipientAttestation:PCR<i>`` as lower-case hex and
      ``kms:RecipientAttestation:ImageSha384`` = PCR0. Without them the keys are absent, so a policy
      that requires them denies.
    * ``action`` without a service prefix gets ``kms:`` (``"Decrypt"`` -> ``"kms:Decrypt"``).
    * ``extra_context`` adds keys such as ``kms:ViaService`` or ``kms:GrantIsForAWSResource``.
    """
    context: dict[str, ContextValue] = dict(extra_context or {})
    if encryption_context:
        for key, value in encryption_context.items():
            context[f"kms:EncryptionContext:{key}"] = value
        context["kms:EncryptionContextKeys"] = list(encryption_context)
    if attestation_pcrs is not None:
        for index, pcr in sorted(attestation_pcrs.items()):
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index <= _MAX_PCR_INDEX:
                raise ValueError("PCR indexes must be integers in 0..31")
            if not isinstance(pcr, bytes | bytearray):
                raise ValueError("PCR values must be bytes")
            context[f"kms:RecipientAttestation:PCR{index}"] = bytes(pcr).hex()
        if 0 in attestation_pcrs:
            context["kms:RecipientAttestation:ImageSha384"] = bytes(attestation_pcrs[0]).hex()
    return RequestContext(
        action=action if ":" in action else f"kms:{action}",
        principal_arn=principal_arn,
        resource=key_arn,
        context=context,
    )
