"""Condition operators of the AWS policy language, as KMS key policies use them. Pure.

A ``Condition`` block is ``{operator: {key: value | [values]}}``. The semantics follow the IAM User Guide
("IAM JSON policy elements: Condition operators", "Single-valued vs. multivalued context keys"):

1. Several operators in one block are ANDed; several keys under one operator are ANDed; several policy
   values for one key are ORed.
2. Context key *names* are case-insensitive (``aws:SourceIP`` is ``AWS:SourceIp``); this includes the
   ``<context-key>`` part of ``kms:EncryptionContext:<context-key>`` (AWS KMS Developer Guide,
   "Case sensitivity of the encryption context condition"). Value case follows the operator.
3. A key absent from the request makes a positive operator false and a negated one (``StringNotEquals``,
   ``ArnNotLike``, ...) true. ``...IfExists`` makes an absent key true. ``Null: {k: "true"}`` is true when
   ``k`` is absent. ``ForAllValues:`` is true for an absent or empty key; ``ForAnyValue:`` is false.
4. ``ForAllValues:Op`` holds when every request value satisfies ``Op`` against the policy values;
   ``ForAnyValue:Op`` when at least one does. For a negated ``Op`` the per-value test is "matches none of
   the policy values".

Our choices where AWS says nothing (also in ``docs/policy-evaluation.md``):

* A request value that is an empty sequence is treated as absent.
* A multivalued request value under an operator without a set prefix: the positive operator is true when
  any request value matches any policy value; the negated operator is its negation.
* A request value that is not a number never matches a ``Numeric*`` value (so ``NumericNotEquals`` is
  true for it); a request value that is not an ARN never matches an ``Arn*`` value.
* Policy variables (``${aws:username}``) are not expanded: they compare literally.
* Unknown operators, a set prefix or ``IfExists`` on ``Null``, non-numeric ``Numeric*`` values, ``Bool``
  or ``Null`` values other than true/false, and ``Arn*`` values that are neither ``*`` nor six-part ARNs
  raise :class:`~nitrovault.errors.PolicyError` at parse time: we fail closed rather than guess.
  Operator names are matched case-insensitively (accepting more spellings cannot widen any grant).

Wildcard matching is hand-written (``*`` and ``?`` only, compiled to an anchored regular expression)
because :mod:`fnmatch` also interprets ``[...]`` character classes, which the AWS policy language does
not have.

Example::

    >>> clauses = parse_condition_block({"StringEqualsIgnoreCase": {"kms:RecipientAttestation:PCR0": "AB"}})
    >>> evaluate_conditions(clauses, normalize_context({"KMS:RecipientAttestation:pcr0": "ab"}))
    True
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Literal

from nitrovault.errors import PolicyError

__all__ = [
    "OPERATOR_NAMES",
    "ConditionClause",
    "ContextValue",
    "SetOperator",
    "evaluate_clause",
    "evaluate_conditions",
    "normalize_context",
    "parse_condition_block",
    "wildcard_match",
]

#: A request-context value as callers give it.
ContextValue = str | bool | int | float | Sequence[str]
SetOperator = Literal["ForAnyValue", "ForAllValues"]

_SET_PREFIXES: dict[str, SetOperator] = {"foranyvalue": "ForAnyValue", "forallvalues": "ForAllValues"}
_IF_EXISTS = "ifexists"


# -- wildcards --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _wildcard_regex(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    parts = []
    for ch in pattern:
        if ch == "*":
            parts.append(".*")
        elif ch == "?":
            parts.append(".")
        else:
            parts.append(re.escape(ch))
    flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
    return re.compile("".join(parts), flags)


def wildcard_match(pattern: str, value: str, *, ignore_case: bool = False) -> bool:
    """``*`` matches any run of characters (also none), ``?`` exactly one; everything else is literal."""
    return _wildcard_regex(pattern, ignore_case).fullmatch(value) is not None


# -- comparisons (request value, policy value) -> positive match ------------------------------------------


def _string_equals(req: str, pol: str) -> bool:
    return req == pol


def _string_equals_ic(req: str, pol: str) -> bool:
    return req.casefold() == pol.casefold()


def _string_like(req: str, pol: str) -> bool:
    return wildcard_match(pol, req)


def _bool_equals(req: str, pol: str) -> bool:
    return req.lower() == pol


def _number(text: str) -> Decimal | None:
    try:
        value = Decimal(text.strip())
    except (InvalidOperation, ValueError):
        return None
    return value if value.is_finite() else None


def _numeric(cmp: Callable[[Decimal, Decimal], bool]) -> Callable[[str, str], bool]:
    def compare(req: str, pol: str) -> bool:
        left, right = _number(req), _number(pol)
        return left is not None and right is not None and cmp(left, right)

    return compare


def _arn_like(req: str, pol: str) -> bool:
    # IAM: "Each of the six colon-delimited components of the ARN is checked separately and each can
    # include multi-character match wildcards (*) or single-character match wildcards (?)."
    if pol == "*":
        return True
    req_parts, pol_parts = req.split(":", 5), pol.split(":", 5)
    if len(req_parts) != 6 or len(pol_parts) != 6:
        return False
    return all(wildcard_match(p, r) for p, r in zip(pol_parts, req_parts, strict=True))


def _check_bool(value: str) -> str:
    lowered = value.lower()
    if lowered not in ("true", "false"):
        raise PolicyError("Bool and Null condition values must be true or false")
    return lowered


def _check_number(value: str) -> str:
    if _number(value) is None:
        raise PolicyError("Numeric condition values must be finite numbers")
    return value


def _check_arn(value: str) -> str:
    if value != "*" and len(value.split(":", 5)) != 6:
        raise PolicyError("Arn condition values must be '*' or six-part ARNs (arn:partition:service:...)")
    return value


def _as_is(value: str) -> str:
    return value


@dataclass(frozen=True)
class _Operator:
    name: str
    negated: bool
    compare: Callable[[str, str], bool]
    check: Callable[[str], str]


def _operators() -> dict[str, _Operator]:
    table = [
        _Operator("StringEquals", False, _string_equals, _as_is),
        _Operator("StringNotEquals", True, _string_equals, _as_is),
        _Operator("StringEqualsIgnoreCase", False, _string_equals_ic, _as_is),
        _Operator("StringNotEqualsIgnoreCase", True, _string_equals_ic, _as_is),
        _Operator("StringLike", False, _string_like, _as_is),
        _Operator("StringNotLike", True, _string_like, _as_is),
        _Operator("Bool", False, _bool_equals, _check_bool),
        _Operator("NumericEquals", False, _numeric(lambda a, b: a == b), _check_number),
        _Operator("NumericNotEquals", True, _numeric(lambda a, b: a == b), _check_number),
        _Operator("NumericLessThan", False, _numeric(lambda a, b: a < b), _check_number),
        _Operator("NumericLessThanEquals", False, _numeric(lambda a, b: a <= b), _check_number),
        _Operator("NumericGreaterThan", False, _numeric(lambda a, b: a > b), _check_number),
        _Operator("NumericGreaterThanEquals", False, _numeric(lambda a, b: a >= b), _check_number),
        _Operator("ArnEquals", False, _arn_like, _check_arn),
        _Operator("ArnLike", False, _arn_like, _check_arn),
        _Operator("ArnNotEquals", True, _arn_like, _check_arn),
        _Operator("ArnNotLike", True, _arn_like, _check_arn),
        # Null is special-cased in evaluate_clause: it tests presence, not values.
        _Operator("Null", False, _bool_equals, _check_bool),
    ]
    return {op.name.lower(): op for op in table}


_OPERATORS = _operators()
#: Canonical names of the supported base operators (each also with ``IfExists`` and set prefixes, but Null).
OPERATOR_NAMES: tuple[str, ...] = tuple(op.name for op in _OPERATORS.values())


# -- parsed clauses ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConditionClause:
    """One ``operator: {key: values}`` test. A statement's clauses are ANDed."""

    #: the operator as written in the policy, e.g. ``"ForAllValues:StringEqualsIfExists"``
    operator: str
    #: the canonical base operator, e.g. ``"StringEquals"``
    base: str
    set_operator: SetOperator | None
    if_exists: bool
    negated: bool
    #: the condition key as written (compared case-insensitively)
    key: str
    #: the policy values, normalised to strings (JSON true -> "true", 10 -> "10"); ORed
    values: tuple[str, ...]


