"""Condition operators: one table row per semantic rule, each able to fail on its own."""

from __future__ import annotations

from typing import Any

import pytest

from nitrovault.errors import PolicyError
from nitrovault.policy.conditions import (
    OPERATOR_NAMES,
    evaluate_conditions,
    normalize_context,
    parse_condition_block,
    wildcard_match,
)

K = "test:Key"
ABSENT: dict[str, Any] = {}


def holds(block: dict[str, Any], context: dict[str, Any]) -> bool:
    return evaluate_conditions(parse_condition_block(block), normalize_context(context))


def one(op: str, value: Any, context: dict[str, Any], key: str = K) -> bool:
    return holds({op: {key: value}}, context)


# (operator, policy value(s), request context, expected)
CASES: list[tuple[str, Any, dict[str, Any], bool]] = [
    # StringEquals: exact, case-sensitive; values ORed; wildcards literal
    ("StringEquals", "abc", {K: "abc"}, True),
    ("StringEquals", "abc", {K: "ABC"}, False),
    ("StringEquals", ["x", "abc"], {K: "abc"}, True),
    ("StringEquals", ["x", "y"], {K: "abc"}, False),
    ("StringEquals", "a*", {K: "abc"}, False),
    ("StringEquals", "abc", ABSENT, False),
    ("StringNotEquals", "abc", {K: "abc"}, False),
    ("StringNotEquals", "abc", {K: "abd"}, True),
    ("StringNotEquals", ["abc", "abd"], {K: "abd"}, False),
    ("StringNotEquals", "abc", ABSENT, True),
    ("StringEqualsIgnoreCase", "ABC", {K: "abc"}, True),
    ("StringEqualsIgnoreCase", "ABC", {K: "abd"}, False),
    ("StringEqualsIgnoreCase", "ABC", ABSENT, False),
    ("StringNotEqualsIgnoreCase", "ABC", {K: "abc"}, False),
    ("StringNotEqualsIgnoreCase", "ABC", {K: "xyz"}, True),
    ("StringNotEqualsIgnoreCase", "ABC", ABSENT, True),
    # StringLike: * and ? globs, case-sensitive, [..] is literal
    ("StringLike", "a*c", {K: "abbbc"}, True),
    ("StringLike", "a*c", {K: "ac"}, True),
    ("StringLike", "a?c", {K: "abc"}, True),
    ("StringLike", "a?c", {K: "abbc"}, False),
    ("StringLike", "A*", {K: "abc"}, False),
    ("StringLike", "[ab]c", {K: "ac"}, False),
    ("StringLike", "[ab]c", {K: "[ab]c"}, True),
    ("StringLike", "a*", ABSENT, False),
    ("StringNotLike", "a*", {K: "abc"}, False),
    ("StringNotLike", "a*", {K: "xbc"}, True),
    ("StringNotLike", "a*", ABSENT, True),
    # Bool: JSON booleans and strings normalised both sides
    ("Bool", "true", {K: True}, True),
    ("Bool", True, {K: "true"}, True),
    ("Bool", "TRUE", {K: True}, True),
    ("Bool", "true", {K: False}, False),
    ("Bool", False, {K: False}, True),
    ("Bool", "true", {K: "yes"}, False),
    ("Bool", "true", ABSENT, False),
    # Null: presence test
    ("Null", "true", ABSENT, True),
    ("Null", "true", {K: "x"}, False),
    ("Null", "false", {K: "x"}, True),
    ("Null", "false", ABSENT, False),
    ("Null", True, {K: []}, True),
    ("Null", True, {K: None}, True),
    # Numeric
    ("NumericEquals", "10", {K: 10}, True),
    ("NumericEquals", 10, {K: "10.0"}, True),
    ("NumericEquals", "10", {K: 11}, False),
    ("NumericEquals", "10", {K: "ten"}, False),
    ("NumericEquals", "10", ABSENT, False),
    ("NumericNotEquals", "10", {K: 11}, True),
    ("NumericNotEquals", "10", {K: 10}, False),
    ("NumericNotEquals", "10", ABSENT, True),
    ("NumericLessThan", "10", {K: 9}, True),
    ("NumericLessThan", "10", {K: 10}, False),
    ("NumericLessThanEquals", "10", {K: 10}, True),
    ("NumericLessThanEquals", "10", {K: 11}, False),
    ("NumericGreaterThan", "10", {K: 11}, True),
    ("NumericGreaterThan", "10", {K: 10}, False),
    ("NumericGreaterThanEquals", "10", {K: 10}, True),
    ("NumericGreaterThanEquals", "10", {K: 9}, False),
    ("NumericGreaterThan", "10", {K: "nan"}, False),
    # Arn: per-component wildcards, case-sensitive
    ("ArnEquals", "arn:aws:iam::111122223333:role/app", {K: "arn:aws:iam::111122223333:role/app"}, True),
    ("ArnEquals", "arn:aws:iam::111122223333:role/app", {K: "arn:aws:iam::111122223333:role/App"}, False),
    ("ArnLike", "arn:aws:iam::*:role/app-*", {K: "arn:aws:iam::111122223333:role/app-1"}, True),
    ("ArnLike", "arn:aws:iam::*:role/app-*", {K: "arn:aws:iam::111122223333:user/app-1"}, False),
    ("ArnLike", "arn:aws:iam::1111222233?3:role/x", {K: "arn:aws:iam::111122223333:role/x"}, True),
    # * inside one component does not cross a colon
    ("ArnLike", "arn:aws*:iam:::x", {K: "arn:aws:foo:iam:::x"}, False),
    ("ArnLike", "arn:aws:s3:::bucket/*", {K: "arn:aws:s3:::bucket/a:b:c"}, True),
    ("ArnLike", "*", {K: "arn:aws:s3:::bucket"}, True),
    ("ArnLike", "arn:aws:iam::*:role/*", {K: "not-an-arn"}, False),
    ("ArnLike", "arn:aws:iam::*:role/*", ABSENT, False),
    ("ArnNotEquals", "arn:aws:iam::111122223333:role/app", {K: "arn:aws:iam::111122223333:role/x"}, True),
    ("ArnNotEquals", "arn:aws:iam::111122223333:role/app", {K: "arn:aws:iam::111122223333:role/app"}, False),
    ("ArnNotLike", "arn:aws:iam::*:role/*", {K: "arn:aws:iam::111122223333:role/x"}, False),
    ("ArnNotLike", "arn:aws:iam::*:role/*", ABSENT, True),
    # IfExists: absent -> true; present -> the base operator
    ("StringEqualsIfExists", "abc", ABSENT, True),
    ("StringEqualsIfExists", "abc", {K: "abc"}, True),
    ("StringEqualsIfExists", "abc", {K: "x"}, False),
    ("StringNotEqualsIfExists", "abc", ABSENT, True),
    ("StringNotEqualsIfExists", "abc", {K: "abc"}, False),
    ("BoolIfExists", "true", ABSENT, True),
    ("BoolIfExists", "true", {K: False}, False),
    ("NumericLessThanIfExists", "5", ABSENT, True),
    ("NumericLessThanIfExists", "5", {K: 7}, False),
    ("ArnLikeIfExists", "arn:aws:iam::*:role/*", ABSENT, True),
    ("StringEqualsIgnoreCaseIfExists", "AB", {K: "ab"}, True),
    # ForAnyValue: at least one request value
    ("ForAnyValue:StringEquals", ["a", "b"], {K: ["x", "b"]}, True),
    ("ForAnyValue:StringEquals", ["a", "b"], {K: ["x", "y"]}, False),
    ("ForAnyValue:StringEquals", "a", ABSENT, False),
    ("ForAnyValue:StringEquals", "a", {K: []}, False),
    ("ForAnyValue:StringLike", "a*", {K: ["x", "ab"]}, True),
    ("ForAnyValue:StringNotEquals", ["a", "b"], {K: ["a", "c"]}, True),
    ("ForAnyValue:StringNotEquals", ["a", "b"], {K: ["a", "b"]}, False),
    ("ForAnyValue:StringNotEquals", "a", ABSENT, False),
    # ForAllValues: every request value; vacuously true when absent or empty
    ("ForAllValues:StringEquals", ["a", "b"], {K: ["a", "b"]}, True),
    ("ForAllValues:StringEquals", ["a", "b"], {K: ["a"]}, True),
    ("ForAllValues:StringEquals", ["a", "b"], {K: ["a", "c"]}, False),
    ("ForAllValues:StringEquals", "a", ABSENT, True),
    ("ForAllValues:StringEquals", "a", {K: []}, True),
    ("ForAllValues:StringNotEquals", ["a", "b"], {K: ["c", "d"]}, True),
    ("ForAllValues:StringNotEquals", ["a", "b"], {K: ["c", "a"]}, False),
    ("ForAllValues:StringEqualsIgnoreCase", "AB", {K: ["ab", "Ab"]}, True),
    ("ForAllValues:StringEqualsIfExists", "a", ABSENT, True),
    ("ForAnyValue:StringEqualsIfExists", "a", ABSENT, True),
    # a multivalued request value under a plain operator: any value matches
    ("StringEquals", "b", {K: ["a", "b"]}, True),
    ("StringEquals", "c", {K: ["a", "b"]}, False),
    ("StringNotEquals", "b", {K: ["a", "b"]}, False),
    ("StringEquals", "a", {K: []}, False),
    ("StringNotEquals", "a", {K: []}, True),
]


