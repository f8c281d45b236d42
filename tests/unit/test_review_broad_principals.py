"""``"Principal": "*"`` and account principals on a statement that releases key material are findings even
with attestation conditions: attestation proves the code, not who runs it, so anyone who launches the same
image in their own enclave gets the key. Conditions on caller keys (``aws:PrincipalArn``,
``aws:PrincipalAccount``, ``kms:CallerAccount``) narrow that by evaluation; nothing else does. Each case is
shown to the evaluator too: the stand-in for an identity nobody named, carrying the reviewed image's PCRs,
is allowed exactly when the reviewer reports the statement."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from nitrovault.policy import build_request_context, evaluate_key_policy
from nitrovault.policy.manifest import PcrManifest
from nitrovault.policy.review import KeyReview, review_policy
from nitrovault.policy.review.probes import anyone_arn, delegate_arn

ACCT = "111122223333"
OTHER = "444455556666"
ENCLAVE = f"arn:aws:iam::{ACCT}:role/enclave"
ROOT = f"arn:aws:iam::{ACCT}:root"
PCRS = {i: hashlib.sha384(f"image-pcr{i}".encode()).digest() for i in (0, 1, 2)}
MANIFEST = PcrManifest(pcrs=PCRS)
CTX_COND = {"kms:EncryptionContext:model": "m"}
PCR_COND = {f"kms:RecipientAttestation:PCR{i}": v.hex() for i, v in PCRS.items()}
KEY_ARN = "arn:aws:kms:us-east-1:999988887777:key/policy"
DENY = {
    "Sid": "DenyDecryptWithoutAttestation",
    "Effect": "Deny",
    "Principal": {"AWS": "*"},
    "Action": "kms:Decrypt",
    "Resource": "*",
    "Condition": {"Null": {"kms:RecipientAttestation:PCR0": "true"}},
}
OUTSIDER = anyone_arn()  # a principal of another AWS account
SOMEONE = delegate_arn(ACCT)  # an identity of the account that no statement names


def release(
    principal: Any, extra: dict[str, Any] | None = None, action: Any = "kms:Decrypt"
) -> dict[str, Any]:
    condition: dict[str, Any] = {"StringEquals": dict(CTX_COND), "StringEqualsIgnoreCase": PCR_COND}
    for operator, keys in (extra or {}).items():
        condition[operator] = {**condition.get(operator, {}), **keys}
    return {"Sid": "Release", "Effect": "Allow", "Principal": principal, "Action": action, "Resource": "*",
            "Condition": condition}


def policy(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": [*statements, DENY]}


def image_gets_key(doc: dict[str, Any], who: str, action: str = "kms:Decrypt") -> bool:
    """The evaluator's answer for ``who`` running the reviewed image in its own enclave."""
    request = build_request_context(action, who, KEY_ARN, {"model": "m"}, PCRS)
    return evaluate_key_policy(doc, request).allowed


def broad(review: KeyReview) -> list[Any]:
    return [f for f in review.findings if f.category in ("wildcard-principal", "root-delegation")]


# -- flagged even with attestation conditions -----------------------------------------------------------


@pytest.mark.parametrize("principal", ["*", {"AWS": "*"}], ids=["star", "aws-star"])
def test_everyone_with_attestation_is_a_cross_account_finding(principal: Any) -> None:
    doc = policy(release(principal))
    assert image_gets_key(doc, OUTSIDER)  # another account, the same image: the key
    (finding,) = broad(review_policy(doc, manifest=MANIFEST))
    assert (finding.rule_id, finding.category, finding.severity) == (
        "NV-WILDCARD-ATTESTED", "wildcard-principal", "high"
    )
    assert finding.proved and finding.principal == "*"
    assert "any principal in any AWS account" in finding.message
    assert "not who runs it" in finding.message


@pytest.mark.parametrize("principal", [{"AWS": ROOT}, {"AWS": ACCT}], ids=["root-arn", "bare-account-id"])
def test_the_account_principal_with_attestation_is_root_delegation(principal: Any) -> None:
    doc = policy(release(principal))
    assert image_gets_key(doc, SOMEONE)  # any identity of the account (an IAM policy is assumed to allow)
    (finding,) = broad(review_policy(doc, manifest=MANIFEST))
    assert (finding.rule_id, finding.severity, finding.principal) == ("NV-ROOT-DELEGATION", "high", ROOT)
    assert finding.proved and "not who runs it" in finding.message and "IAM policy" in finding.message


