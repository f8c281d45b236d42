"""The at-rest key-policy builders (weights store, log groups, alarm topic) and how the reviewer judges
them: each policy names no account root, gives administrators management without use, refuses bad input
with PolicyError, and -- proved with the evaluator -- lets its users in only through their service. The
reviewer passes them with zero findings (``service-mediated`` rows, no Deny asked of an at-rest key), and
each narrowing of that rule has a negative control: weaken any condition, or add attestation (a model
key), and the old findings come back."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from nitrovault.errors import PolicyError
from nitrovault.policy import RequestContext, build_request_context, evaluate_key_policy
from nitrovault.policy.build import (
    ADMIN_ACTIONS,
    alarm_topic_key_policy,
    logs_key_policy,
    model_key_policy,
    store_key_policy,
)
from nitrovault.policy.review import KeyReview, review_policy

ACCT = "111122223333"
REGION = "eu-west-1"
ADMIN = f"arn:aws:iam::{ACCT}:role/admin"
SEALER = f"arn:aws:iam::{ACCT}:role/sealer"
HOST = f"arn:aws:iam::{ACCT}:role/host"
BUCKET = "nv-weights"
BUCKET_ARN = f"arn:aws:s3:::{BUCKET}"
VIA_S3 = f"s3.{REGION}.amazonaws.com"
KEY_ARN = f"arn:aws:kms:{REGION}:{ACCT}:key/k"
LOGS = f"logs.{REGION}.amazonaws.com"


def store(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        account_id=ACCT,
        region=REGION,
        admin_arns=[ADMIN],
        writer_arns=[SEALER],
        reader_arns=[HOST],
        bucket_name=BUCKET,
    )
    args.update(overrides)
    return store_key_policy(**args)


def logs(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(account_id=ACCT, region=REGION, admin_arns=[ADMIN])
    args.update(overrides)
    return logs_key_policy(**args)


def rules(review: KeyReview) -> set[str]:
    return {f.rule_id for f in review.findings}


def decide(
    policy: dict[str, Any], action: str, who: str, ctx: dict[str, str], via: str | None = VIA_S3
) -> Any:
    extra = {"kms:ViaService": via} if via else {}
    return evaluate_key_policy(policy, build_request_context(action, who, KEY_ARN, ctx, extra_context=extra))


# -- the builders ----------------------------------------------------------------------------------------


def test_store_policy_statements_and_conditions() -> None:
    policy = store()
    assert policy["Id"] == "nitrovault-store-key"
    admin, write, read, deny = policy["Statement"]
    assert admin == {
        "Sid": "KeyAdministration",
        "Effect": "Allow",
        "Principal": {"AWS": [ADMIN]},
        "Action": list(ADMIN_ACTIONS),
        "Resource": "*",
    }
    through_s3 = {
        "StringEquals": {"kms:ViaService": VIA_S3, "kms:CallerAccount": ACCT},
        "ArnLike": {"kms:EncryptionContext:aws:s3:arn": [BUCKET_ARN, f"{BUCKET_ARN}/*"]},
    }
    assert (write["Sid"], write["Principal"], write["Action"], write["Condition"]) == (
        "WriteThroughS3",
        {"AWS": [SEALER]},
        ["kms:GenerateDataKey", "kms:Decrypt"],
        through_s3,
    )
    assert (read["Sid"], read["Principal"], read["Action"], read["Condition"]) == (
        "ReadThroughS3",
        {"AWS": [HOST]},
        ["kms:Decrypt"],
        through_s3,
    )
    assert (deny["Effect"], deny["Principal"], deny["Condition"]) == (
        "Deny",
        {"AWS": "*"},
        {"StringNotEquals": {"kms:ViaService": VIA_S3}},
    )
    assert "kms:Decrypt" in deny["Action"] and "kms:GenerateDataKey*" in deny["Action"]


def test_no_at_rest_policy_names_the_root_or_gives_admins_use() -> None:
    for policy in (store(), logs(), alarm_topic_key_policy(account_id=ACCT, admin_arns=[ADMIN])):
        assert ":root" not in str(policy)
        admin = policy["Statement"][0]
        assert admin["Sid"] == "KeyAdministration"
        assert "kms:PutKeyPolicy" in admin["Action"]  # the break-glass path
        assert not any(a in admin["Action"] for a in ("kms:Decrypt", "kms:CreateGrant", "kms:*"))
        assert not any(a.startswith("kms:GenerateDataKey") for a in admin["Action"])


def test_store_policy_evaluated_only_through_s3_and_this_bucket() -> None:
    policy = store()
    bucket, obj = {"aws:s3:arn": BUCKET_ARN}, {"aws:s3:arn": f"{BUCKET_ARN}/models/m.sealed"}
    assert decide(policy, "kms:Decrypt", HOST, bucket).allowed
    assert decide(policy, "kms:Decrypt", HOST, obj).allowed
    assert decide(policy, "kms:GenerateDataKey", SEALER, bucket).allowed
    assert not decide(policy, "kms:GenerateDataKey", HOST, bucket).allowed
    assert not decide(policy, "kms:Encrypt", SEALER, bucket).allowed
    assert decide(policy, "kms:Decrypt", HOST, bucket, via=None).deny  # direct: explicitly denied
    assert decide(policy, "kms:ReEncryptFrom", HOST, bucket, via=None).deny
    assert not decide(policy, "kms:Decrypt", HOST, {"aws:s3:arn": "arn:aws:s3:::other/k"}).allowed
    assert not decide(policy, "kms:Decrypt", HOST, {}).allowed
    assert not decide(policy, "kms:Decrypt", HOST, bucket, via="s3.us-east-1.amazonaws.com").allowed
    assert not decide(policy, "kms:Decrypt", ADMIN, bucket).allowed
    # another account's role, even through S3 and for this bucket
    assert not decide(policy, "kms:Decrypt", "arn:aws:iam::999988887777:role/host", bucket).allowed


def test_logs_policy_evaluated_only_for_the_service_and_nitrovault_groups() -> None:
    policy = logs()
    statement = policy["Statement"][1]
    assert statement["Principal"] == {"Service": LOGS}
    assert statement["Condition"] == {
        "ArnLike": {
            "kms:EncryptionContext:aws:logs:arn": f"arn:aws:logs:{REGION}:{ACCT}:log-group:/nitrovault/*"
        }
    }

    def ask(action: str, group: str | None, service: str = LOGS, who: str = "") -> bool:
        ctx = {"kms:EncryptionContext:aws:logs:arn": f"arn:aws:logs:{REGION}:{ACCT}:log-group:{group}"}
        request = RequestContext(
            action, who, KEY_ARN, ctx if group else {}, principal_service=service or None
        )
        return evaluate_key_policy(policy, request).allowed

    assert ask("kms:Decrypt", "/nitrovault/parent") and ask("kms:GenerateDataKey", "/nitrovault/enclave")
    assert not ask("kms:Decrypt", "/other")
    assert not ask("kms:Decrypt", None)
    assert not ask("kms:Decrypt", "/nitrovault/parent", service="logs.us-east-1.amazonaws.com")
    assert not ask("kms:Decrypt", "/nitrovault/parent", service="", who=HOST)  # no IAM identity


def test_alarm_topic_policy_lets_cloudwatch_publish_and_nobody_else() -> None:
    policy = alarm_topic_key_policy(account_id=ACCT, admin_arns=[ADMIN])
    assert [s["Sid"] for s in policy["Statement"]] == ["KeyAdministration", "CloudWatchAlarmsPublish"]
    publish = RequestContext(
        "kms:GenerateDataKey", "", KEY_ARN, {}, principal_service="cloudwatch.amazonaws.com"
    )
    assert evaluate_key_policy(policy, publish).allowed
    assert not evaluate_key_policy(policy, build_request_context("kms:Decrypt", HOST, KEY_ARN)).allowed


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"account_id": "1234"}, "12 digits"),
        ({"region": "eu west 1"}, "region"),
        ({"region": "*"}, "region"),
        ({"bucket_name": "Weights_Bucket"}, "bucket"),
        ({"bucket_name": "a..b"}, "bucket"),
        ({"bucket_name": "ab"}, "bucket"),
        ({"writer_arns": []}, "at least one writer"),
        ({"reader_arns": [f"arn:aws:iam::{ACCT}:root"]}, "reader principal"),
        ({"reader_arns": ["arn:aws:iam::999988887777:role/host"]}, "reader principal"),
        ({"reader_arns": [f"arn:aws:iam::{ACCT}:role/*"]}, "reader principal"),
        ({"admin_arns": ADMIN}, "a list"),
    ],
)
def test_store_policy_refuses_bad_input(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        store(**overrides)


def test_logs_and_alarm_policies_refuse_bad_input() -> None:
    with pytest.raises(PolicyError, match="region"):
        logs(region="<Region>")  # an unresolved token must not reach a policy
    with pytest.raises(PolicyError, match="12 digits"):
        logs(account_id="${Token[AWS.AccountId.1]}")
    with pytest.raises(PolicyError, match="admin principal"):
        alarm_topic_key_policy(account_id=ACCT, admin_arns=[f"arn:aws:iam::{ACCT}:root"])
    with pytest.raises(PolicyError, match="at least one admin"):
        alarm_topic_key_policy(account_id=ACCT, admin_arns=[])


# -- the reviewer on at-rest keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy",
    [store(), logs(), alarm_topic_key_policy(account_id=ACCT, admin_arns=[ADMIN])],
    ids=["store", "logs", "alarm-topic"],
)
def test_at_rest_policies_review_with_zero_findings(policy: dict[str, Any]) -> None:
    assert review_policy(policy, key="k").findings == ()


def test_store_rows_are_service_mediated_and_not_direct() -> None:
    review = review_policy(store(), key="store", key_arn=KEY_ARN)
    rows = {(g.statement, g.principal, g.actions[0]): g for g in review.grants}
    assert set(rows) == {
        ("WriteThroughS3", SEALER, "kms:GenerateDataKey"),
        ("WriteThroughS3", SEALER, "kms:Decrypt"),
        ("ReadThroughS3", HOST, "kms:Decrypt"),
    }
    for row in rows.values():
        assert row.verdict == "service-mediated"
        assert row.unattested is False and row.foreign_pcrs is False and row.manifest_pcrs is None


def _mediated(
    condition: dict[str, Any], principal: Any = None, action: Any = "kms:Decrypt"
) -> dict[str, Any]:
    """The at-rest store policy with its read statement replaced (and no Deny, so NV-NO-DENY can show)."""
    policy = store()
    policy["Statement"] = [
        policy["Statement"][0],
        {
            "Sid": "Read",
            "Effect": "Allow",
            "Principal": principal or {"AWS": [HOST]},
            "Action": action,
            "Resource": "*",
            "Condition": condition,
        },
    ]
    return policy


GOOD_CONDITION = {
    "StringEquals": {"kms:ViaService": VIA_S3},
    "ArnLike": {"kms:EncryptionContext:aws:s3:arn": f"{BUCKET_ARN}/*"},
}


def test_mediated_statement_without_the_deny_is_still_clean() -> None:
    # the exemption itself: an at-rest key needs no Deny of Decrypt without attestation
    assert review_policy(_mediated(GOOD_CONDITION), key="k").findings == ()


@pytest.mark.parametrize(
    "condition",
    [
        {"StringEquals": {"kms:ViaService": VIA_S3}},  # no encryption-context limit
        {
            "StringLike": {"kms:ViaService": "s3.*.amazonaws.com"},
            "ArnLike": {"kms:EncryptionContext:aws:s3:arn": BUCKET_ARN},
        },  # a pattern of services
        {
            "StringEqualsIfExists": {"kms:ViaService": VIA_S3},
            "ArnLike": {"kms:EncryptionContext:aws:s3:arn": BUCKET_ARN},
        },  # absent ViaService passes
        {
            "StringEquals": {"kms:ViaService": VIA_S3},
            "ArnLike": {"kms:EncryptionContext:aws:s3:arn": "arn:aws:s3:::*"},
        },  # every bucket
        {
            "StringEquals": {"kms:ViaService": VIA_S3},
            "StringLike": {"kms:EncryptionContext:aws:s3:arn": "arn:aws:s3:::nv-*/*"},
        },  # bucket pattern
        {
            "StringEquals": {"kms:ViaService": VIA_S3},
            "ArnNotLike": {"kms:EncryptionContext:aws:s3:arn": BUCKET_ARN},
        },  # negated
        {
            "StringEquals": {"kms:ViaService": VIA_S3},
            "ArnLike": {"kms:EncryptionContext:aws:logs:arn": f"arn:aws:logs:{REGION}:{ACCT}:log-group:x"},
        },
        {
            "StringEquals": {"kms:ViaService": [VIA_S3, f"sqs.{REGION}.amazonaws.com"]},
            "ArnLike": {"kms:EncryptionContext:aws:s3:arn": BUCKET_ARN},
        },  # two services
        {
            "ForAnyValue:StringEquals": {"kms:ViaService": VIA_S3},
            "ArnLike": {"kms:EncryptionContext:aws:s3:arn": BUCKET_ARN},
        },  # set operator
    ],
    ids=[
        "no-context",
        "service-pattern",
        "if-exists",
        "any-bucket",
        "bucket-pattern",
        "negated",
        "other-service-context",
        "two-services",
        "set-operator",
    ],
)
def test_weakened_service_conditions_get_the_old_findings(condition: dict[str, Any]) -> None:
    found = rules(review_policy(_mediated(condition), key="k"))
    assert "NV-PLAINTEXT-UNATTESTED" in found and "NV-NO-DENY" in found


def test_generate_data_key_without_a_mediated_reading_is_unconstrained() -> None:
    found = rules(
        review_policy(
            _mediated({"StringEquals": {"kms:ViaService": VIA_S3}}, action="kms:GenerateDataKey"), key="k"
        )
    )
    assert "NV-DATAKEY-UNCONSTRAINED" in found


def test_root_and_everyone_are_never_service_mediated() -> None:
    root = review_policy(_mediated(GOOD_CONDITION, principal={"AWS": f"arn:aws:iam::{ACCT}:root"}), key="k")
    assert {"NV-ROOT-DELEGATION", "NV-NO-DENY"} <= rules(root)
    anyone = review_policy(_mediated(GOOD_CONDITION, principal={"AWS": "*"}), key="k")
    assert {"NV-WILDCARD-PRINCIPAL", "NV-NO-DENY"} <= rules(anyone)


def test_only_decrypt_and_generate_data_key_can_be_service_mediated() -> None:
    review = review_policy(_mediated(GOOD_CONDITION, action=["kms:Decrypt", "kms:ReEncryptFrom"]), key="k")
    verdicts = {g.actions[0]: g.verdict for g in review.grants}
    assert verdicts == {"kms:Decrypt": "service-mediated", "kms:ReEncryptFrom": "unattested-plaintext"}
    assert {"NV-PLAINTEXT-UNATTESTED", "NV-NO-DENY"} <= rules(review)


def test_a_mediated_row_the_evaluator_allows_directly_is_a_proved_finding() -> None:
    policy = _mediated(GOOD_CONDITION)
    policy["Statement"].append(
        {
            "Sid": "Direct",
            "Effect": "Allow",
            "Principal": {"AWS": HOST},
            "Action": "kms:Decrypt",
            "Resource": "*",
        }
    )
    review = review_policy(policy, key="k")
    mediated = [f for f in review.findings if f.statement == "Read"]
    assert [(f.rule_id, f.proved) for f in mediated] == [("NV-PLAINTEXT-UNATTESTED", True)]


def test_service_principals_with_escalation_or_kms_star_still_need_the_deny() -> None:
    for action in ("kms:*", ["kms:Decrypt", "kms:CreateGrant"], ["kms:Decrypt", "kms:PutKeyPolicy"]):
        policy = logs()
        policy["Statement"] = [
            policy["Statement"][0],
            {
                "Sid": "Svc",
                "Effect": "Allow",
                "Principal": {"Service": LOGS},
                "Action": action,
                "Resource": "*",
            },
        ]
        assert "NV-NO-DENY" in rules(review_policy(policy, key="k")), action


def test_model_key_checks_stay_strict_beside_a_mediated_statement() -> None:
    # a model key (attestation conditions) always needs the Deny, whatever else it holds
    pcrs = {i: hashlib.sha384(f"pcr{i}".encode()).digest() for i in (0, 1, 2)}
    model = model_key_policy(
        account_id=ACCT,
        admin_arns=[ADMIN],
        sealer_arns=[SEALER],
        enclave_role_arns=[HOST],
        pcrs=pcrs,
        encryption_context={"model": "m"},
    )
    statements = [s for s in model["Statement"] if s["Effect"] == "Allow"]
    statements.append(
        {
            "Sid": "Read",
            "Effect": "Allow",
            "Principal": {"AWS": [HOST]},
            "Action": "kms:Decrypt",
            "Resource": "*",
            "Condition": GOOD_CONDITION,
        }
    )
    assert rules(review_policy({**model, "Statement": statements}, key="k")) == {"NV-NO-DENY"}
    # and with its Deny back, it is clean again (the mediated Decrypt is dead: the Deny refuses it)
    full = {**model, "Statement": [*model["Statement"], statements[-1]]}
    assert review_policy(full, key="k").findings == ()