def _policy_value(raw: object, where: str) -> str:
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, int | float):
        return str(raw)
    if isinstance(raw, str):
        return raw
    raise PolicyError(f"{where}: condition values must be strings, booleans or numbers")


def _parse_operator(name: str, where: str) -> tuple[SetOperator | None, _Operator, bool]:
    set_op: SetOperator | None = None
    rest = name
    if ":" in name:
        prefix, rest = name.split(":", 1)
        if prefix.lower() not in _SET_PREFIXES:
            raise PolicyError(f"{where}: unknown condition set operator {prefix!r}")
        set_op = _SET_PREFIXES[prefix.lower()]
    if_exists = rest.lower().endswith(_IF_EXISTS) and rest.lower() != _IF_EXISTS
    base = rest[: -len(_IF_EXISTS)] if if_exists else rest
    op = _OPERATORS.get(base.lower())
    if op is None:
        raise PolicyError(f"{where}: unknown condition operator {name!r}")
    if op.name == "Null" and (if_exists or set_op is not None):
        raise PolicyError(f"{where}: Null takes neither IfExists nor a set operator")
    return set_op, op, if_exists


def parse_condition_block(raw: object, *, where: str = "Condition") -> tuple[ConditionClause, ...]:
    """Parse a statement's ``Condition`` element; :class:`PolicyError` on anything we cannot evaluate."""
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{where}: must be an object of operators")
    clauses: list[ConditionClause] = []
    for op_name, keys in raw.items():
        if not isinstance(op_name, str):
            raise PolicyError(f"{where}: operator names must be strings")
        set_op, op, if_exists = _parse_operator(op_name, where)
        if not isinstance(keys, Mapping) or not keys:
            raise PolicyError(f"{where}.{op_name}: must be a non-empty object of condition keys")
        for key, raw_values in keys.items():
            if not isinstance(key, str) or not key:
                raise PolicyError(f"{where}.{op_name}: condition keys must be non-empty strings")
            items = list(raw_values) if isinstance(raw_values, list) else [raw_values]
            if not items:
                raise PolicyError(f"{where}.{op_name}.{key}: needs at least one value")
            values = tuple(op.check(_policy_value(v, f"{where}.{op_name}.{key}")) for v in items)
            clauses.append(
                ConditionClause(
                    operator=op_name,
                    base=op.name,
                    set_operator=set_op,
                    if_exists=if_exists,
                    negated=op.negated,
                    key=key,
                    values=values,
                )
            )
    return tuple(clauses)