def test_everyone_without_attestation_is_critical() -> None:
    doc = {"Version": "2012-10-17", "Statement": [{**release("*"), "Condition": {"StringEquals": CTX_COND}}]}
    review = review_policy(doc)
    finding = next(f for f in review.findings if f.rule_id == "NV-WILDCARD-PRINCIPAL")
    assert finding.severity == "critical" and finding.proved
    unattested = next(f for f in review.findings if f.rule_id == "NV-PLAINTEXT-UNATTESTED")
    assert unattested.severity == "critical"


@pytest.mark.parametrize(
    "action", ["kms:GenerateDataKey", "kms:ReEncryptFrom", "kms:DeriveSharedSecret", "kms:*"]
)
def test_every_key_releasing_action_counts(action: str) -> None:
    review = review_policy(policy(release("*", action=action)), manifest=MANIFEST)
    assert any(f.rule_id in ("NV-WILDCARD-ATTESTED", "NV-WILDCARD-PRINCIPAL") for f in review.findings)


def test_everyone_allowed_only_actions_that_release_nothing_is_not_flagged() -> None:
    review = review_policy(policy(release("*", action=["kms:Encrypt", "kms:DescribeKey"]),
                                  release({"AWS": ENCLAVE})))
    assert broad(review) == []


def test_not_principal_reaches_everyone_else() -> None:
    statement = release("*")
    statement.pop("Principal")
    statement["NotPrincipal"] = {"AWS": f"arn:aws:iam::{ACCT}:role/admin"}
    findings = review_policy(policy(statement)).findings
    assert next(f for f in findings if f.rule_id == "NV-WILDCARD-ATTESTED").proved


# -- conditions that pin the caller: considered by evaluation ----------------------------------------------

PINS = {
    "principal-arn": {"StringEquals": {"aws:PrincipalArn": ENCLAVE}},
    "principal-arn-arn-equals": {"ArnEquals": {"aws:PrincipalArn": ENCLAVE}},
}


@pytest.mark.parametrize("pin", sorted(PINS))
@pytest.mark.parametrize("principal", ["*", {"AWS": ROOT}], ids=["star", "root"])
def test_a_principal_arn_pin_rules_out_every_unnamed_identity(pin: str, principal: Any) -> None:
    doc = policy(release(principal, PINS[pin]))
    assert not image_gets_key(doc, OUTSIDER) and not image_gets_key(doc, SOMEONE)
    assert image_gets_key(doc, ENCLAVE)  # the one identity it names still gets the key
    review = review_policy(doc, manifest=MANIFEST)
    assert broad(review) == [] and review.findings == ()


def test_a_same_account_pin_on_everyone_is_still_account_wide() -> None:
    for key in ("aws:PrincipalAccount", "kms:CallerAccount"):
        doc = policy(release("*", {"StringEquals": {key: ACCT}}))
        assert not image_gets_key(doc, OUTSIDER) and image_gets_key(doc, SOMEONE)
        (finding,) = broad(review_policy(doc, manifest=MANIFEST))
        assert finding.rule_id == "NV-WILDCARD-ATTESTED" and finding.proved, key
        assert f"any identity of account {ACCT}" in finding.message
        assert "no IAM policy needed" in finding.message


def test_a_same_account_pin_on_the_account_principal_narrows_nothing() -> None:
    doc = policy(release({"AWS": ROOT}, {"StringEquals": {"kms:CallerAccount": ACCT}}))
    assert image_gets_key(doc, SOMEONE)
    assert [f.rule_id for f in broad(review_policy(doc, manifest=MANIFEST))] == ["NV-ROOT-DELEGATION"]


def test_an_account_exclusion_leaves_every_other_account() -> None:
    doc = policy(release("*", {"StringNotEquals": {"aws:PrincipalAccount": OTHER}}))
    assert image_gets_key(doc, OUTSIDER)
    (finding,) = broad(review_policy(doc, manifest=MANIFEST))
    assert finding.proved and "any AWS account" in finding.message


