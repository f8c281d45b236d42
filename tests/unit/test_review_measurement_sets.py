"""Accepted measurement sets: a model key policy that accepts several images (one release statement per set,
as ``nitrovault.policy.build`` encodes a rollout; an optional signer set binds PCR8 without PCR0) is shown
set by set, compared with every manifest, and each debug, malformed or unsigned set gets its own rule. The
policies are built here by hand (the builder's single-set policy, then statements appended), and Sids are
deliberately varied: the reviewer must not depend on them."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import pytest

from nitrovault.policy import build_request_context, evaluate_key_policy
from nitrovault.policy.build import model_key_policy
from nitrovault.policy.manifest import PcrManifest
from nitrovault.policy.review import RULES, KeyReview, Review, review_policy

ACCT = "111122223333"
ENCLAVE = f"arn:aws:iam::{ACCT}:role/enclave"
CONTEXT = {"model": "m"}
KEY_ARN = "arn:aws:kms:us-east-1:999988887777:key/policy"


def image(name: str, *extra: int) -> dict[int, bytes]:
    return {i: hashlib.sha384(f"{name}-pcr{i}".encode()).digest() for i in (0, 1, 2, *extra)}


CURRENT, NEXT = image("current"), image("next")
CERT = hashlib.sha384(b"owner signing certificate").digest()
ROLE = hashlib.sha384(b"parent instance role").digest()


def base() -> dict[str, Any]:
    return model_key_policy(
        account_id=ACCT, admin_arns=[f"arn:aws:iam::{ACCT}:role/admin"],
        sealer_arns=[f"arn:aws:iam::{ACCT}:role/sealer"], enclave_role_arns=[ENCLAVE], pcrs=CURRENT,
        encryption_context=CONTEXT,
    )


def release_statement(
    pcrs: dict[int, Any], sid: str, operator: str = "StringEqualsIgnoreCase"
) -> dict[str, Any]:
    """A release statement like the builder's, for a set given as {index: bytes | str | [str, ...]}."""
    def value(v: Any) -> Any:
        return v.hex() if isinstance(v, bytes) else v

    return {
        "Sid": sid,
        "Effect": "Allow",
        "Principal": {"AWS": [ENCLAVE]},
        "Action": "kms:Decrypt",
        "Resource": "*",
        "Condition": {
            "StringEquals": {"kms:EncryptionContext:model": "m"},
            operator: {f"kms:RecipientAttestation:PCR{i}": value(v) for i, v in sorted(pcrs.items())},
        },
    }


def with_sets(*statements: dict[str, Any]) -> dict[str, Any]:
    """The builder's single-set policy with ``statements`` inserted after its release statement."""
    doc = copy.deepcopy(base())
    at = next(i for i, s in enumerate(doc["Statement"]) if s["Sid"] == "ReleaseToAttestedEnclave") + 1
    doc["Statement"][at:at] = list(statements)
    return doc


def gets_key(doc: dict[str, Any], pcrs: dict[int, bytes]) -> bool:
    request = build_request_context("kms:Decrypt", ENCLAVE, KEY_ARN, CONTEXT, pcrs)
    return evaluate_key_policy(doc, request).allowed


def rules(review: KeyReview) -> set[str]:
    return {f.rule_id for f in review.findings}


def sets(review: KeyReview) -> dict[str, Any]:
    return {m.statement: m for m in review.measurement_sets}


M_CURRENT, M_NEXT = PcrManifest(pcrs=CURRENT), PcrManifest(pcrs=NEXT)
ROLLOUT = with_sets(release_statement(NEXT, "ReleaseToAttestedEnclave2"))


# -- every accepted set is shown -------------------------------------------------------------------------


def test_the_single_set_policy_shows_its_one_set() -> None:
    review = review_policy(base(), manifest=M_CURRENT)
    (only,) = review.measurement_sets
    assert (only.statement, only.kind, only.manifest, only.problems) == (
        "ReleaseToAttestedEnclave", "image", 0, ()
    )
    assert dict(only.pcrs) == {"PCR0": "match", "PCR1": "match", "PCR2": "match"}
    assert only.principals == (ENCLAVE,) and only.actions == ("kms:Decrypt",)