# -- request context --------------------------------------------------------------------------------------


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    return str(value)


def _values(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str | bytes | bytearray):
        return (_scalar(value),)
    if isinstance(value, Sequence | set | frozenset):
        return tuple(_scalar(v) for v in value if v is not None)
    return (_scalar(value),)


def normalize_context(context: Mapping[str, object]) -> dict[str, tuple[str, ...]]:
    """Key names lower-cased, every value a tuple of strings; absent and empty values are dropped.

    Keys that differ only by case are merged into one multivalued key (AWS advises against such
    encryption contexts; merging keeps every value visible to both Allow and Deny tests).
    """
    out: dict[str, tuple[str, ...]] = {}
    for key, value in context.items():
        values = _values(value)
        if values:
            name = str(key).lower()
            out[name] = out.get(name, ()) + values
    return out


# -- evaluation -------------------------------------------------------------------------------------------


def evaluate_clause(clause: ConditionClause, context: Mapping[str, tuple[str, ...]]) -> bool:
    """Evaluate one clause against a context from :func:`normalize_context`. Never raises."""
    request_values = context.get(clause.key.lower())
    op = _OPERATORS[clause.base.lower()]
    if op.name == "Null":
        absent = not request_values
        return any((value == "true") == absent for value in clause.values)
    if not request_values:
        if clause.if_exists or clause.set_operator == "ForAllValues":
            return True
        if clause.set_operator == "ForAnyValue":
            return False
        return clause.negated

    def matches(request_value: str) -> bool:
        return any(op.compare(request_value, policy_value) for policy_value in clause.values)

    if clause.set_operator == "ForAllValues":
        return all(matches(v) != clause.negated for v in request_values)
    if clause.set_operator == "ForAnyValue":
        return any(matches(v) != clause.negated for v in request_values)
    return any(matches(v) for v in request_values) != clause.negated


def evaluate_conditions(clauses: Sequence[ConditionClause], context: Mapping[str, tuple[str, ...]]) -> bool:
    """All clauses must hold (AND); an empty condition block holds."""
    return all(evaluate_clause(clause, context) for clause in clauses)
