"""The reviewer's categories are a stable contract: every category has one kind, recommendations never
exceed medium nor share a category with an exposure, and ``docs/review.md`` (the categories table and the
rules table) says exactly what the catalogue does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nitrovault.policy.review import CATEGORIES, CATEGORY_KINDS, KINDS, RULES, SEVERITY_ORDER, review_policy
from nitrovault.policy.review.catalogue import RECOMMENDATION_MAX

DOC = Path(__file__).resolve().parents[2] / "docs" / "review.md"


def _table(heading: str) -> list[list[str]]:
    """The rows (cells stripped of backticks) of the first table after ``heading`` in docs/review.md."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index(heading):]
    rows = []
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip().strip("`") for cell in line.strip().strip("|").split("|")])
        elif rows and not line.startswith("|"):
            break
    return rows[1:]  # without the header row


def test_every_category_has_exactly_one_kind() -> None:
    assert set(CATEGORY_KINDS) == set(CATEGORIES)
    assert set(CATEGORY_KINDS.values()) == set(KINDS)
    assert {r.category for r in RULES.values()} == set(CATEGORIES)  # no category without a rule


def test_recommendations_are_at_most_medium_and_alone_in_their_category() -> None:
    recommendations = {r.rule_id for r in RULES.values() if r.kind == "recommendation"}
    assert recommendations == {"NV-NO-DENY", "NV-BIND-MISSING-PCR", "NV-MANIFEST-UNBOUND"}
    for rule_id in recommendations:
        rule = RULES[rule_id]
        for severity in (rule.severity, rule.raised or rule.severity):
            assert SEVERITY_ORDER[severity] <= SEVERITY_ORDER[RECOMMENDATION_MAX], rule_id
    assert all(CATEGORY_KINDS[RULES[r].category] != "exposure" for r in recommendations)


def test_the_missing_deny_is_not_filed_under_plaintext_without_attestation() -> None:
    # the regression this contract exists for
    assert RULES["NV-NO-DENY"].category == "recommendation"
    assert RULES["NV-BIND-MISSING-PCR"].category == "recommendation"
    assert {r.rule_id for r in RULES.values() if r.category == "plaintext-without-attestation"} == {
        "NV-PLAINTEXT-UNATTESTED", "NV-ATT-BYPASS",
    }


def test_measurement_set_rules_have_their_own_categories() -> None:
    assert RULES["NV-SET-DEBUG"].category == "debug-pcr"  # the CDK aspect's unsafe switch relies on it
    assert RULES["NV-SET-MALFORMED"].category == "malformed-measurement-set"
    assert RULES["NV-SET-UNSIGNED"].category == "unsigned-measurement-set"
    assert {RULES[r].kind for r in ("NV-SET-DEBUG", "NV-SET-MALFORMED", "NV-SET-UNSIGNED")} == {
        "measurement-set"
    }


def test_a_policy_with_only_defence_in_depth_gaps_has_no_exposure() -> None:
    # ImageSha384 only, no Deny (AWS's developer guide example): two recommendations, nothing else
    example = {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::111122223333:role/enclave"},
        "Action": "kms:Decrypt", "Resource": "*",
        "Condition": {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": "ab" * 48}},
    }]}
    findings = review_policy(example).findings
    assert {(f.rule_id, f.category) for f in findings} == {
        ("NV-NO-DENY", "recommendation"), ("NV-BIND-MISSING-PCR", "recommendation"),
    }
    assert all(SEVERITY_ORDER[f.severity] <= SEVERITY_ORDER["medium"] for f in findings)


# -- docs/review.md says what the catalogue does ------------------------------------------------------------


def _range(category: str) -> str:
    severities = {s for r in RULES.values() if r.category == category for s in (r.severity, r.raised) if s}
    ordered = sorted(severities, key=SEVERITY_ORDER.__getitem__)
    return ordered[0] if len(ordered) == 1 else f"{ordered[0]} - {ordered[-1]}"


def test_the_documented_categories_table_matches_the_catalogue() -> None:
    rows = _table("## Categories: a stable contract")
    assert [row[0] for row in rows] == list(CATEGORIES)
    for category, kind, meaning, severity, example in rows:
        assert kind == CATEGORY_KINDS[category], category
        assert severity == _range(category), category
        assert meaning and example, category


def test_the_documented_rules_table_matches_the_catalogue() -> None:
    rows = _table("## Findings")
    assert sorted(row[0] for row in rows) == sorted(RULES)
    for rule_id, category, severity, trigger in rows:
        rule = RULES[rule_id]
        assert category == rule.category, rule_id
        assert severity.split(" ")[0] == rule.severity, rule_id  # "high (critical for ...)"
        if rule.raised:
            assert re.search(rf"\({rule.raised}\b", severity), rule_id
        else:
            assert severity == rule.severity, rule_id
        assert trigger, rule_id


@pytest.mark.parametrize("heading", ["## Categories: a stable contract", "## Findings"])
def test_the_table_parser_sees_a_table(heading: str) -> None:
    # guards the two tests above against passing on an empty parse
    assert len(_table(heading)) >= len(CATEGORIES)