def test_a_rollout_policy_shows_both_sets_and_reviews_clean_against_both_manifests() -> None:
    assert gets_key(ROLLOUT, CURRENT) and gets_key(ROLLOUT, NEXT)
    review = review_policy(ROLLOUT, manifest=[M_CURRENT, M_NEXT])
    assert review.findings == ()
    shown = sets(review)
    assert list(shown) == ["ReleaseToAttestedEnclave", "ReleaseToAttestedEnclave2"]
    assert [m.manifest for m in shown.values()] == [0, 1]
    assert all(set(m.pcrs.values()) == {"match"} for m in shown.values())
    grants = [g for g in review.grants if g.verdict == "attested-release"]
    assert len(grants) == 2 and all(g.manifest_pcrs is True for g in grants)


def test_a_rollout_policy_against_one_manifest_calls_the_other_set_a_mismatch() -> None:
    review = review_policy(ROLLOUT, manifest=M_CURRENT)
    (finding,) = review.findings
    assert (finding.rule_id, finding.statement) == ("NV-MANIFEST-MISMATCH", "ReleaseToAttestedEnclave2")
    assert "every image" in finding.message and not finding.proved  # the reviewed image is not denied
    assert sets(review)["ReleaseToAttestedEnclave2"].manifest is None


def test_a_manifest_that_no_set_accepts_is_a_proved_mismatch() -> None:
    other = PcrManifest(pcrs=image("unreviewed"))
    assert not gets_key(ROLLOUT, dict(other.pcrs))
    review = review_policy(ROLLOUT, manifest=[M_CURRENT, M_NEXT, other])
    (finding,) = review.findings
    assert (finding.rule_id, finding.statement, finding.proved) == (
        "NV-MANIFEST-MISMATCH", "manifest[2]", True
    )


def test_the_rollout_without_manifests_is_clean_and_shows_bound_pcrs() -> None:
    review = review_policy(ROLLOUT)
    assert review.findings == ()
    assert all(set(m.pcrs.values()) == {"bound"} and m.manifest is None for m in review.measurement_sets)


def test_sids_do_not_matter() -> None:
    doc = copy.deepcopy(ROLLOUT)
    for statement, sid in zip(doc["Statement"][2:4], ("Blue", "Green"), strict=True):
        statement["Sid"] = sid
    review = review_policy(doc, manifest=[M_CURRENT, M_NEXT])
    assert review.findings == () and list(sets(review)) == ["Blue", "Green"]
    del doc["Statement"][3]["Sid"]
    assert "statement[3]" in sets(review_policy(doc))


def test_the_sets_are_in_the_json_output() -> None:
    key = review_policy(ROLLOUT, key="k", manifest=[M_CURRENT, M_NEXT])
    doc = Review((key,), M_CURRENT, (M_CURRENT, M_NEXT)).as_dict()
    (shown,) = [k["measurement_sets"] for k in doc["keys"]]
    assert shown[1] == {
        "statement": "ReleaseToAttestedEnclave2", "principals": [ENCLAVE], "actions": ["kms:Decrypt"],
        "pcrs": {"PCR0": "match", "PCR1": "match", "PCR2": "match"}, "kind": "image", "manifest": 1,
        "problems": [],
    }
    assert NEXT[0].hex()[:16] not in str(doc)  # sets show what is bound, never the values


# -- the signer set ----------------------------------------------------------------------------------------

SIGNER = release_statement({3: ROLE, 8: CERT}, "ReleaseToSignedImages")


def test_a_signer_set_accepts_every_image_signed_with_the_certificate() -> None:
    doc = with_sets(SIGNER)
    newer = {**image("a build nobody reviewed yet"), 3: ROLE, 8: CERT}
    assert gets_key(doc, newer) and not gets_key(doc, {**newer, 8: hashlib.sha384(b"other cert").digest()})
    review = review_policy(doc)
    assert review.findings == ()  # no NV-BIND-NO-IMAGE, NV-BIND-MISSING-PCR or NV-SET-UNSIGNED
    signer = sets(review)["ReleaseToSignedImages"]
    assert (signer.kind, dict(signer.pcrs)) == ("signer", {"PCR3": "bound", "PCR8": "bound"})