def test_a_principal_arn_pattern_admits_identities_nobody_named() -> None:
    doc = policy(release("*", {"ArnLike": {"aws:PrincipalArn": f"arn:aws:iam::{ACCT}:role/enclave-*"}}))
    anybody = f"arn:aws:iam::{ACCT}:role/enclave-made-by-anyone-with-iam-access"
    assert image_gets_key(doc, anybody)
    (finding,) = broad(review_policy(doc, manifest=MANIFEST))
    assert finding.proved and "matches a pattern" in finding.message


def test_an_organization_condition_does_not_pin_the_caller() -> None:
    # aws:PrincipalOrgID is not a caller key the reviewer derives: an organization spans accounts
    doc = policy(release("*", {"StringEquals": {"aws:PrincipalOrgID": "o-abc123"}}))
    assert image_gets_key(doc, OUTSIDER) is False  # the probe lacks the key...
    with_org = build_request_context("kms:Decrypt", OUTSIDER, KEY_ARN, {"model": "m"}, PCRS,
                                     extra_context={"aws:PrincipalOrgID": "o-abc123"})
    assert evaluate_key_policy(doc, with_org).allowed  # ...but a member account's request carries it
    (finding,) = broad(review_policy(doc, manifest=MANIFEST))
    assert finding.proved and "aws:principalorgid" in finding.message and "o-abc123" not in finding.message


def test_a_deny_of_other_accounts_still_leaves_the_whole_account() -> None:
    deny_others = {"Sid": "DenyOtherAccounts", "Effect": "Deny", "Principal": "*", "Action": "kms:*",
                   "Resource": "*", "Condition": {"StringNotEquals": {"aws:PrincipalAccount": ACCT}}}
    doc = policy(release("*"), deny_others)
    assert not image_gets_key(doc, OUTSIDER) and image_gets_key(doc, SOMEONE)
    (finding,) = broad(review_policy(doc, manifest=MANIFEST))
    assert finding.rule_id == "NV-WILDCARD-ATTESTED" and f"account {ACCT}" in finding.message


def test_a_deny_of_everyone_but_the_enclave_role_pins_everyone_to_it() -> None:
    deny_others = {"Sid": "OnlyTheEnclaveRole", "Effect": "Deny", "Principal": "*", "Action": "kms:Decrypt",
                   "Resource": "*", "Condition": {"StringNotEquals": {"aws:PrincipalArn": ENCLAVE}}}
    doc = policy(release("*"), deny_others)
    request = build_request_context("kms:Decrypt", OUTSIDER, KEY_ARN, {"model": "m"}, PCRS)
    assert evaluate_key_policy(doc, request).deny and not image_gets_key(doc, SOMEONE)
    assert image_gets_key(doc, ENCLAVE)
    assert broad(review_policy(doc, manifest=MANIFEST)) == []


def test_a_deny_of_everyone_but_the_enclave_role_on_another_key_pins_nothing() -> None:
    # negative of the above: aws:SourceVpc is not a caller key, so the Deny does not rule out any caller
    deny_others = {"Sid": "OnlyTheVpc", "Effect": "Deny", "Principal": "*", "Action": "kms:Decrypt",
                   "Resource": "*", "Condition": {"StringNotEquals": {"aws:SourceVpc": "vpc-1"}}}
    doc = policy(release("*"), deny_others)
    (finding,) = broad(review_policy(doc, manifest=MANIFEST))
    assert finding.rule_id == "NV-WILDCARD-ATTESTED" and finding.proved  # a request from vpc-1


def test_an_unresolved_template_account_still_reaches_every_identity_of_it() -> None:
    # in a template reviewed without --account the account is "<AccountId>": the caller keys must still
    # be known for the stand-in, or the account condition would wrongly rule every identity out
    root = "arn:aws:iam::<AccountId>:root"
    doc = policy(release({"AWS": root}, {"StringEquals": {"aws:PrincipalAccount": "<AccountId>"}}))
    (finding,) = broad(review_policy(doc, manifest=MANIFEST))
    assert (finding.rule_id, finding.principal, finding.proved) == ("NV-ROOT-DELEGATION", root, True)
