"""The at-rest keys (weights store, log groups, alarm topic) and the parent's log, on the synthesized
stack: each key policy is exactly its builder's, names no account root and grants no ``kms:*``; the store
key is usable only through S3 with the bucket's encryption context (proved with the policy evaluator);
the logs key only by the region's CloudWatch Logs service for ``/nitrovault/*``; the parent's log is
shipped to the log group its metric filters read."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aws_cdk.assertions import Match
from synth_context import ACCOUNT, REGION, Synth

from infra.constructs.enclave_host import PARENT_LOG
from infra.constructs.observability import ENCLAVE_LOG_GROUP, PARENT_LOG_GROUP
from nitrovault.policy import RequestContext, build_request_context, evaluate_key_policy
from nitrovault.policy.build import (
    ADMIN_ACTIONS,
    alarm_topic_key_policy,
    logs_key_policy,
    store_key_policy,
)
from nitrovault.policy.cfn import render_text

ROLE = f"arn:aws:iam::{ACCOUNT}:role/"
ADMINS = [f"{ROLE}nitrovault-key-admin", f"{ROLE}cdk-hnb659fds-cfn-exec-role-{ACCOUNT}-{REGION}"]
BUCKET = f"nitrovault-weights-{ACCOUNT}-{REGION}"
BUCKET_ARN = f"arn:aws:s3:::{BUCKET}"
VIA_S3 = f"s3.{REGION}.amazonaws.com"
LOGS_SERVICE = f"logs.{REGION}.amazonaws.com"
KEY_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/00000000-0000-0000-0000-000000000000"
GROUPS = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:"


def _key(s: Synth, policy_id: str) -> tuple[str, dict[str, Any]]:
    found = [
        (k, r)
        for k, r in s.of_type("AWS::KMS::Key").items()
        if r["Properties"]["KeyPolicy"].get("Id") == policy_id
    ]
    assert len(found) == 1, found
    return found[0]


def _policy(s: Synth, policy_id: str) -> dict[str, Any]:
    return dict(_key(s, policy_id)[1]["Properties"]["KeyPolicy"])


def _role_id(s: Synth, name: str) -> str:
    (found,) = [k for k, r in s.of_type("AWS::IAM::Role").items() if r["Properties"].get("RoleName") == name]
    return found


def _log_group_id(s: Synth, name: str) -> str:
    (found,) = [
        k for k, r in s.of_type("AWS::Logs::LogGroup").items() if r["Properties"]["LogGroupName"] == name
    ]
    return found


def _session(role: str) -> str:
    return f"arn:aws:sts::{ACCOUNT}:assumed-role/{role}/i-0123456789abcdef0"


# -- every key -------------------------------------------------------------------------------------------


def test_stack_has_exactly_four_keys_none_delegating_to_the_account(synth: Synth) -> None:
    keys = synth.of_type("AWS::KMS::Key")
    ids = sorted(r["Properties"]["KeyPolicy"].get("Id") for r in keys.values())
    assert ids == [
        "nitrovault-alarm-topic-key",
        "nitrovault-logs-key",
        "nitrovault-model-key",
        "nitrovault-store-key",
    ]
    for resource in keys.values():
        assert resource["Properties"]["EnableKeyRotation"] is True
        assert resource["DeletionPolicy"] == "Retain"
        policy = resource["Properties"]["KeyPolicy"]
        text = json.dumps(policy)
        # no account root (literal or as an intrinsic), so no IAM policy can delegate use of any key
        assert ":root" not in text and "AWS::AccountId" not in text and "Fn::" not in text
        for statement in policy["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            assert "kms:*" not in actions and "*" not in actions
            if statement["Effect"] == "Allow":
                assert statement["Principal"] not in ("*", {"AWS": "*"})
                assert not any(a in actions for a in ("kms:CreateGrant", "kms:Create*"))


@pytest.mark.parametrize(
    "policy_id", ["nitrovault-store-key", "nitrovault-logs-key", "nitrovault-alarm-topic-key"]
)
def test_administrators_manage_every_at_rest_key_and_nothing_else(synth: Synth, policy_id: str) -> None:
    synth.template.has_resource_properties(
        "AWS::KMS::Key",
        {
            "KeyPolicy": Match.object_like(
                {
                    "Id": policy_id,
                    "Statement": Match.array_with(
                        [
                            {
                                "Sid": "KeyAdministration",
                                "Effect": "Allow",
                                "Principal": {"AWS": ADMINS},
                                "Action": list(ADMIN_ACTIONS),
                                "Resource": "*",
                            }
                        ]
                    ),
                }
            )
        },
    )
    admin = _session("nitrovault-key-admin")
    policy = _policy(synth, policy_id)
    assert evaluate_key_policy(policy, build_request_context("kms:PutKeyPolicy", admin, KEY_ARN)).allowed
    for action in ("kms:Decrypt", "kms:GenerateDataKey", "kms:Encrypt", "kms:CreateGrant"):
        request = build_request_context(
            action,
            admin,
            KEY_ARN,
            {"aws:s3:arn": BUCKET_ARN},
            extra_context={"kms:ViaService": VIA_S3},
        )
        assert not evaluate_key_policy(policy, request).allowed, (policy_id, action)


# -- the weights store's key -----------------------------------------------------------------------------


def test_store_key_policy_is_exactly_the_builders(synth: Synth) -> None:
    expected = store_key_policy(
        account_id=ACCOUNT,
        region=REGION,
        admin_arns=ADMINS,
        writer_arns=[f"{ROLE}nitrovault-sealer"],
        reader_arns=[f"{ROLE}nitrovault-enclave-host"],
        bucket_name=BUCKET,
    )
    assert _policy(synth, "nitrovault-store-key") == expected
    assert synth.stack.store.policy == expected


def test_store_key_use_is_only_through_s3_with_the_buckets_context(synth: Synth) -> None:
    through_s3 = {
        "StringEquals": {"kms:ViaService": VIA_S3, "kms:CallerAccount": ACCOUNT},
        "ArnLike": {"kms:EncryptionContext:aws:s3:arn": [BUCKET_ARN, f"{BUCKET_ARN}/*"]},
    }
    synth.template.has_resource_properties(
        "AWS::KMS::Key",
        {
            "KeyPolicy": Match.object_like(
                {
                    "Statement": Match.array_with(
                        [
                            Match.object_like(
                                {
                                    "Sid": "WriteThroughS3",
                                    "Effect": "Allow",
                                    "Principal": {"AWS": [f"{ROLE}nitrovault-sealer"]},
                                    "Action": ["kms:GenerateDataKey", "kms:Decrypt"],
                                    "Condition": through_s3,
                                }
                            ),
                            Match.object_like(
                                {
                                    "Sid": "ReadThroughS3",
                                    "Effect": "Allow",
                                    "Principal": {"AWS": [f"{ROLE}nitrovault-enclave-host"]},
                                    "Action": ["kms:Decrypt"],
                                    "Condition": through_s3,
                                }
                            ),
                            Match.object_like(
                                {
                                    "Sid": "DenyUseOutsideS3",
                                    "Effect": "Deny",
                                    "Principal": {"AWS": "*"},
                                    "Condition": {"StringNotEquals": {"kms:ViaService": VIA_S3}},
                                }
                            ),
                        ]
                    )
                }
            )
        },
    )


def _store(policy: dict[str, Any], action: str, role: str, context: dict[str, str], via: str | None) -> Any:
    extra = {"kms:ViaService": via} if via else {}
    request = build_request_context(action, _session(role), KEY_ARN, context, extra_context=extra)
    return evaluate_key_policy(policy, request)


def test_store_key_evaluated_hosts_read_sealer_writes_through_s3_only(synth: Synth) -> None:
    bucket = {"aws:s3:arn": BUCKET_ARN}  # what S3 sends with Bucket Keys on
    obj = {"aws:s3:arn": f"{BUCKET_ARN}/models/resnet.sealed"}  # ... and with Bucket Keys off
    host, sealer = "nitrovault-enclave-host", "nitrovault-sealer"
    policy = _policy(synth, "nitrovault-store-key")
    assert _store(policy, "kms:Decrypt", host, bucket, VIA_S3).allowed
    assert _store(policy, "kms:Decrypt", host, obj, VIA_S3).allowed
    assert _store(policy, "kms:GenerateDataKey", sealer, bucket, VIA_S3).allowed
    assert _store(policy, "kms:Decrypt", sealer, bucket, VIA_S3).allowed  # multipart upload, read back
    # only the sealer encrypts
    assert not _store(policy, "kms:GenerateDataKey", host, bucket, VIA_S3).allowed
    # not directly (without S3): explicitly denied, even to the roles the policy names
    direct = _store(policy, "kms:Decrypt", host, bucket, None)
    assert not direct.allowed and direct.deny
    assert _store(policy, "kms:GenerateDataKey", sealer, bucket, None).deny
    # not through another service, not for another bucket (nor a bucket whose name merely starts alike)
    assert not _store(policy, "kms:Decrypt", host, bucket, f"sqs.{REGION}.amazonaws.com").allowed
    assert not _store(policy, "kms:Decrypt", host, {"aws:s3:arn": "arn:aws:s3:::other"}, VIA_S3).allowed
    assert not _store(policy, "kms:Decrypt", host, {"aws:s3:arn": f"{BUCKET_ARN}-x/k"}, VIA_S3).allowed
    # nobody else, e.g. the identity canary
    assert not _store(policy, "kms:Decrypt", "nitrovault-identity-canary", bucket, VIA_S3).allowed


def test_weights_bucket_is_named_in_the_key_policy_and_uses_the_store_key(synth: Synth) -> None:
    store_id, store = _key(synth, "nitrovault-store-key")
    synth.template.has_resource_properties(
        "AWS::S3::Bucket",
        {
            "BucketName": BUCKET,
            "BucketEncryption": {
                "ServerSideEncryptionConfiguration": [
                    {
                        "BucketKeyEnabled": True,
                        "ServerSideEncryptionByDefault": {
                            "SSEAlgorithm": "aws:kms",
                            "KMSMasterKeyID": {"Fn::GetAtt": [store_id, "Arn"]},
                        },
                    }
                ]
            },
        },
    )
    # the access-log bucket stays SSE-S3: S3 server access logging cannot write with a KMS key
    synth.template.has_resource_properties(
        "AWS::S3::Bucket",
        {
            "OwnershipControls": {"Rules": [{"ObjectOwnership": "BucketOwnerPreferred"}]},
            "BucketEncryption": {
                "ServerSideEncryptionConfiguration": [
                    {"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
                ]
            },
        },
    )
    depends = set(store.get("DependsOn", []))
    for name in ("nitrovault-enclave-host", "nitrovault-key-admin", "nitrovault-sealer"):
        assert _role_id(synth, name) in depends
    # the roles alone, never their default policies (which reference the bucket: a cycle)
    assert not any("DefaultPolicy" in d for d in depends)


def test_no_iam_policy_pretends_to_grant_the_store_key(synth: Synth) -> None:
    # the key policy does not delegate to IAM, so a KMS statement in a role policy would be dead weight
    store_id, _ = _key(synth, "nitrovault-store-key")
    for policy in synth.of_type("AWS::IAM::Policy").values():
        assert store_id not in json.dumps(policy["Properties"]["PolicyDocument"])


def test_sealer_publishes_every_prefix_the_hosts_read(synth: Synth) -> None:
    sealer_id, host_id = _role_id(synth, "nitrovault-sealer"), _role_id(synth, "nitrovault-enclave-host")

    def object_arns(role_id: str, action: str) -> set[str]:
        found = set()
        for policy in synth.of_type("AWS::IAM::Policy").values():
            if {"Ref": role_id} not in policy["Properties"]["Roles"]:
                continue
            for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
                actions = (
                    statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
                )
                resources = (
                    statement["Resource"]
                    if isinstance(statement["Resource"], list)
                    else [statement["Resource"]]
                )
                if action in actions:
                    found |= {json.dumps(r, sort_keys=True) for r in resources}
        return found

    assert object_arns(sealer_id, "s3:PutObject") == object_arns(host_id, "s3:GetObject")
    assert len(object_arns(host_id, "s3:GetObject")) == 3
    assert object_arns(host_id, "s3:PutObject") == set()


# -- the log groups' key and the alarm topic's key -------------------------------------------------------


def test_logs_key_policy_is_exactly_the_builders_and_serves_only_cloudwatch_logs(synth: Synth) -> None:
    assert _policy(synth, "nitrovault-logs-key") == logs_key_policy(
        account_id=ACCOUNT, region=REGION, admin_arns=ADMINS
    )
    synth.template.has_resource_properties(
        "AWS::KMS::Key",
        {
            "KeyPolicy": Match.object_like(
                {
                    "Id": "nitrovault-logs-key",
                    "Statement": Match.array_with(
                        [
                            Match.object_like(
                                {
                                    "Sid": "CloudWatchLogsUse",
                                    "Effect": "Allow",
                                    "Principal": {"Service": LOGS_SERVICE},
                                    "Condition": {
                                        "ArnLike": {
                                            "kms:EncryptionContext:aws:logs:arn": (
                                                f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/nitrovault/*"
                                            )
                                        }
                                    },
                                }
                            )
                        ]
                    ),
                }
            )
        },
    )
    users = [
        s["Principal"]
        for s in _policy(synth, "nitrovault-logs-key")["Statement"]
        if s["Effect"] == "Allow" and s["Sid"] != "KeyAdministration"
    ]
    assert users == [{"Service": LOGS_SERVICE}]


def _logs_service(synth: Synth, action: str, group: str | None) -> Any:
    context = {"kms:EncryptionContext:aws:logs:arn": f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{group}"}
    request = RequestContext(action, "", KEY_ARN, context if group else {}, principal_service=LOGS_SERVICE)
    return evaluate_key_policy(_policy(synth, "nitrovault-logs-key"), request)


def test_logs_key_evaluated_only_for_nitrovault_log_groups(synth: Synth) -> None:
    assert _logs_service(synth, "kms:Decrypt", PARENT_LOG_GROUP).allowed
    assert _logs_service(synth, "kms:GenerateDataKey", ENCLAVE_LOG_GROUP).allowed
    assert not _logs_service(synth, "kms:Decrypt", "/aws/lambda/other").allowed
    assert not _logs_service(synth, "kms:Decrypt", None).allowed
    other_region = RequestContext(
        "kms:Decrypt",
        "",
        KEY_ARN,
        {"kms:EncryptionContext:aws:logs:arn": f"{GROUPS}{PARENT_LOG_GROUP}"},
        principal_service="logs.eu-west-1.amazonaws.com",
    )
    assert not evaluate_key_policy(_policy(synth, "nitrovault-logs-key"), other_region).allowed


def test_log_groups_use_the_logs_key_and_the_topic_its_own(synth: Synth) -> None:
    logs_id, _ = _key(synth, "nitrovault-logs-key")
    alarm_id, _ = _key(synth, "nitrovault-alarm-topic-key")
    groups = synth.of_type("AWS::Logs::LogGroup")
    assert groups and all(
        g["Properties"]["KmsKeyId"] == {"Fn::GetAtt": [logs_id, "Arn"]} for g in groups.values()
    )
    synth.template.has_resource_properties(
        "AWS::SNS::Topic", {"KmsMasterKeyId": {"Fn::GetAtt": [alarm_id, "Arn"]}}
    )
    assert _policy(synth, "nitrovault-alarm-topic-key") == alarm_topic_key_policy(
        account_id=ACCOUNT, admin_arns=ADMINS
    )
    users = [
        (s["Principal"], s["Action"])
        for s in _policy(synth, "nitrovault-alarm-topic-key")["Statement"]
        if s["Effect"] == "Allow" and s["Sid"] != "KeyAdministration"
    ]
    assert users == [({"Service": "cloudwatch.amazonaws.com"}, ["kms:Decrypt", "kms:GenerateDataKey*"])]


# -- the parent's log ---------------------------------------------------------------------------------------
# (The restart alarm reads the parent's Prometheus metrics now: tests/infra/test_metrics_alarms.py.)


def _user_data(synth: Synth) -> str:
    """The boot script, ``{"Ref": X}`` rendered as ``<Ref:X>`` (``render_text``)."""
    (template,) = synth.of_type("AWS::EC2::LaunchTemplate").values()
    return render_text(template["Properties"]["LaunchTemplateData"]["UserData"])


def _file(script: str, path: str) -> str:
    return script.split(f"cat > {path} <<'NITROVAULT_EOF'\n", 1)[1].split("\nNITROVAULT_EOF", 1)[0]


def test_the_host_ships_the_parent_log_to_the_group_the_filter_reads(synth: Synth) -> None:
    script = _user_data(synth)
    agent = json.loads(_file(script, "/opt/aws/amazon-cloudwatch-agent/etc/nitrovault.json"))
    collected = agent["logs"]["logs_collected"]["files"]["collect_list"]
    shipped = {e["file_path"]: e["log_group_name"] for e in collected}
    assert shipped[PARENT_LOG] == f"<Ref:{_log_group_id(synth, PARENT_LOG_GROUP)}>"
    unit = _file(script, "/etc/systemd/system/nitrovault-parent.service")
    assert f"StandardError=append:{PARENT_LOG}" in unit  # where the parent's Python logging (stderr) goes