def test_a_signer_set_matches_a_signed_manifest() -> None:
    signed = PcrManifest(pcrs={**CURRENT, 3: ROLE, 8: CERT})
    doc = copy.deepcopy(with_sets(SIGNER))
    # the image set of a signed image binds its PCR3 and PCR8 as well (what the builder writes)
    doc["Statement"][2] = release_statement({**CURRENT, 3: ROLE, 8: CERT}, "ReleaseToAttestedEnclave")
    review = review_policy(doc, manifest=signed)
    assert review.findings == ()
    assert [m.manifest for m in review.measurement_sets] == [0, 0]


def test_a_set_without_pcr0_or_a_signing_certificate_is_not_a_signer_set() -> None:
    # negative of the signer set: PCR3 alone identifies no image at all
    review = review_policy(with_sets(release_statement({3: ROLE}, "ParentRoleOnly")))
    assert "NV-BIND-NO-IMAGE" in rules(review)
    assert sets(review)["ParentRoleOnly"].kind == "unidentified"


# -- debug sets --------------------------------------------------------------------------------------------

ZERO = bytes(48)


def test_a_debug_set_is_flagged_and_proved() -> None:
    doc = with_sets(release_statement({i: ZERO for i in (0, 1, 2)}, "Debug"))
    assert gets_key(doc, {i: ZERO for i in (0, 1, 2, 8)})  # any debug-mode enclave gets the key
    review = review_policy(doc)
    finding = next(f for f in review.findings if f.rule_id == "NV-SET-DEBUG")
    assert (finding.category, finding.severity, finding.statement, finding.proved) == (
        "debug-pcr", "critical", "Debug", True
    )
    assert sets(review)["Debug"].problems == ("debug",)
    assert set(sets(review)["Debug"].pcrs.values()) == {"debug-zeros"}