@pytest.mark.parametrize(("op", "value", "context", "expected"), CASES)
def test_operator_table(op: str, value: Any, context: dict[str, Any], expected: bool) -> None:
    assert one(op, value, context) is expected


def test_every_operator_appears_in_the_table() -> None:
    seen = {op.split(":")[-1].removesuffix("IfExists") for op, *_ in CASES}
    assert set(OPERATOR_NAMES) <= seen


def test_condition_key_names_are_case_insensitive() -> None:
    assert one("StringEquals", "v", {"TEST:KEY": "v"}, key="test:key")
    assert one(
        "StringEquals", "v", {"kms:encryptioncontext:appname": "v"}, key="kms:EncryptionContext:AppName"
    )
    # ... but values are not (StringEquals)
    assert not one("StringEquals", "V", {"test:key": "v"}, key="TEST:KEY")


def test_keys_within_an_operator_are_anded() -> None:
    block = {"StringEquals": {"a:k1": "x", "a:k2": "y"}}
    assert holds(block, {"a:k1": "x", "a:k2": "y"})
    assert not holds(block, {"a:k1": "x", "a:k2": "z"})
    assert not holds(block, {"a:k1": "x"})


def test_operators_are_anded() -> None:
    block = {"StringEquals": {"a:k1": "x"}, "Bool": {"a:k2": "true"}}
    assert holds(block, {"a:k1": "x", "a:k2": True})
    assert not holds(block, {"a:k1": "x", "a:k2": False})
    assert not holds(block, {"a:k1": "y", "a:k2": True})


