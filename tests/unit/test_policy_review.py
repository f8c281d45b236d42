"""The policy reviewer: the model policy reviews clean; each rule is triggered by one minimal bad policy and
absent from a close good variant (every rule in RULES has both); escalation paths (CreateGrant, PutKeyPolicy
to non-administrators, wildcards covering them) are reported; AWS's documented Nitro Enclaves example
policies get the verdicts they deserve; claims are proved with the evaluator."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest

from nitrovault.errors import PolicyError
from nitrovault.policy.build import model_key_policy
from nitrovault.policy.manifest import PcrManifest
from nitrovault.policy.review import (
    CATEGORIES,
    RULES,
    SEVERITIES,
    KeyReview,
    Review,
    TemplateEnv,
    keys_from_template,
    reaching,
    render_intrinsics,
    review_policy,
    review_template,
)

ACCT = "111122223333"
ADMIN = f"arn:aws:iam::{ACCT}:role/admin"
SEALER = f"arn:aws:iam::{ACCT}:role/sealer"
ENCLAVE = f"arn:aws:iam::{ACCT}:role/enclave"
PCRS = {i: hashlib.sha384(f"image-pcr{i}".encode()).digest() for i in (0, 1, 2)}
MANIFEST = PcrManifest(pcrs=PCRS)
PCR8 = hashlib.sha384(b"signing-cert").digest()
CONTEXT = {"model": "m", "version": "1"}
CTX_COND = {f"kms:EncryptionContext:{k}": v for k, v in CONTEXT.items()}


def pcr_cond(pcrs: dict[int, bytes] | None = None) -> dict[str, str]:
    return {f"kms:RecipientAttestation:PCR{i}": v.hex() for i, v in (pcrs or PCRS).items()}


DENY = {
    "Sid": "DenyDecryptWithoutAttestation",
    "Effect": "Deny",
    "Principal": {"AWS": "*"},
    "Action": "kms:Decrypt",
    "Resource": "*",
    "Condition": {"Null": {"kms:RecipientAttestation:PCR0": "true"}},
}


def release(condition: dict[str, Any] | None = None, principal: Any = None, sid: str = "Release") -> dict:
    cond = (
        {"StringEquals": CTX_COND, "StringEqualsIgnoreCase": pcr_cond()} if condition is None else condition
    )
    stmt: dict[str, Any] = {
        "Sid": sid,
        "Effect": "Allow",
        "Principal": principal if principal is not None else {"AWS": ENCLAVE},
        "Action": "kms:Decrypt",
        "Resource": "*",
    }
    if cond:
        stmt["Condition"] = cond
    return stmt


def policy(*statements: dict[str, Any], deny: bool = True) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": [*statements, *([DENY] if deny else [])]}


def rules(review: KeyReview) -> set[str]:
    return {f.rule_id for f in review.findings}


def the_model_policy(pcrs: dict[int, bytes] = PCRS) -> dict[str, Any]:
    return model_key_policy(
        account_id=ACCT,
        admin_arns=[ADMIN],
        sealer_arns=[SEALER],
        enclave_role_arns=[ENCLAVE],
        pcrs=pcrs,
        encryption_context=CONTEXT,
    )


# -- the policy we deploy ---------------------------------------------------------------------------------


def test_model_key_policy_reviews_clean_with_matching_manifest() -> None:
    review = review_policy(the_model_policy(), key="model", manifest=MANIFEST)
    assert review.findings == ()
    verdicts = {(g.statement, g.principal, g.actions, g.verdict) for g in review.grants}
    assert ("ReleaseToAttestedEnclave", ENCLAVE, ("kms:Decrypt",), "attested-release") in verdicts
    assert ("SealModel", SEALER, ("kms:GenerateDataKey",), "plaintext-to-caller") in verdicts
    release_row = next(g for g in review.grants if g.verdict == "attested-release")
    # proved: only the manifest's image gets the key; no attestation or foreign PCRs do not
    assert (release_row.unattested, release_row.foreign_pcrs, release_row.manifest_pcrs) == (
        False,
        False,
        True,
    )
    assert dict(release_row.measurements) == {"PCR0": "match", "PCR1": "match", "PCR2": "match"}


def test_model_key_policy_with_optional_pcrs_reviews_clean() -> None:
    pcrs = {**PCRS, 3: hashlib.sha384(b"role").digest(), 8: hashlib.sha384(b"cert").digest()}
    review = review_policy(the_model_policy(pcrs), manifest=PcrManifest(pcrs=pcrs))
    assert review.findings == ()


def test_manifest_mismatch_is_found_and_proved() -> None:
    other = PcrManifest(pcrs={**PCRS, 2: hashlib.sha384(b"edited enclave code").digest()})
    review = review_policy(the_model_policy(), manifest=other)
    (finding,) = review.findings
    assert (finding.rule_id, finding.category, finding.statement) == (
        "NV-MANIFEST-MISMATCH",
        "manifest-mismatch",
        "ReleaseToAttestedEnclave",
    )
    assert finding.proved  # the evaluator denies the manifest's image
    row = next(g for g in review.grants if g.verdict == "attested-release")
    assert row.measurements["PCR2"] == "MISMATCH" and row.measurements["PCR0"] == "match"


def test_review_without_manifest_still_clean_and_reports_bound() -> None:
    review = review_policy(the_model_policy())
    assert review.findings == ()
    row = next(g for g in review.grants if g.verdict == "attested-release")
    assert set(row.measurements.values()) == {"bound"} and row.manifest_pcrs is None


def test_random_foreign_pcrs_give_the_same_verdicts() -> None:
    probe = {i: os.urandom(48) for i in (0, 1, 2, 3, 4, 8)}
    review = review_policy(the_model_policy(), manifest=MANIFEST, probe_pcrs=probe)
    assert review.findings == ()
    weak = policy(release({"StringEqualsIgnoreCase": {"kms:RecipientAttestation:PCR3": "ab" * 48}}))
    assert "NV-BIND-NO-IMAGE" in rules(review_policy(weak, probe_pcrs=probe))


# -- the AWS default key policy and the documented Nitro example ------------------------------------------


def test_aws_default_key_policy_is_critical() -> None:
    default = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Enable IAM User Permissions",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{ACCT}:root"},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }
    review = review_policy(default)
    root = [f for f in review.findings if f.rule_id == "NV-ROOT-DELEGATION"]
    assert root and root[0].severity == "critical" and root[0].proved
    assert root[0].principal == f"arn:aws:iam::{ACCT}:root"
    assert {"NV-ESCALATION", "NV-PLAINTEXT-UNATTESTED", "NV-NO-DENY"} <= rules(review)


def test_bare_account_id_is_root_delegation() -> None:
    bare = policy(release({}, principal={"AWS": ACCT}), deny=False)
    finding = next(f for f in review_policy(bare).findings if f.rule_id == "NV-ROOT-DELEGATION")
    assert finding.principal == f"arn:aws:iam::{ACCT}:root" and finding.severity == "critical"


def test_aws_documented_nitro_example_policy() -> None:
    # AWS KMS Developer Guide, ImageSha384 only:
    # https://docs.aws.amazon.com/kms/latest/developerguide/conditions-nitro-enclave.html
    example = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Enable enclave data processing",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{ACCT}:role/data-processing"},
                "Action": [
                    "kms:Decrypt",
                    "kms:DeriveSharedSecret",
                    "kms:GenerateDataKey",
                    "kms:GenerateDataKeyPair",
                    "kms:GenerateRandom",
                ],
                "Resource": "*",
                "Condition": {
                    "StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": PCRS[0].hex()}
                },
            }
        ],
    }
    review = review_policy(example, manifest=MANIFEST)
    assert rules(review) == {"NV-BIND-MISSING-PCR", "NV-NO-DENY"}
    assert {g.verdict for g in review.grants} == {"attested-release"}
    assert all(g.measurements == {"ImageSha384": "match"} for g in review.grants)
    assert not any(g.unattested or g.foreign_pcrs for g in review.grants)


# -- one minimal bad policy per finding kind, one close good variant --------------------------------------

GOOD = policy(release())

BAD: dict[str, dict[str, Any]] = {
    "NV-WILDCARD-PRINCIPAL": policy(release({}, principal="*")),
    "NV-KMS-STAR": policy(
        release(), {"Effect": "Allow", "Principal": {"AWS": SEALER}, "Action": "kms:*", "Resource": "*"}
    ),
    "NV-KMS-STAR-ADMIN": policy(
        release(),
        {"Effect": "Allow", "Principal": {"AWS": ADMIN}, "Action": ["kms:*"], "Resource": "*"},
        {
            "Effect": "Allow",
            "Principal": {"AWS": ADMIN},
            "Action": ["kms:PutKeyPolicy", "kms:ScheduleKeyDeletion"],
            "Resource": "*",
        },
    ),
    "NV-ADMIN-DECRYPT": policy(
        release(principal={"AWS": [ENCLAVE, ADMIN]}),
        {
            "Effect": "Allow",
            "Principal": {"AWS": ADMIN},
            "Action": ["kms:PutKeyPolicy", "kms:DisableKey", "kms:DescribeKey"],
            "Resource": "*",
        },
    ),
    "NV-PLAINTEXT-UNATTESTED": policy(release({"StringEquals": CTX_COND}), deny=False),
    "NV-ANY-ENCLAVE": policy(release({"StringEquals": CTX_COND})),
    "NV-ATT-IFEXISTS": policy(release({"StringEqualsIgnoreCaseIfExists": pcr_cond()}), deny=False),
    "NV-ATT-BYPASS": policy(release({"StringEqualsIgnoreCaseIfExists": pcr_cond()}), deny=False),
    "NV-ATT-SETOP": policy(release({"ForAnyValue:StringEqualsIgnoreCase": pcr_cond()})),
    "NV-ATT-NEGATED": policy(
        release(
            {
                "StringEqualsIgnoreCase": pcr_cond({1: PCRS[1], 2: PCRS[2]}),
                "StringNotEquals": {"kms:RecipientAttestation:PCR0": "ab" * 48},
            }
        )
    ),
    "NV-ATT-PATTERN": policy(
        release(
            {
                "StringEqualsIgnoreCase": pcr_cond({1: PCRS[1], 2: PCRS[2]}),
                "StringLike": {"kms:RecipientAttestation:PCR0": PCRS[0].hex()[:10] + "*"},
            }
        )
    ),
    "NV-ATT-OPERATOR": policy(
        release(
            {
                "StringEqualsIgnoreCase": pcr_cond(),
                "NumericGreaterThan": {"kms:RecipientAttestation:PCR4": "0"},
            }
        )
    ),
    "NV-ATT-NULL-ONLY": policy(release({"Null": {"kms:RecipientAttestation:PCR0": "false"}})),
    "NV-PCR-MALFORMED": policy(
        release(
            {"StringEqualsIgnoreCase": {**pcr_cond(), "kms:RecipientAttestation:PCR0": "0x" + PCRS[0].hex()}}
        )
    ),
    "NV-PCR-DEBUG": policy(
        release({"StringEqualsIgnoreCase": {**pcr_cond(), "kms:RecipientAttestation:PCR0": "00" * 48}})
    ),
    "NV-MANIFEST-EXTRA": policy(
        release({"StringEqualsIgnoreCase": {**pcr_cond(), "kms:RecipientAttestation:PCR8": "cd" * 48}})
    ),
    "NV-BIND-MISSING-PCR": policy(release({"StringEqualsIgnoreCase": pcr_cond({0: PCRS[0]})})),
    "NV-BIND-NO-IMAGE": policy(
        release({"StringEqualsIgnoreCase": {"kms:RecipientAttestation:PCR3": "ab" * 48}})
    ),
    "NV-DATAKEY-UNCONSTRAINED": policy(
        release(),
        {
            "Sid": "Seal",
            "Effect": "Allow",
            "Principal": {"AWS": SEALER},
            "Action": "kms:GenerateDataKey",
            "Resource": "*",
        },
    ),
    "NV-NOTACTION": policy(
        release(),
        {
            "Effect": "Allow",
            "Principal": {"AWS": ENCLAVE},
            "NotAction": ["kms:Encrypt", "kms:Create*", "kms:Put*"],
            "Resource": "*",
            "Condition": {"StringEqualsIgnoreCase": pcr_cond()},
        },
    ),
    "NV-NOTPRINCIPAL": policy({**release(), "Principal": None, "NotPrincipal": {"AWS": ADMIN}}),
    "NV-ESCALATION": policy(
        release(),
        {"Effect": "Allow", "Principal": {"AWS": SEALER}, "Action": "kms:CreateGrant", "Resource": "*"},
    ),
    "NV-NO-DENY": policy(release(), deny=False),
    "NV-ROOT-DELEGATION": policy(release(principal={"AWS": f"arn:aws:iam::{ACCT}:root"})),
    "NV-WILDCARD-ATTESTED": policy(release(principal="*")),  # pinned to the image, but anyone runs it
    "NV-SET-DEBUG": policy(release({"StringEqualsIgnoreCase": pcr_cond({i: bytes(48) for i in PCRS})})),
    "NV-SET-MALFORMED": policy(
        release({"StringEqualsIgnoreCase": {**pcr_cond(), "kms:RecipientAttestation:PCR1": [PCRS[1].hex(),
                                                                                             "ab" * 48]}})
    ),
    "NV-SET-UNSIGNED": policy(
        release({"StringEqualsIgnoreCase": {**pcr_cond(), "kms:RecipientAttestation:PCR8": "00" * 48}})
    ),
}
BAD["NV-NOTPRINCIPAL"]["Statement"][0].pop("Principal")

#: one close good variant per kind: the same statement written safely (the rule must NOT fire)
CLOSE: dict[str, dict[str, Any]] = {
    # "*" with attestation conditions: not this rule (it is NV-WILDCARD-ATTESTED's)
    "NV-WILDCARD-PRINCIPAL": policy(release(principal="*")),
    # "*" whose aws:PrincipalArn condition pins the caller to the enclave role: no other identity qualifies
    "NV-WILDCARD-ATTESTED": policy(
        release(
            {"StringEquals": {**CTX_COND, "aws:PrincipalArn": ENCLAVE}, "StringEqualsIgnoreCase": pcr_cond()},
            principal="*",
        )
    ),
    "NV-SET-DEBUG": GOOD,
    "NV-SET-MALFORMED": GOOD,  # one value per PCR, StringEqualsIgnoreCase, 96 hex digits each
    "NV-SET-UNSIGNED": policy(  # the same set, bound to a signing certificate's PCR8
        release({"StringEqualsIgnoreCase": {**pcr_cond(), "kms:RecipientAttestation:PCR8": PCR8.hex()}})
    ),
    "NV-KMS-STAR": policy(
        release(),
        {"Effect": "Allow", "Principal": {"AWS": SEALER}, "Action": "kms:Describe*", "Resource": "*"},
    ),
    "NV-ADMIN-DECRYPT": the_model_policy(),
    "NV-ATT-IFEXISTS": GOOD,
    "NV-ATT-PATTERN": policy(
        release(
            {
                "StringEqualsIgnoreCase": pcr_cond({1: PCRS[1], 2: PCRS[2]}),
                "StringLike": {"kms:RecipientAttestation:PCR0": PCRS[0].hex()},
            }
        )
    ),
    "NV-PCR-MALFORMED": policy(
        release({"StringEqualsIgnoreCase": {**pcr_cond(), "kms:RecipientAttestation:PCR0": PCRS[0].hex()}})
    ),
    "NV-DATAKEY-UNCONSTRAINED": policy(
        release(),
        {
            "Sid": "Seal",
            "Effect": "Allow",
            "Principal": {"AWS": SEALER},
            "Action": "kms:GenerateDataKey",
            "Resource": "*",
            "Condition": {"StringEquals": CTX_COND},
        },
    ),
    "NV-ESCALATION": the_model_policy(),  # PutKeyPolicy for administrators is the break-glass path
    "NV-NO-DENY": GOOD,
    "NV-KMS-STAR-ADMIN": policy(
        release(),
        {"Effect": "Allow", "Principal": {"AWS": ADMIN}, "Action": ["kms:Describe*"], "Resource": "*"},
        {
            "Effect": "Allow",
            "Principal": {"AWS": ADMIN},
            "Action": ["kms:PutKeyPolicy", "kms:ScheduleKeyDeletion"],
            "Resource": "*",
        },
    ),
    "NV-PLAINTEXT-UNATTESTED": policy(release(), deny=False),  # same, with the attestation conditions
    "NV-ANY-ENCLAVE": GOOD,
    # IfExists is still wrong (NV-ATT-IFEXISTS), but the explicit Deny stops the no-document bypass
    "NV-ATT-BYPASS": policy(release({"StringEqualsIgnoreCaseIfExists": pcr_cond()}), deny=True),
    "NV-ATT-SETOP": policy(release({"StringEqualsIgnoreCase": pcr_cond()})),
    "NV-ATT-NEGATED": policy(
        release(
            {
                "StringEqualsIgnoreCase": pcr_cond({1: PCRS[1], 2: PCRS[2]}),
                "StringEquals": {"kms:RecipientAttestation:PCR0": PCRS[0].hex()},
            }
        )
    ),
    "NV-ATT-OPERATOR": policy(
        release({"StringEqualsIgnoreCase": {**pcr_cond(), "kms:RecipientAttestation:PCR4": "ab" * 48}})
    ),
    "NV-ATT-NULL-ONLY": policy(
        release({"Null": {"kms:RecipientAttestation:PCR0": "false"}, "StringEqualsIgnoreCase": pcr_cond()})
    ),
    "NV-PCR-DEBUG": GOOD,
    "NV-MANIFEST-EXTRA": BAD["NV-MANIFEST-EXTRA"],  # with a manifest that has that PCR8 (CLOSE_MANIFEST)
    "NV-BIND-MISSING-PCR": GOOD,
    "NV-BIND-NO-IMAGE": policy(
        release({"StringEqualsIgnoreCase": {**pcr_cond(), "kms:RecipientAttestation:PCR3": "ab" * 48}})
    ),
    "NV-NOTACTION": policy(
        release(),
        {
            "Effect": "Allow",
            "Principal": {"AWS": ENCLAVE},
            "Action": ["kms:Encrypt", "kms:DescribeKey"],
            "Resource": "*",
            "Condition": {"StringEqualsIgnoreCase": pcr_cond()},
        },
    ),
    "NV-NOTPRINCIPAL": GOOD,  # the same statement with a Principal
    "NV-ROOT-DELEGATION": GOOD,  # the same statement naming the enclave role, not the account
    "NV-MANIFEST-DEBUG": GOOD,  # with the real manifest
    "NV-MANIFEST-MISMATCH": the_model_policy(),  # with the matching manifest
    "NV-MANIFEST-UNBOUND": policy(
        release({"StringEqualsIgnoreCase": {**pcr_cond(), "kms:RecipientAttestation:PCR8": PCR8.hex()}})
    ),
}
BAD.update(
    {
        "NV-MANIFEST-DEBUG": GOOD,
        "NV-MANIFEST-MISMATCH": the_model_policy(),
        "NV-MANIFEST-UNBOUND": GOOD,
    }
)
#: the manifest a BAD/CLOSE case is reviewed with, when not MANIFEST
BAD_MANIFEST: dict[str, PcrManifest] = {
    "NV-MANIFEST-DEBUG": PcrManifest(pcrs={0: bytes(48), 1: bytes(48), 2: bytes(48)}),
    "NV-MANIFEST-MISMATCH": PcrManifest(pcrs={**PCRS, 2: hashlib.sha384(b"edited enclave code").digest()}),
    "NV-MANIFEST-UNBOUND": PcrManifest(pcrs={**PCRS, 8: PCR8}),
}
CLOSE_MANIFEST: dict[str, PcrManifest] = {
    "NV-MANIFEST-EXTRA": PcrManifest(pcrs={**PCRS, 8: bytes.fromhex("cd" * 48)}),
    "NV-MANIFEST-UNBOUND": PcrManifest(pcrs={**PCRS, 8: PCR8}),
}


def test_every_rule_has_a_bad_policy_and_a_close_good_variant() -> None:
    assert set(BAD) == set(RULES) == set(CLOSE)
    assert CATEGORIES == (
        "plaintext-without-attestation", "root-delegation", "wildcard-principal", "escalation",
        "weak-binding", "context-unconstrained", "debug-pcr", "pcr-malformed", "pcr-pattern-match",
        "manifest-mismatch", "malformed-measurement-set", "unsigned-measurement-set", "set-operator-misuse",
        "negated-element", "recommendation",
    )  # the reviewer's fixed finding vocabulary, verbatim (docs/review.md, "Categories")
    assert {r.category for r in RULES.values()} <= set(CATEGORIES)


@pytest.mark.parametrize("rule_id", sorted(BAD))
def test_each_rule_fires_on_its_minimal_bad_policy(rule_id: str) -> None:
    review = review_policy(BAD[rule_id], manifest=BAD_MANIFEST.get(rule_id, MANIFEST))
    assert rule_id in rules(review), [f.rule_id for f in review.findings]
    assert all(f.category == RULES[f.rule_id].category for f in review.findings)
    assert all(f.severity in SEVERITIES for f in review.findings)


def test_every_finding_has_its_rules_severity_or_its_raised_one() -> None:
    for rule_id, bad in BAD.items():
        for f in review_policy(bad, manifest=BAD_MANIFEST.get(rule_id, MANIFEST)).findings:
            rule = RULES[f.rule_id]
            assert f.severity in (rule.severity, rule.raised), (f.rule_id, f.severity)
    assert all(bool(r.raised) == bool(r.raised_when) for r in RULES.values())


@pytest.mark.parametrize("rule_id", sorted(CLOSE))
def test_each_rule_stays_silent_on_its_close_good_variant(rule_id: str) -> None:
    review = review_policy(CLOSE[rule_id], manifest=CLOSE_MANIFEST.get(rule_id, MANIFEST))
    assert rule_id not in rules(review), [f.rule_id for f in review.findings]


def test_good_release_policy_is_clean() -> None:
    assert review_policy(GOOD, manifest=MANIFEST).findings == ()


def test_unattested_decrypt_is_proved_and_deny_turns_it_into_any_enclave() -> None:
    no_deny = review_policy(BAD["NV-PLAINTEXT-UNATTESTED"])
    finding = next(f for f in no_deny.findings if f.rule_id == "NV-PLAINTEXT-UNATTESTED")
    assert finding.proved and finding.principal == ENCLAVE and finding.severity == "high"
    with_deny = review_policy(BAD["NV-ANY-ENCLAVE"])
    assert "NV-PLAINTEXT-UNATTESTED" not in rules(with_deny)
    row = next(g for g in with_deny.grants if g.statement == "Release")
    assert (row.unattested, row.foreign_pcrs) == (False, True)


def test_unattested_statement_guarded_by_an_unmodelled_key_is_proved_for_the_value_it_pins() -> None:
    # (this used to be reported unproved: the probe lacked aws:SourceVpc. A request from that VPC -- the
    # parent instance itself -- is one a caller can make, so the witness now carries the pinned value.)
    vpc = policy(release({"StringEquals": {"aws:SourceVpc": "vpc-1234"}}), deny=False)
    finding = next(f for f in review_policy(vpc).findings if f.rule_id == "NV-PLAINTEXT-UNATTESTED")
    assert finding.proved and finding.severity == "high" and "aws:sourcevpc" in finding.message
    assert "vpc-1234" not in finding.message


def test_unattested_statement_guarded_by_an_unmodelled_pattern_is_reported_unproved() -> None:
    # a pattern pins no value: the reviewer cannot build the request, nor rule it out
    vpc = policy(release({"StringLike": {"aws:SourceVpc": "vpc-*"}}), deny=False)
    finding = next(f for f in review_policy(vpc).findings if f.rule_id == "NV-PLAINTEXT-UNATTESTED")
    assert not finding.proved and finding.severity == "high" and "aws:SourceVpc" in finding.message


def test_null_only_and_ifexists_are_proved_bypasses() -> None:
    null_only = review_policy(BAD["NV-ATT-NULL-ONLY"])
    assert next(f for f in null_only.findings if f.rule_id == "NV-ANY-ENCLAVE").proved
    if_exists = review_policy(BAD["NV-ATT-IFEXISTS"])
    bypass = next(f for f in if_exists.findings if f.rule_id == "NV-ATT-BYPASS")
    assert bypass.proved and bypass.severity == "critical"


def test_debug_manifest_is_a_critical_finding() -> None:
    debug = PcrManifest(pcrs={0: bytes(48), 1: bytes(48), 2: bytes(48)})
    finding = next(
        f for f in review_policy(GOOD, manifest=debug).findings if f.rule_id == "NV-MANIFEST-DEBUG"
    )
    assert finding.severity == "critical" and finding.category == "debug-pcr"


def test_manifest_pcr8_unbound_is_a_recommendation() -> None:
    signed = PcrManifest(pcrs={**PCRS, 8: hashlib.sha384(b"cert").digest()})
    (finding,) = review_policy(GOOD, manifest=signed).findings
    assert (finding.rule_id, finding.category, finding.severity) == (
        "NV-MANIFEST-UNBOUND", "recommendation", "low"
    )


def test_pcr_values_never_appear_in_findings() -> None:
    for bad in BAD.values():
        for finding in review_policy(bad, manifest=MANIFEST).findings:
            assert PCRS[0].hex()[:16] not in finding.message


def test_malformed_policy_raises_policy_error() -> None:
    with pytest.raises(PolicyError):
        review_policy({"Statement": [{"Effect": "Maybe"}]})


# -- CloudFormation ---------------------------------------------------------------------------------------

TEMPLATE: dict[str, Any] = {
    "Resources": {
        "EnclaveRole": {"Type": "AWS::IAM::Role", "Properties": {}},
        "ModelKey": {
            "Type": "AWS::KMS::Key",
            "Properties": {
                "KeyPolicy": {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Action": "kms:*",
                            "Resource": "*",
                            "Principal": {
                                "AWS": {
                                    "Fn::Join": [
                                        "",
                                        [
                                            "arn:",
                                            {"Ref": "AWS::Partition"},
                                            ":iam::",
                                            {"Ref": "AWS::AccountId"},
                                            ":root",
                                        ],
                                    ]
                                }
                            },
                        },
                        {**release(), "Principal": {"AWS": {"Fn::GetAtt": ["EnclaveRole", "Arn"]}}},
                    ],
                }
            },
        },
        "DefaultKey": {"Type": "AWS::KMS::Key", "Properties": {"Description": "no policy"}},
        "Bucket": {"Type": "AWS::S3::Bucket"},
    }
}


def test_intrinsics_render_readably() -> None:
    env = TemplateEnv(TEMPLATE["Resources"], {"Stage": {"Default": "prod"}}, None, None)
    assert render_intrinsics({"Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:role/x"}, env) == (
        "arn:aws:iam::<AccountId>:role/x"
    )
    assert (
        render_intrinsics({"Fn::Sub": ["${A}-${Stage}", {"A": {"Ref": "AWS::Region"}}]}, env)
        == "<Region>-prod"
    )
    assert (
        render_intrinsics({"Fn::GetAtt": "EnclaveRole.Arn"}, env)
        == "arn:aws:iam::<AccountId>:role/EnclaveRole"
    )
    assert render_intrinsics({"Fn::GetAtt": ["Bucket", "Arn"]}, env) == "<Bucket.Arn>"
    assert render_intrinsics({"Ref": "Bucket"}, env) == "<Bucket>"
    assert render_intrinsics({"Fn::ImportValue": "x"}, env) == "<ImportValue:x>"
    resolved = TemplateEnv({}, {}, ACCT, "eu-west-1")
    assert render_intrinsics({"Fn::Sub": "${AWS::AccountId}/${AWS::Region}"}, resolved) == f"{ACCT}/eu-west-1"


def test_template_keys_are_all_reviewed() -> None:
    keys = keys_from_template(TEMPLATE)
    assert [name for name, _ in keys] == ["ModelKey", "DefaultKey"]
    reviews = review_template(TEMPLATE, source="stack.template.json", manifest=MANIFEST)
    model, default = reviews
    assert model.key == "stack.template.json/ModelKey"
    root = next(f for f in model.findings if f.rule_id == "NV-ROOT-DELEGATION")
    assert root.principal == "arn:aws:iam::<AccountId>:root" and root.severity == "critical"
    release_row = next(g for g in model.grants if g.statement == "Release")
    assert release_row.principal == "arn:aws:iam::<AccountId>:role/EnclaveRole"
    assert release_row.manifest_pcrs is True
    # a key without KeyPolicy gets KMS's default policy: root kms:*
    assert "NV-ROOT-DELEGATION" in rules(default)


def test_template_account_is_resolved_when_known() -> None:
    (model, _) = review_template(TEMPLATE, manifest=MANIFEST, account=ACCT)
    root = next(f for f in model.findings if f.rule_id == "NV-ROOT-DELEGATION")
    assert root.principal == f"arn:aws:iam::{ACCT}:root"


# -- escalation: CreateGrant, PutKeyPolicy to non-administrators, wildcards covering them ---------------

ADMIN_STATEMENT = {
    "Sid": "KeyAdministration",
    "Effect": "Allow",
    "Principal": {"AWS": ADMIN},
    "Action": ["kms:DescribeKey", "kms:DisableKey", "kms:ScheduleKeyDeletion", "kms:PutKeyPolicy"],
    "Resource": "*",
}


def _to(principal: str, actions: Any, sid: str = "Extra", **extra: Any) -> dict[str, Any]:
    """An Allow statement for ``principal``; ``actions=None`` leaves Action out (pass NotAction=...)."""
    stmt = {"Sid": sid, "Effect": "Allow", "Principal": {"AWS": principal}, "Resource": "*", **extra}
    if actions is not None:
        stmt["Action"] = actions
    return stmt


ESCALATES: dict[str, dict[str, Any]] = {
    "create-grant": policy(release(), ADMIN_STATEMENT, _to(SEALER, "kms:CreateGrant")),
    "put-key-policy-to-sealer": policy(release(), ADMIN_STATEMENT, _to(SEALER, "kms:PutKeyPolicy")),
    "put-wildcard": policy(release(), ADMIN_STATEMENT, _to(SEALER, "kms:Put*")),
    "create-wildcard": policy(release(), ADMIN_STATEMENT, _to(SEALER, ["kms:Create*"])),
    "question-mark-wildcard": policy(release(), ADMIN_STATEMENT, _to(SEALER, "kms:CreateGran?")),
    "not-action": policy(release(), ADMIN_STATEMENT, _to(SEALER, None, NotAction=["kms:Decrypt*"])),
    # an "administrator" that also uses the key is not break-glass: it can rewrite its own conditions
    "admin-who-is-a-user": policy(
        release(principal={"AWS": [ENCLAVE, ADMIN]}), ADMIN_STATEMENT,
    ),
    # PutKeyPolicy inside the release statement: the enclave role may drop its own PCR conditions
    "put-in-release": policy({**release(), "Action": ["kms:Decrypt", "kms:PutKeyPolicy"]}, ADMIN_STATEMENT),
    "grant-to-everyone": policy(release(), ADMIN_STATEMENT, {**_to(SEALER, "kms:CreateGrant"),
                                                             "Principal": "*"}),
}
STAYS_QUIET: dict[str, dict[str, Any]] = {
    "admins-put-key-policy-is-break-glass": policy(release(), ADMIN_STATEMENT),
    "sealer-describe-wildcard": policy(release(), ADMIN_STATEMENT, _to(SEALER, "kms:Describe*")),
    "sealer-list-grants": policy(release(), ADMIN_STATEMENT, _to(SEALER, ["kms:ListGrants", "kms:Get*"])),
    "revoke-grant": policy(release(), ADMIN_STATEMENT, _to(ADMIN, "kms:RevokeGrant")),
}


@pytest.mark.parametrize("case", sorted(ESCALATES))
def test_escalation_is_reported(case: str) -> None:
    review = review_policy(ESCALATES[case], manifest=MANIFEST)
    findings = [f for f in review.findings if f.rule_id == "NV-ESCALATION"]
    assert findings, case
    assert all(f.category == "escalation" and f.severity in ("high", "critical") for f in findings)
    if case == "grant-to-everyone":
        assert {f.severity for f in findings} == {"critical"}


@pytest.mark.parametrize("case", sorted(STAYS_QUIET))
def test_no_escalation_for_close_variants(case: str) -> None:
    review = review_policy(STAYS_QUIET[case], manifest=MANIFEST)
    assert not {"NV-ESCALATION", "NV-KMS-STAR", "NV-KMS-STAR-ADMIN"} & rules(review)


def test_escalation_names_the_action_and_principal() -> None:
    review = review_policy(ESCALATES["put-key-policy-to-sealer"], manifest=MANIFEST)
    (finding,) = [f for f in review.findings if f.rule_id == "NV-ESCALATION"]
    assert finding.principal == SEALER and "kms:PutKeyPolicy" in finding.message
    assert finding.statement == "Extra"


# -- AWS's documented example policies for Nitro Enclaves and the console defaults ------------------------
# https://docs.aws.amazon.com/kms/latest/developerguide/conditions-nitro-enclave.html


def test_aws_archived_example_with_0x_values_is_pcr_malformed() -> None:
    # The archived KMS developer guide example writes the PCRs with a stray "0x" prefix: such a value
    # never equals a real (plain lower-case hex) PCR, so the statement releases to nobody, silently.
    archived = policy(
        release({"StringEqualsIgnoreCase": {f"kms:RecipientAttestation:PCR{i}": "0x" + v.hex()
                                            for i, v in PCRS.items()}}),
    )
    review = review_policy(archived, manifest=MANIFEST)
    assert "NV-PCR-MALFORMED" in rules(review)
    assert next(g for g in review.grants if g.statement == "Release").manifest_pcrs is False
    close = policy(release({"StringEqualsIgnoreCase": pcr_cond()}))
    assert "NV-PCR-MALFORMED" not in rules(review_policy(close, manifest=MANIFEST))


def test_aws_nitro_user_guide_full_example() -> None:
    # Nitro Enclaves User Guide, "KMS key preparation": StringEqualsIgnoreCase on ImageSha384, PCR0, PCR1,
    # PCR2, PCR3, PCR4 and PCR8 (values here are the manifest's: AWS's are placeholders).
    pcrs = {**PCRS, 3: hashlib.sha384(b"role").digest(), 4: hashlib.sha384(b"instance").digest(), 8: PCR8}
    condition = {f"kms:RecipientAttestation:PCR{i}": v.hex() for i, v in pcrs.items()}
    condition["kms:RecipientAttestation:ImageSha384"] = pcrs[0].hex()
    example = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Enable enclave data processing",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{ACCT}:role/data-processing"},
                "Action": "kms:Decrypt",
                "Resource": "*",
                "Condition": {"StringEqualsIgnoreCase": condition},
            }
        ],
    }
    review = review_policy(example, manifest=PcrManifest(pcrs=pcrs))
    assert rules(review) == {"NV-NO-DENY"}  # fully bound; only the defence-in-depth Deny is missing
    (row,) = review.grants
    assert (row.verdict, row.unattested, row.foreign_pcrs, row.manifest_pcrs) == (
        "attested-release", False, False, True,
    )
    # the same example checked against another image's manifest: a proved mismatch
    other = PcrManifest(pcrs={**pcrs, 1: hashlib.sha384(b"other kernel").digest()})
    mismatch = review_policy(example, manifest=other)
    assert "NV-MANIFEST-MISMATCH" in rules(mismatch)
    assert next(f for f in mismatch.findings if f.rule_id == "NV-MANIFEST-MISMATCH").proved


def test_aws_sdk_example_imagesha384_and_pcr3() -> None:
    # aws-nitro-enclaves-sdk-c docs/kms-apis: ImageSha384 (= PCR0) plus PCR3 (the parent's IAM role)
    example = policy(
        release(
            {
                "StringEqualsIgnoreCase": {
                    "kms:RecipientAttestation:ImageSha384": PCRS[0].hex(),
                    "kms:RecipientAttestation:PCR3": hashlib.sha384(b"role").digest().hex(),
                }
            }
        ),
        deny=False,
    )
    found = rules(review_policy(example, manifest=MANIFEST))
    assert "NV-BIND-MISSING-PCR" in found and "NV-BIND-NO-IMAGE" not in found
    assert not {"NV-ANY-ENCLAVE", "NV-PLAINTEXT-UNATTESTED", "NV-ATT-BYPASS"} & found


def test_aws_console_default_policy_with_key_users_and_administrators() -> None:
    # The policy the KMS console writes when you pick administrators and users: administrators get
    # kms:Create* (which covers CreateGrant) and kms:Put*; users get Decrypt with no condition.
    console = {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "Enable IAM User Permissions", "Effect": "Allow",
             "Principal": {"AWS": f"arn:aws:iam::{ACCT}:root"}, "Action": "kms:*", "Resource": "*"},
            {"Sid": "Allow access for Key Administrators", "Effect": "Allow", "Principal": {"AWS": ADMIN},
             "Action": ["kms:Create*", "kms:Describe*", "kms:Enable*", "kms:List*", "kms:Put*", "kms:Update*",
                        "kms:Revoke*", "kms:Disable*", "kms:Get*", "kms:Delete*", "kms:TagResource",
                        "kms:UntagResource", "kms:ScheduleKeyDeletion", "kms:CancelKeyDeletion"],
             "Resource": "*"},
            {"Sid": "Allow use of the key", "Effect": "Allow", "Principal": {"AWS": ENCLAVE},
             "Action": ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*",
                        "kms:DescribeKey"], "Resource": "*"},
            {"Sid": "Allow attachment of persistent resources", "Effect": "Allow",
             "Principal": {"AWS": ENCLAVE},
             "Action": ["kms:CreateGrant", "kms:ListGrants", "kms:RevokeGrant"],
             "Resource": "*", "Condition": {"Bool": {"kms:GrantIsForAWSResource": "true"}}},
        ],
    }
    review = review_policy(console, manifest=MANIFEST)
    by_statement = {(f.rule_id, f.statement) for f in review.findings}
    assert ("NV-ROOT-DELEGATION", "Enable IAM User Permissions") in by_statement
    assert ("NV-ESCALATION", "Allow access for Key Administrators") in by_statement  # Create* -> grants
    assert ("NV-ESCALATION", "Allow attachment of persistent resources") in by_statement
    assert ("NV-PLAINTEXT-UNATTESTED", "Allow use of the key") in by_statement
    admin_escalations = [
        f for f in review.findings
        if f.rule_id == "NV-ESCALATION" and f.statement == "Allow access for Key Administrators"
    ]
    (admin_escalation,) = admin_escalations
    assert "kms:CreateGrant" in admin_escalation.message
    assert "PutKeyPolicy" not in admin_escalation.message  # Put* for an administrator is break-glass


# -- severities and the output shape ----------------------------------------------------------------------


def test_severity_order_and_reaching() -> None:
    assert SEVERITIES == ("low", "medium", "high", "critical")
    review = review_policy(BAD["NV-MANIFEST-UNBOUND"], manifest=BAD_MANIFEST["NV-MANIFEST-UNBOUND"])
    (unbound,) = review.findings
    assert unbound.severity == "low"
    assert reaching(review.findings, "low") == (unbound,)
    assert reaching(review.findings, "medium") == ()
    default = review_policy(
        {"Statement": [_to(f"arn:aws:iam::{ACCT}:root", "kms:*", sid="Enable IAM User Permissions")]}
    )
    assert {f.severity for f in reaching(default.findings, "critical")} == {"critical"}
    assert len(reaching(default.findings, "high")) > len(reaching(default.findings, "critical"))
    with pytest.raises(ValueError, match="unknown severity"):
        reaching(default.findings, "severe")


def test_review_json_shape_is_exactly_keys_and_findings() -> None:
    key = review_policy(BAD["NV-ROOT-DELEGATION"], key="k", manifest=MANIFEST)
    doc = Review((key,), MANIFEST).as_dict()
    assert set(doc) == {"keys", "findings"}
    assert {"rule_id", "severity", "key", "statement", "message", "category"} <= set(doc["findings"][0])
    assert doc["keys"][0]["key"] == "k"