def test_a_debug_set_that_a_deny_refuses_is_flagged_unproved() -> None:
    doc = with_sets(release_statement({i: ZERO for i in (0, 1, 2)}, "Debug"))
    doc["Statement"].append({
        "Sid": "NoDebug", "Effect": "Deny", "Principal": "*", "Action": "kms:Decrypt", "Resource": "*",
        "Condition": {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:PCR0": ZERO.hex()}},
    })
    assert not gets_key(doc, {i: ZERO for i in (0, 1, 2, 8)})
    finding = next(f for f in review_policy(doc).findings if f.rule_id == "NV-SET-DEBUG")
    assert not finding.proved


def test_a_single_zero_pcr_is_not_a_debug_set() -> None:
    # negative: one zero value among real ones matches no enclave; NV-PCR-DEBUG names the value
    doc = with_sets(release_statement({**NEXT, 1: ZERO}, "OneZero"))
    assert not gets_key(doc, {i: ZERO for i in (0, 1, 2, 8)})
    found = rules(review_policy(doc))
    assert "NV-PCR-DEBUG" in found and "NV-SET-DEBUG" not in found


# -- malformed sets ----------------------------------------------------------------------------------------

MALFORMED = {
    "not-96-hex": {**NEXT, 0: "0x" + NEXT[0].hex()},
    "too-short": {**NEXT, 2: NEXT[2].hex()[:64]},
    "several-values": {**NEXT, 1: [NEXT[1].hex(), CURRENT[1].hex()]},
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_set_is_flagged(case: str) -> None:
    review = review_policy(with_sets(release_statement(MALFORMED[case], "Next")))
    finding = next(f for f in review.findings if f.rule_id == "NV-SET-MALFORMED")
    assert (finding.category, finding.severity, finding.statement) == (
        "malformed-measurement-set", "high", "Next"
    )
    assert sets(review)["Next"].problems == ("malformed",)
    assert "0x" not in finding.message and NEXT[1].hex()[:16] not in finding.message


def test_several_values_per_pcr_let_sets_mix() -> None:
    # one statement listing both images' PCRs accepts PCR1 of one with PCR2 of the other
    mixed = release_statement({i: [CURRENT[i].hex(), NEXT[i].hex()] for i in (0, 1, 2)}, "Both")
    doc = {"Version": "2012-10-17", "Statement": [mixed]}
    assert gets_key(doc, {0: CURRENT[0], 1: NEXT[1], 2: CURRENT[2]})  # no reviewed image has these
    review = review_policy(doc)
    assert "NV-SET-MALFORMED" in rules(review)
    assert set(sets(review)["Both"].pcrs.values()) == {"several-values"}


@pytest.mark.parametrize("operator", ["StringLike", "StringEqualsIgnoreCaseIfExists", "StringNotEquals"])
def test_a_set_under_a_non_equality_operator_is_malformed(operator: str) -> None:
    # StringLike even without a wildcard: the set is not an equality on each PCR
    review = review_policy(with_sets(release_statement(NEXT, "Next", operator=operator)))
    assert "NV-SET-MALFORMED" in rules(review)
    assert set(sets(review)["Next"].pcrs.values()) == {"not-equality"}


def test_upper_case_values_are_malformed_only_under_case_sensitive_string_equals() -> None:
    upper = {i: v.hex().upper() for i, v in NEXT.items()}
    sensitive = review_policy(with_sets(release_statement(upper, "Next", operator="StringEquals")))
    assert "NV-SET-MALFORMED" in rules(sensitive)  # KMS writes PCRs in lower case: it never matches
    insensitive = review_policy(with_sets(release_statement(upper, "Next")))
    assert "NV-SET-MALFORMED" not in rules(insensitive)


def test_a_well_formed_set_under_string_equals_is_not_malformed() -> None:
    review = review_policy(with_sets(release_statement(NEXT, "Next", operator="StringEquals")))
    assert review.findings == ()


# -- unsigned sets -----------------------------------------------------------------------------------------


def test_a_set_binding_pcr8_to_zeros_is_an_unsigned_image() -> None:
    review = review_policy(with_sets(release_statement({**NEXT, 8: ZERO}, "Next")))
    (finding,) = review.findings
    assert (finding.rule_id, finding.category, finding.severity) == (
        "NV-SET-UNSIGNED", "unsigned-measurement-set", "medium"
    )
    assert sets(review)["Next"].pcrs["PCR8"] == "unsigned" and sets(review)["Next"].problems == ("unsigned",)


def test_a_set_binding_neither_pcr0_nor_pcr8_identifies_no_image() -> None:
    review = review_policy(with_sets(release_statement({1: NEXT[1], 2: NEXT[2]}, "KernelAndApp")))
    finding = next(f for f in review.findings if f.rule_id == "NV-SET-UNSIGNED")
    assert finding.severity == "high" and "nothing identifies the image" in finding.message
    assert RULES["NV-SET-UNSIGNED"].raised == "high"
    assert sets(review)["KernelAndApp"].kind == "unidentified"
    missing = next(f for f in review.findings if f.rule_id == "NV-BIND-MISSING-PCR")
    assert missing.category == "recommendation"


def test_an_unsigned_pcr8_without_pcr0_is_raised() -> None:
    review = review_policy(with_sets(release_statement({1: NEXT[1], 2: NEXT[2], 8: ZERO}, "Next")))
    finding = next(f for f in review.findings if f.rule_id == "NV-SET-UNSIGNED")
    assert finding.severity == "high"


def test_image_sets_without_pcr8_and_signer_sets_are_not_unsigned() -> None:
    for doc in (ROLLOUT, with_sets(SIGNER), with_sets(release_statement({**NEXT, 8: CERT}, "Signed"))):
        assert "NV-SET-UNSIGNED" not in rules(review_policy(doc))


# -- manifests -------------------------------------------------------------------------------------------


def test_each_debug_manifest_is_named() -> None:
    debug = PcrManifest(pcrs={i: ZERO for i in (0, 1, 2)})
    review = review_policy(ROLLOUT, manifest=[M_CURRENT, debug])
    debug_findings = [f for f in review.findings if f.rule_id == "NV-MANIFEST-DEBUG"]
    assert [f.statement for f in debug_findings] == ["manifest[1]"]
    single = review_policy(base(), manifest=debug)
    assert [f.statement for f in single.findings if f.rule_id == "NV-MANIFEST-DEBUG"] == ["manifest"]


def test_a_set_that_matches_no_manifest_is_compared_with_the_closest() -> None:
    edited = with_sets(release_statement({**NEXT, 2: hashlib.sha384(b"edited").digest()}, "Next"))
    review = review_policy(edited, manifest=[M_CURRENT, M_NEXT])
    shown = sets(review)["Next"]
    assert shown.manifest is None
    assert dict(shown.pcrs) == {"PCR0": "match", "PCR1": "match", "PCR2": "MISMATCH"}  # closest: M_NEXT
    assert ("NV-MANIFEST-MISMATCH", "Next") in {(f.rule_id, f.statement) for f in review.findings}