def test_empty_condition_block_holds() -> None:
    assert holds({}, {})


def test_operator_names_parse_case_insensitively() -> None:
    (clause,) = parse_condition_block({"forallvalues:stringequalsifexists": {K: "a"}})
    assert (clause.base, clause.set_operator, clause.if_exists) == ("StringEquals", "ForAllValues", True)


def test_clause_records_what_was_written() -> None:
    (clause,) = parse_condition_block({"ForAnyValue:StringNotLike": {K: ["a*", True, 3]}})
    assert clause.operator == "ForAnyValue:StringNotLike"
    assert clause.negated is True
    assert clause.key == K
    assert clause.values == ("a*", "true", "3")


@pytest.mark.parametrize(
    "block",
    [
        {"StringEqualz": {K: "a"}},
        {"IfExists": {K: "a"}},
        {"ForSomeValues:StringEquals": {K: "a"}},
        {"NullIfExists": {K: "true"}},
        {"ForAnyValue:Null": {K: "true"}},
        {"DateLessThan": {K: "2024-01-01T00:00:00Z"}},
        {"IpAddress": {K: "10.0.0.0/8"}},
        {"Bool": {K: "yes"}},
        {"Null": {K: "maybe"}},
        {"NumericEquals": {K: "ten"}},
        {"NumericEquals": {K: "NaN"}},
        {"ArnLike": {K: "arn:aws:iam"}},
        {"StringEquals": {K: []}},
        {"StringEquals": {K: None}},
        {"StringEquals": {K: {"nested": "x"}}},
        {"StringEquals": {K: ["a", ["b"]]}},
        {"StringEquals": {}},
        {"StringEquals": "a"},
        {"StringEquals": {"": "a"}},
        ["StringEquals"],
    ],
)
def test_malformed_condition_blocks_fail_closed(block: Any) -> None:
    with pytest.raises(PolicyError):
        parse_condition_block(block)


def test_normalize_context_merges_case_variants_and_drops_empty_values() -> None:
    ctx = normalize_context({"A:k": "x", "a:K": ["y"], "b:k": [], "c:k": None, "d:k": 7, "e:k": False})
    assert ctx == {"a:k": ("x", "y"), "d:k": ("7",), "e:k": ("false",)}


@pytest.mark.parametrize(
    ("pattern", "value", "ignore_case", "expected"),
    [
        ("kms:*", "kms:Decrypt", False, True),
        ("kms:Gen*", "kms:GenerateDataKey", False, True),
        ("kms:Decr?pt", "kms:Decrypt", False, True),
        ("kms:Decr?pt", "kms:Decrpt", False, False),
        ("KMS:DECRYPT", "kms:Decrypt", True, True),
        ("KMS:DECRYPT", "kms:Decrypt", False, False),
        ("a.b", "axb", False, False),
        ("*", "", False, True),
        ("?", "", False, False),
        ("a*b*c", "a\nb\nc", False, True),
    ],
)
def test_wildcard_match(pattern: str, value: str, ignore_case: bool, expected: bool) -> None:
    assert wildcard_match(pattern, value, ignore_case=ignore_case) is expected
