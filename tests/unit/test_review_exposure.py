"""Plaintext without attestation is decided by evaluation, not by shape: every verdict here is checked in
both directions against the evaluator itself (``evaluate_key_policy``, the KMS emulator's), so a test shows
the evaluator refusing the probe wherever the reviewer reports no exposure, and allowing it wherever the
reviewer reports a proved one. Each step of ``nitrovault.policy.review.exposure`` has a case that only it
decides, and a close variant that makes the step fail."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from nitrovault.policy import build_request_context, evaluate_key_policy
from nitrovault.policy.build import model_key_policy
from nitrovault.policy.manifest import PcrManifest
from nitrovault.policy.review import Grant, KeyReview, review_policy

ACCT = "111122223333"
ENCLAVE = f"arn:aws:iam::{ACCT}:role/enclave"
SEALER = f"arn:aws:iam::{ACCT}:role/sealer"
PCRS = {i: hashlib.sha384(f"image-pcr{i}".encode()).digest() for i in (0, 1, 2)}
MANIFEST = PcrManifest(pcrs=PCRS)
FOREIGN = {i: hashlib.sha384(f"another image {i}".encode()).digest() for i in (0, 1, 2)}
CONTEXT = {"model": "m"}
CTX_COND = {"kms:EncryptionContext:model": "m"}
PCR_COND = {f"kms:RecipientAttestation:PCR{i}": v.hex() for i, v in PCRS.items()}
KEY_ARN = "arn:aws:kms:us-east-1:999988887777:key/policy"
EXPOSURE = "plaintext-without-attestation"


def allow(
    condition: dict[str, Any] | None = None,
    principal: Any = None,
    action: Any = "kms:Decrypt",
    sid: str = "Use",
) -> dict[str, Any]:
    statement: dict[str, Any] = {
        "Sid": sid,
        "Effect": "Allow",
        "Principal": principal or {"AWS": ENCLAVE},
        "Action": action,
        "Resource": "*",
    }
    if condition:
        statement["Condition"] = condition
    return statement


def deny(
    condition: dict[str, Any], principal: Any = None, sid: str = "Deny", action: Any = "kms:Decrypt"
) -> dict[str, Any]:
    return {
        "Sid": sid,
        "Effect": "Deny",
        "Principal": principal or {"AWS": "*"},
        "Action": action,
        "Resource": "*",
        "Condition": condition,
    }


NULL_PCR0 = {"Null": {"kms:RecipientAttestation:PCR0": "true"}}


def policy(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def evaluate(
    doc: dict[str, Any],
    who: str = ENCLAVE,
    *,
    action: str = "kms:Decrypt",
    context: dict[str, str] | None = None,
    pcrs: dict[int, bytes] | None = None,
    extra: dict[str, Any] | None = None,
) -> Any:
    """What the KMS emulator would decide for this request."""
    request = build_request_context(
        action, who, KEY_ARN, CONTEXT if context is None else context, pcrs, extra_context=extra
    )
    return evaluate_key_policy(doc, request)


def exposures(review: KeyReview) -> list[Any]:
    return [f for f in review.findings if f.category == EXPOSURE]


def row(
    review: KeyReview, statement: str = "Use", principal: str = ENCLAVE, action: str = "kms:Decrypt"
) -> Grant:
    return next(
        g for g in review.grants if (g.statement, g.principal, g.actions) == (statement, principal, (action,))
    )


# -- a Deny (or any combination) that refuses every unattested request: NO exposure -------------------------

REFUSING_DENIES = {
    "null-pcr0": NULL_PCR0,
    "null-image-sha384": {"Null": {"kms:RecipientAttestation:ImageSha384": "true"}},
    "null-pcr1": {"Null": {"kms:RecipientAttestation:PCR1": "true"}},  # every attestation key is absent
    "not-the-image": {"StringNotEqualsIgnoreCase": {"kms:RecipientAttestation:PCR0": PCRS[0].hex()}},
    "two-keys": {"Null": {"kms:RecipientAttestation:PCR0": "true", "kms:RecipientAttestation:PCR2": "true"}},
}


@pytest.mark.parametrize("name", sorted(REFUSING_DENIES))
def test_a_deny_refusing_every_unattested_decrypt_is_no_exposure(name: str) -> None:
    # the Allow has NO attestation condition; the Deny alone keeps plaintext from unattested callers
    doc = policy(allow({"StringEquals": CTX_COND}), deny(REFUSING_DENIES[name]))
    decision = evaluate(doc)  # the probe, as KMS would evaluate it: explicitly denied
    assert not decision.allowed and decision.deny and decision.matched_sids == ("Deny",)
    assert not evaluate(doc, context={}).allowed  # and without the context too
    review = review_policy(doc, manifest=MANIFEST)
    assert exposures(review) == [], review.findings
    grant = row(review)
    assert grant.verdict == "attested-release" and "enforced by Deny Deny" in grant.conditions
    assert grant.unattested is False


def test_deny_binding_the_image_makes_an_unconditioned_allow_clean() -> None:
    # "Deny unless PCR0 is the image" + an Allow without attestation: the Deny is the binding
    doc = policy(allow({"StringEquals": CTX_COND}), deny(REFUSING_DENIES["not-the-image"]))
    assert evaluate(doc, pcrs=PCRS).allowed and not evaluate(doc, pcrs=FOREIGN).allowed
    review = review_policy(doc, manifest=MANIFEST)
    assert review.findings == ()  # the old reviewer said "plaintext without attestation", high
    grant = row(review)
    assert (grant.unattested, grant.foreign_pcrs, grant.manifest_pcrs) == (False, False, True)


def test_a_deny_refusing_unattested_calls_leaves_any_enclave_which_is_weak_binding() -> None:
    # Null-PCR0 Deny + an Allow without PCR conditions: no plaintext without a document, but ANY enclave
    # (a debug-mode one too) gets the key: that is weak-binding, proved with foreign PCRs, not an exposure
    # of plaintext without attestation
    doc = policy(allow({"StringEquals": CTX_COND}), deny(NULL_PCR0))
    assert not evaluate(doc).allowed and evaluate(doc, pcrs=FOREIGN).allowed
    review = review_policy(doc, manifest=MANIFEST)
    assert exposures(review) == []
    (finding,) = review.findings
    assert (finding.rule_id, finding.category, finding.proved) == ("NV-ANY-ENCLAVE", "weak-binding", True)


def test_several_statements_combine_into_a_refusal() -> None:
    # two Allows without attestation, two Denies that together cover both principals
    doc = policy(
        allow({"StringEquals": CTX_COND}, principal={"AWS": [ENCLAVE, SEALER]}),
        deny(NULL_PCR0, principal={"AWS": ENCLAVE}, sid="DenyEnclave"),
        deny({"Null": {"kms:RecipientAttestation:ImageSha384": "true"}}, principal={"AWS": SEALER},
             sid="DenySealer"),
    )
    for who in (ENCLAVE, SEALER):
        assert evaluate(doc, who).deny
    review = review_policy(doc, manifest=MANIFEST)
    assert exposures(review) == []
    assert "DenyEnclave" in row(review).conditions
    assert "DenySealer" in row(review, principal=SEALER).conditions


# -- policies that truly release plaintext without attestation: exposure, proved --------------------------


def _proved(review: KeyReview, principal: str = ENCLAVE, rule: str = "NV-PLAINTEXT-UNATTESTED") -> Any:
    finding = next(f for f in review.findings if f.rule_id == rule and f.principal == principal)
    assert finding.category == EXPOSURE and finding.proved, finding
    return finding


def test_no_deny_at_all_is_a_proved_exposure() -> None:
    doc = policy(allow({"StringEquals": CTX_COND}))
    assert evaluate(doc).allowed
    _proved(review_policy(doc, manifest=MANIFEST))


def test_a_deny_that_only_covers_some_principals_leaves_the_others_exposed() -> None:
    doc = policy(allow({"StringEquals": CTX_COND}, principal={"AWS": [ENCLAVE, SEALER]}),
                 deny(NULL_PCR0, principal={"AWS": ENCLAVE}))
    assert evaluate(doc, ENCLAVE).deny and evaluate(doc, SEALER).allowed
    review = review_policy(doc, manifest=MANIFEST)
    _proved(review, SEALER)
    assert [f.principal for f in exposures(review)] == [SEALER]
    assert row(review).verdict == "attested-release" and row(review, principal=SEALER).unattested


def test_a_deny_of_another_account_leaves_the_account_root_exposed() -> None:
    root = f"arn:aws:iam::{ACCT}:root"
    doc = policy(allow({"StringEquals": CTX_COND}, principal={"AWS": ACCT}),
                 deny(NULL_PCR0, principal={"AWS": "444455556666"}))
    assert evaluate(doc, f"arn:aws:iam::{ACCT}:role/anyone").allowed
    _proved(review_policy(doc, manifest=MANIFEST), root)


def test_a_deny_of_decrypt_only_leaves_re_encrypt_from_exposed() -> None:
    both = ["kms:Decrypt", "kms:ReEncryptFrom"]
    doc = policy(allow({"StringEquals": CTX_COND}, action=both), deny(NULL_PCR0))
    assert evaluate(doc).deny and evaluate(doc, action="kms:ReEncryptFrom").allowed
    review = review_policy(doc, manifest=MANIFEST)
    finding = _proved(review)
    assert "ReEncryptFrom" in finding.message
    assert row(review).verdict == "attested-release"
    assert row(review, action="kms:ReEncryptFrom").verdict == "unattested-plaintext"


def test_an_inverted_null_deny_refuses_attested_callers_not_unattested_ones() -> None:
    inverted = {"Null": {"kms:RecipientAttestation:PCR0": "false"}}
    doc = policy(allow({"StringEquals": CTX_COND}), deny(inverted))
    assert evaluate(doc).allowed and not evaluate(doc, pcrs=PCRS).allowed
    _proved(review_policy(doc))


def test_a_deny_exempting_a_vpc_is_defeated_by_a_counter_witness() -> None:
    # "Deny without attestation unless the call comes from vpc-1": the parent's own VPC decrypts freely
    doc = policy(
        allow({"StringEquals": CTX_COND}),
        deny({**NULL_PCR0, "StringNotEquals": {"aws:SourceVpc": "vpc-1"}}),
    )
    assert evaluate(doc).deny and evaluate(doc, extra={"aws:SourceVpc": "vpc-1"}).allowed
    finding = _proved(review_policy(doc))
    assert "aws:sourcevpc" in finding.message and "vpc-1" not in finding.message


def test_a_deny_exempting_the_models_own_context_is_defeated_by_a_counter_witness() -> None:
    # the Deny covers every context but the model's: exactly the ciphertexts that matter decrypt
    doc = policy(allow(), deny({**NULL_PCR0, "StringNotEquals": {"kms:EncryptionContext:model": "m"}}))
    assert evaluate(doc, context={}).deny and evaluate(doc, context={"model": "m"}).allowed
    _proved(review_policy(doc))


def test_a_deny_with_a_context_the_allow_pins_refuses_every_request_the_allow_admits() -> None:
    # step 3 with a pinned key: every request the Allow admits has model=m, and the Deny covers model=m
    doc = policy(allow({"StringEquals": CTX_COND}),
                 deny({**NULL_PCR0, "StringEquals": {"kms:EncryptionContext:model": "m"}}))
    assert evaluate(doc).deny
    assert exposures(review_policy(doc)) == []


def test_the_same_deny_does_not_cover_an_allow_whose_context_is_a_pattern() -> None:
    # negative of the above: the Allow admits model=mx, which the Deny does not cover
    doc = policy(allow({"StringLike": {"kms:EncryptionContext:model": "m*"}}),
                 deny({**NULL_PCR0, "StringEquals": {"kms:EncryptionContext:model": "m"}}))
    assert evaluate(doc, context={"model": "mx"}).allowed
    _proved(review_policy(doc))


def test_a_deny_that_depends_on_a_key_it_cannot_choose_is_not_ruled_out_nor_proved() -> None:
    # ForAllValues on a request key holds when the key is absent; a request WITH tags escapes the Deny,
    # but the reviewer does not enumerate tag sets: reported, not proved
    doc = policy(allow({"StringEquals": CTX_COND}),
                 deny({**NULL_PCR0, "ForAllValues:StringEquals": {"aws:TagKeys": "x"}}))
    assert evaluate(doc).deny and evaluate(doc, extra={"aws:TagKeys": "y"}).allowed
    finding = next(f for f in review_policy(doc).findings if f.rule_id == "NV-PLAINTEXT-UNATTESTED")
    assert finding.category == EXPOSURE and not finding.proved and "aws:TagKeys" in finding.message


# -- step 1: a statement that cannot apply is never blamed for what another statement allows ---------------


def test_the_attested_statement_is_not_blamed_for_another_statements_plaintext() -> None:
    # (the old reviewer reported NV-ATT-BYPASS on the attested statement here)
    doc = policy(
        allow({"StringEquals": CTX_COND, "StringEqualsIgnoreCase": PCR_COND}, sid="Release"),
        allow({"StringEquals": CTX_COND}, sid="Leak"),
    )
    assert evaluate(doc).allowed and evaluate(doc).matched_sids == ("Leak",)
    review = review_policy(doc, manifest=MANIFEST)
    assert {(f.rule_id, f.statement) for f in exposures(review)} == {("NV-PLAINTEXT-UNATTESTED", "Leak")}


def test_an_attested_statement_that_applies_without_a_document_is_a_bypass() -> None:
    # negative of the above: IfExists lets the same statement match a request without a document
    doc = policy(allow({"StringEquals": CTX_COND, "StringEqualsIgnoreCaseIfExists": PCR_COND}, sid="Release"))
    assert evaluate(doc).allowed and evaluate(doc).matched_sids == ("Release",)
    finding = _proved(review_policy(doc), rule="NV-ATT-BYPASS")
    assert finding.statement == "Release" and finding.severity == "critical"


def test_a_bypass_refused_by_a_deny_is_no_exposure() -> None:
    if_exists = {"StringEquals": CTX_COND, "StringEqualsIgnoreCaseIfExists": PCR_COND}
    doc = policy(allow(if_exists), deny(NULL_PCR0))
    assert evaluate(doc).deny
    review = review_policy(doc, manifest=MANIFEST)
    assert exposures(review) == []
    assert "NV-ATT-IFEXISTS" in {f.rule_id for f in review.findings}  # how it is written is still wrong


def test_a_caller_condition_that_excludes_the_principal_rules_the_statement_out() -> None:
    # an unattested Allow for the enclave role whose aws:PrincipalArn condition names another role:
    # no request from the enclave role can satisfy it
    doc = policy(allow({"StringEquals": {**CTX_COND, "aws:PrincipalArn": SEALER}}))
    assert not evaluate(doc).allowed and not evaluate(doc).deny
    assert exposures(review_policy(doc)) == []


def test_the_same_caller_condition_naming_the_principal_is_an_exposure() -> None:
    doc = policy(allow({"StringEquals": {**CTX_COND, "aws:PrincipalArn": ENCLAVE}}))
    assert evaluate(doc).allowed
    _proved(review_policy(doc))


# -- the data-key actions: GenerateDataKey without a Recipient ---------------------------------------------


def test_generate_data_key_refused_without_attestation_is_not_plaintext_to_caller() -> None:
    doc = policy(
        allow(principal={"AWS": SEALER}, action="kms:GenerateDataKey"),
        deny(NULL_PCR0, action=["kms:Decrypt", "kms:GenerateDataKey"]),
    )
    assert evaluate(doc, SEALER, action="kms:GenerateDataKey").deny
    review = review_policy(doc)
    grant = row(review, principal=SEALER, action="kms:GenerateDataKey")
    assert grant.verdict == "attested-release"
    assert "NV-DATAKEY-UNCONSTRAINED" not in {f.rule_id for f in review.findings}


def test_generate_data_key_without_the_deny_is_plaintext_to_caller() -> None:
    doc = policy(allow(principal={"AWS": SEALER}, action="kms:GenerateDataKey"), deny(NULL_PCR0))
    assert evaluate(doc, SEALER, action="kms:GenerateDataKey").allowed
    review = review_policy(doc)
    assert row(review, principal=SEALER, action="kms:GenerateDataKey").verdict == "plaintext-to-caller"
    finding = next(f for f in review.findings if f.rule_id == "NV-DATAKEY-UNCONSTRAINED")
    assert finding.proved


# -- the deployed policy ---------------------------------------------------------------------------------


def test_the_model_key_policy_without_its_deny_has_only_a_recommendation() -> None:
    doc = model_key_policy(
        account_id=ACCT, admin_arns=[f"arn:aws:iam::{ACCT}:role/admin"], sealer_arns=[SEALER],
        enclave_role_arns=[ENCLAVE], pcrs=PCRS, encryption_context=CONTEXT,
    )
    doc["Statement"] = [s for s in doc["Statement"] if s["Effect"] != "Deny"]
    assert not evaluate(doc).allowed  # no statement lets an unattested caller decrypt
    (finding,) = review_policy(doc, manifest=MANIFEST).findings
    assert (finding.rule_id, finding.category, finding.severity) == ("NV-NO-DENY", "recommendation", "medium")


def test_no_deny_is_recommended_when_the_deny_has_an_exemption() -> None:
    # a Deny that depends on aws:SourceVpc refuses some unattested requests, not all of them
    exempting = policy(allow({"StringEquals": CTX_COND, "StringEqualsIgnoreCase": PCR_COND}),
                       deny({**NULL_PCR0, "StringNotEquals": {"aws:SourceVpc": "vpc-1"}}))
    assert "NV-NO-DENY" in {f.rule_id for f in review_policy(exempting).findings}
    plain = policy(allow({"StringEquals": CTX_COND, "StringEqualsIgnoreCase": PCR_COND}), deny(NULL_PCR0))
    assert "NV-NO-DENY" not in {f.rule_id for f in review_policy(plain).findings}


def test_a_multivalued_key_is_never_taken_as_pinned() -> None:
    # the Allow admits any request whose tag keys include "x", e.g. ["x", "y"]; the Deny only refuses
    # requests whose every tag key is "x": requests with more tags escape it
    doc = policy(allow({"StringEquals": {**CTX_COND, "aws:TagKeys": "x"}}),
                 deny({**NULL_PCR0, "ForAllValues:StringEquals": {"aws:TagKeys": "x"}}))
    tags: Any = ["x", "y"]
    assert evaluate(doc, extra={"aws:TagKeys": "x"}).deny
    assert evaluate(doc, extra={"aws:TagKeys": tags}).allowed
    finding = next(f for f in review_policy(doc).findings if f.rule_id == "NV-PLAINTEXT-UNATTESTED")
    assert not finding.proved and "aws:TagKeys" in finding.message
