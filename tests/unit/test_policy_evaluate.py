"""Key-policy evaluation: parsing, decision logic, principals, KMS request contexts, a realistic enclave
key policy, and two properties (a Deny never grants; evaluation never raises on context values)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nitrovault.errors import PolicyError
from nitrovault.policy import (
    Decision,
    Policy,
    RequestContext,
    build_request_context,
    evaluate_key_policy,
    parse_policy,
)

ACCT = "111122223333"
OTHER = "444455556666"
ROOT = f"arn:aws:iam::{ACCT}:root"
ADMIN = f"arn:aws:iam::{ACCT}:role/KeyAdmin"
SEALER = f"arn:aws:iam::{ACCT}:role/ModelSealer"
ENCLAVE = f"arn:aws:iam::{ACCT}:role/EnclaveInstance"
ENCLAVE_SESSION = f"arn:aws:sts::{ACCT}:assumed-role/EnclaveInstance/i-0123456789abcdef0"
USER = f"arn:aws:iam::{ACCT}:user/alice"
KEY_ARN = f"arn:aws:kms:eu-west-1:{ACCT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def stmt(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt", "Resource": "*"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def pol(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def req(action: str = "kms:Decrypt", principal: str = USER, **kw: Any) -> RequestContext:
    return RequestContext(action=action, principal_arn=principal, **kw)


def allowed(policy: Any, request: RequestContext, **kw: Any) -> bool:
    return evaluate_key_policy(policy, request, **kw).allowed


# -- parsing ----------------------------------------------------------------------------------------------


def test_parse_policy_builds_frozen_statements() -> None:
    policy = parse_policy(
        json.dumps(
            {
                "Version": "2012-10-17",
                "Id": "key-policy",
                "Statement": {
                    "Sid": "One",
                    "Effect": "Deny",
                    "NotPrincipal": {"AWS": [ACCT, ADMIN], "Service": "ec2.amazonaws.com"},
                    "NotAction": ["kms:Describe*"],
                    "NotResource": KEY_ARN,
                    "Condition": {"Bool": {"kms:GrantIsForAWSResource": True}},
                },
            }
        )
    )
    assert isinstance(policy, Policy)
    assert (policy.version, policy.id, len(policy.statements)) == ("2012-10-17", "key-policy", 1)
    (s,) = policy.statements
    assert (s.sid, s.effect, s.label) == ("One", "Deny", "One")
    assert s.principal is None and s.not_principal is not None
    assert s.not_principal.aws == (ACCT, ADMIN)
    assert s.not_principal.service == ("ec2.amazonaws.com",)
    assert (s.actions, s.not_actions) == (None, ("kms:Describe*",))
    assert (s.resources, s.not_resources) == (None, (KEY_ARN,))
    assert s.conditions[0].base == "Bool" and s.conditions[0].values == ("true",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.effect = "Allow"  # type: ignore[misc]


def test_statement_without_sid_is_labelled_by_position() -> None:
    policy = parse_policy(pol(stmt(Sid="A"), stmt()))
    assert [s.label for s in policy.statements] == ["A", "statement[1]"]


def test_policy_may_be_bytes_and_version_may_be_absent() -> None:
    policy = parse_policy(json.dumps({"Statement": [stmt()]}).encode())
    assert policy.version is None and len(policy.statements) == 1


@pytest.mark.parametrize(
    ("doc", "why"),
    [
        ("{not json", "not JSON"),
        ('{"Statement": [], "Statement": []}', "duplicate key"),
        ([], "not an object"),
        ({"Version": "2012-10-17"}, "no Statement"),
        ({"Statement": []}, "empty Statement"),
        ({"Version": "2020-01-01", "Statement": [stmt()]}, "bad Version"),
        ({"Version": "2012-10-17", "Statement": [stmt()], "Extra": 1}, "unknown top-level key"),
        ({"Id": 5, "Statement": [stmt()]}, "non-string Id"),
        (pol("statement"), "statement not an object"),
        (pol(stmt(Effect="Permit")), "bad Effect"),
        (pol(stmt(Effect="allow")), "Effect is case-sensitive"),
        (pol(stmt(Effect=None)), "missing Effect"),
        (pol(stmt(Action=None)), "missing Action"),
        (pol(stmt(NotAction="kms:Decrypt")), "Action and NotAction"),
        (pol(stmt(Action=[])), "empty Action"),
        (pol(stmt(Action=["kms:Decrypt", 3])), "non-string action"),
        (pol(stmt(Action="")), "empty action string"),
        (pol(stmt(Resource=None)), "missing Resource"),
        (pol(stmt(Resource=["*"], NotResource="*")), "Resource and NotResource"),
        (pol(stmt(Principal=None)), "missing Principal"),
        (pol(stmt(NotPrincipal="*")), "Principal and NotPrincipal"),
        (pol(stmt(Principal="everyone")), "bad principal string"),
        (pol(stmt(Principal={"IAM": ROOT})), "unknown principal type"),
        (pol(stmt(Principal={})), "empty principal object"),
        (pol(stmt(Principal={"AWS": 111122223333})), "numeric principal"),
        (pol(stmt(Principal={"AWS": f"arn:aws:iam::{ACCT}:role/*"})), "partial wildcard principal"),
        (pol(stmt(Sid=7)), "non-string Sid"),
        (pol(stmt(Condition={"StringEqualz": {"k:k": "v"}})), "unknown operator"),
        (pol(stmt(Condition="yes")), "Condition not an object"),
        (pol(stmt(Actions="kms:Decrypt")), "unknown statement key"),
    ],
)
def test_malformed_policies_raise_policy_error(doc: Any, why: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(doc)
    with pytest.raises(PolicyError):
        evaluate_key_policy(doc, req())


# -- decision logic ---------------------------------------------------------------------------------------


def test_allow_deny_and_implicit_deny_decisions() -> None:
    allow = evaluate_key_policy(pol(stmt(Sid="UseKey")), req())
    assert allow == Decision(True, "allowed by UseKey", ("UseKey",), deny=False)

    implicit = evaluate_key_policy(pol(stmt(Sid="UseKey", Action="kms:Encrypt")), req())
    assert (implicit.allowed, implicit.deny, implicit.matched_sids) == (False, False, ())
    assert implicit.reason == f"no statement allows kms:Decrypt for {USER}"

    explicit = evaluate_key_policy(pol(stmt(Sid="UseKey"), stmt(Sid="NoDecrypt", Effect="Deny")), req())
    assert (explicit.allowed, explicit.deny, explicit.matched_sids) == (False, True, ("NoDecrypt",))
    assert explicit.reason == "explicitly denied by NoDecrypt"


def test_explicit_deny_wins_regardless_of_order() -> None:
    deny = stmt(Sid="D", Effect="Deny")
    assert not allowed(pol(deny, stmt(Sid="A")), req())
    assert not allowed(pol(stmt(Sid="A"), deny), req())


def test_non_matching_deny_does_not_block() -> None:
    policy = pol(stmt(Sid="A"), stmt(Sid="D", Effect="Deny", Action="kms:ScheduleKeyDeletion"))
    assert allowed(policy, req())


def test_every_matching_allow_is_reported() -> None:
    decision = evaluate_key_policy(
        pol(stmt(Sid="A"), stmt(Sid="B"), stmt(Sid="C", Action="kms:Encrypt")), req()
    )
    assert decision.matched_sids == ("A", "B")


@pytest.mark.parametrize(
    ("pattern", "action", "expected"),
    [
        ("kms:*", "kms:Decrypt", True),
        ("*", "kms:Decrypt", True),
        ("kms:Gen*", "kms:GenerateDataKey", True),
        ("kms:Gen*", "kms:Decrypt", False),
        ("kms:Decr?pt", "kms:Decrypt", True),
        ("kms:Decr?pt", "kms:Decryypt", False),
        ("KMS:decrypt", "kms:Decrypt", True),
        ("kms:Decrypt", "kms:DECRYPT", True),
        ("kms:Decrypt", "kms:DecryptX", False),
        ("s3:*", "kms:Decrypt", False),
    ],
)
def test_action_wildcards_and_case(pattern: str, action: str, expected: bool) -> None:
    assert allowed(pol(stmt(Action=pattern)), req(action=action)) is expected


def test_not_action_matches_every_other_action() -> None:
    policy = pol(stmt(Action=None, NotAction=["kms:Decrypt", "kms:ReEncrypt*"]))
    assert allowed(policy, req(action="kms:Encrypt"))
    assert not allowed(policy, req(action="kms:Decrypt"))
    assert not allowed(policy, req(action="kms:reencryptfrom"))


def test_deny_with_not_action_blocks_everything_else() -> None:
    policy = pol(stmt(Action="kms:*"), stmt(Effect="Deny", Action=None, NotAction="kms:Describe*"))
    assert allowed(policy, req(action="kms:DescribeKey"))
    assert not allowed(policy, req(action="kms:Decrypt"))


def test_resource_wildcards_and_not_resource() -> None:
    exact = pol(stmt(Resource=KEY_ARN))
    assert allowed(exact, req(resource=KEY_ARN))
    assert not allowed(exact, req(resource=KEY_ARN.replace("1234abcd", "ffffffff")))
    wild = pol(stmt(Resource=f"arn:aws:kms:*:{ACCT}:key/*"))
    assert allowed(wild, req(resource=KEY_ARN))
    assert not allowed(wild, req(resource=KEY_ARN.replace(ACCT, OTHER)))
    assert not allowed(pol(stmt(Resource=KEY_ARN.upper())), req(resource=KEY_ARN))
    not_res = pol(stmt(Resource=None, NotResource=KEY_ARN))
    assert not allowed(not_res, req(resource=KEY_ARN))
    assert allowed(not_res, req(resource=KEY_ARN.replace("1234abcd", "ffffffff")))
    assert allowed(pol(stmt()), req(resource=KEY_ARN))


# -- principals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("principal", ["*", {"AWS": "*"}, {"AWS": ["*"]}])
def test_wildcard_principals_match_everyone(principal: Any) -> None:
    policy = pol(stmt(Principal=principal))
    assert allowed(policy, req(principal=USER))
    assert allowed(policy, req(principal=f"arn:aws:iam::{OTHER}:user/mallory"))
    assert allowed(policy, req(principal=ENCLAVE_SESSION))


def test_exact_principal_arn() -> None:
    policy = pol(stmt(Principal={"AWS": USER}))
    assert allowed(policy, req(principal=USER))
    assert not allowed(policy, req(principal=f"arn:aws:iam::{ACCT}:user/bob"))
    assert not allowed(policy, req(principal=USER.replace(ACCT, OTHER)))
    assert not allowed(policy, req(principal="alice"))
    assert not allowed(policy, req(principal=""))


@pytest.mark.parametrize("account", [ACCT, ROOT])
def test_account_principal_delegates_to_the_whole_account_by_default(account: str) -> None:
    policy = pol(stmt(Principal={"AWS": account}))
    for caller in (ROOT, USER, ADMIN, ENCLAVE_SESSION):
        assert allowed(policy, req(principal=caller)), caller
    assert not allowed(policy, req(principal=f"arn:aws:iam::{OTHER}:user/mallory"))
    assert not allowed(policy, req(principal=f"arn:aws:iam::{OTHER}:root"))
    assert not allowed(policy, req(principal=f"arn:aws-cn:iam::{ACCT}:user/alice"))


@pytest.mark.parametrize("account", [ACCT, ROOT])
def test_account_principal_without_delegation_matches_only_root(account: str) -> None:
    policy = pol(stmt(Principal={"AWS": account}))
    assert allowed(policy, req(principal=ROOT), account_root_delegates=False)
    for caller in (USER, ADMIN, ENCLAVE_SESSION):
        assert not allowed(policy, req(principal=caller), account_root_delegates=False), caller


def test_assumed_role_session_matches_its_role() -> None:
    policy = pol(stmt(Principal={"AWS": ENCLAVE}))
    assert allowed(policy, req(principal=ENCLAVE_SESSION))
    assert allowed(policy, req(principal=ENCLAVE))
    assert not allowed(policy, req(principal=f"arn:aws:sts::{ACCT}:assumed-role/Other/i-1"))
    assert not allowed(policy, req(principal=f"arn:aws:sts::{OTHER}:assumed-role/EnclaveInstance/i-1"))
    # a user of the same name is not the role
    assert not allowed(policy, req(principal=f"arn:aws:iam::{ACCT}:user/EnclaveInstance"))


def test_role_with_path_matches_its_sessions_by_name() -> None:
    policy = pol(stmt(Principal={"AWS": f"arn:aws:iam::{ACCT}:role/service/EnclaveInstance"}))
    assert allowed(policy, req(principal=ENCLAVE_SESSION))
    assert not allowed(policy, req(principal=f"arn:aws:sts::{ACCT}:assumed-role/service/i-1"))


def test_service_principal() -> None:
    policy = pol(stmt(Principal={"Service": "ec2.amazonaws.com"}))
    assert allowed(policy, req(principal="", principal_service="ec2.amazonaws.com"))
    assert not allowed(policy, req(principal="", principal_service="s3.amazonaws.com"))
    assert not allowed(policy, req(principal=USER))
    aws_only = pol(stmt(Principal={"AWS": ROOT}))
    assert not allowed(aws_only, req(principal="", principal_service="ec2.amazonaws.com"))


def test_federated_and_canonical_user_principals_parse_but_never_match() -> None:
    policy = pol(stmt(Principal={"Federated": "cognito-identity.amazonaws.com", "CanonicalUser": "abc"}))
    assert not allowed(policy, req(principal=USER))


def test_not_principal_allow_matches_everyone_except() -> None:
    policy = pol(stmt(Principal=None, NotPrincipal={"AWS": [ADMIN, ENCLAVE]}))
    assert allowed(policy, req(principal=USER))
    assert not allowed(policy, req(principal=ADMIN))
    assert not allowed(policy, req(principal=ENCLAVE_SESSION))


def test_not_principal_deny_blocks_everyone_except() -> None:
    policy = pol(
        stmt(Sid="All"), stmt(Sid="OnlyEnclave", Effect="Deny", Principal=None, NotPrincipal={"AWS": ENCLAVE})
    )
    assert allowed(policy, req(principal=ENCLAVE_SESSION))
    decision = evaluate_key_policy(policy, req(principal=USER))
    assert (decision.allowed, decision.deny, decision.matched_sids) == (False, True, ("OnlyEnclave",))


# -- condition keys derived and built ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "caller"),
    [
        ("aws:PrincipalArn", USER, USER),
        ("aws:PrincipalArn", ENCLAVE, ENCLAVE_SESSION),
        ("aws:PrincipalAccount", ACCT, USER),
        ("kms:CallerAccount", ACCT, ENCLAVE_SESSION),
    ],
)
def test_principal_condition_keys_are_derived(key: str, value: str, caller: str) -> None:
    policy = pol(stmt(Condition={"StringEquals": {key: value}}))
    assert allowed(policy, req(principal=caller))
    other = caller.replace(ACCT, OTHER)
    assert not allowed(policy, req(principal=other))


def test_derived_keys_do_not_override_given_ones() -> None:
    policy = pol(stmt(Condition={"StringEquals": {"kms:CallerAccount": OTHER}}))
    assert allowed(policy, req(principal=USER, context={"KMS:CALLERACCOUNT": OTHER}))
    assert not allowed(policy, req(principal=USER))


def test_caller_account_pattern_from_the_aws_docs() -> None:
    # AWS managed key for EBS: everyone in the account, only through EBS.
    policy = pol(
        stmt(
            Principal={"AWS": "*"},
            Action=["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*"],
            Condition={
                "StringEquals": {"kms:CallerAccount": ACCT, "kms:ViaService": "ec2.eu-west-1.amazonaws.com"}
            },
        )
    )
    via_ec2 = {"kms:ViaService": "ec2.eu-west-1.amazonaws.com"}
    assert allowed(policy, req(principal=USER, context=via_ec2))
    assert not allowed(policy, req(principal=USER))
    assert not allowed(policy, req(principal=USER, context={"kms:ViaService": "s3.eu-west-1.amazonaws.com"}))
    assert not allowed(policy, req(principal=f"arn:aws:iam::{OTHER}:user/x", context=via_ec2))


def test_grant_is_for_aws_resource() -> None:
    policy = pol(stmt(Action="kms:CreateGrant", Condition={"Bool": {"kms:GrantIsForAWSResource": "true"}}))
    assert allowed(policy, req(action="kms:CreateGrant", context={"kms:GrantIsForAWSResource": True}))
    assert not allowed(policy, req(action="kms:CreateGrant", context={"kms:GrantIsForAWSResource": False}))
    assert not allowed(policy, req(action="kms:CreateGrant"))


def test_build_request_context_fills_kms_keys() -> None:
    pcrs = {0: bytes([0xAB]) * 48, 1: bytes(48), 8: bytes([0x01]) * 48}
    ctx = build_request_context(
        "Decrypt", ENCLAVE_SESSION, KEY_ARN, {"model": "resnet", "version": "1"}, pcrs
    )
    assert (ctx.action, ctx.principal_arn, ctx.resource, ctx.principal_service) == (
        "kms:Decrypt",
        ENCLAVE_SESSION,
        KEY_ARN,
        None,
    )
    assert ctx.context == {
        "kms:EncryptionContext:model": "resnet",
        "kms:EncryptionContext:version": "1",
        "kms:EncryptionContextKeys": ["model", "version"],
        "kms:RecipientAttestation:PCR0": "ab" * 48,
        "kms:RecipientAttestation:PCR1": "00" * 48,
        "kms:RecipientAttestation:PCR8": "01" * 48,
        "kms:RecipientAttestation:ImageSha384": "ab" * 48,
    }


def test_build_request_context_without_context_or_attestation_has_no_kms_keys() -> None:
    ctx = build_request_context("kms:GenerateDataKey", SEALER, KEY_ARN, None, None)
    assert ctx.action == "kms:GenerateDataKey" and ctx.context == {}
    assert build_request_context("kms:Decrypt", SEALER, KEY_ARN, {}, {}).context == {}


def test_build_request_context_extra_keys() -> None:
    ctx = build_request_context("kms:Decrypt", USER, KEY_ARN, extra_context={"kms:ViaService": "s3.x"})
    assert ctx.context == {"kms:ViaService": "s3.x"}


@pytest.mark.parametrize("pcrs", [{32: bytes(48)}, {-1: bytes(48)}, {0: "ab" * 48}])
def test_build_request_context_rejects_bad_pcrs(pcrs: Any) -> None:
    with pytest.raises(ValueError):
        build_request_context("kms:Decrypt", USER, KEY_ARN, None, pcrs)


def test_encryption_context_key_name_is_case_insensitive_value_is_not() -> None:
    policy = pol(stmt(Condition={"StringEquals": {"kms:EncryptionContext:AppName": "ExampleApp"}}))
    assert allowed(
        policy, build_request_context("kms:Decrypt", USER, KEY_ARN, {"appname": "ExampleApp"}, None)
    )
    assert not allowed(
        policy, build_request_context("kms:Decrypt", USER, KEY_ARN, {"AppName": "exampleapp"}, None)
    )


def test_encryption_context_keys_for_all_values_limits_the_pairs() -> None:
    policy = pol(
        stmt(
            Condition={
                "StringEquals": {"kms:EncryptionContext:AppName": "ExampleApp"},
                "ForAllValues:StringEquals": {"kms:EncryptionContextKeys": ["AppName"]},
            }
        )
    )
    assert allowed(
        policy, build_request_context("kms:Decrypt", USER, KEY_ARN, {"AppName": "ExampleApp"}, None)
    )
    extra = {"AppName": "ExampleApp", "Stage": "x"}
    assert not allowed(policy, build_request_context("kms:Decrypt", USER, KEY_ARN, extra, None))
    assert not allowed(policy, build_request_context("kms:Decrypt", USER, KEY_ARN, None, None))


def test_reason_never_contains_condition_values() -> None:
    secretish = "model-codename-zeta"
    policy = pol(stmt(Sid="S", Condition={"StringEquals": {"kms:EncryptionContext:model": secretish}}))
    for ec in ({"model": secretish}, {"model": "other"}):
        decision = evaluate_key_policy(policy, build_request_context("kms:Decrypt", USER, KEY_ARN, ec, None))
        assert secretish not in decision.reason
        assert "other" not in decision.reason


# -- a realistic enclave key policy -----------------------------------------------------------------------

PCR0, PCR1, PCR2 = bytes(range(48)), bytes(range(48, 96)), bytes(range(96, 144))


def enclave_policy() -> dict[str, Any]:
    return pol(
        {
            "Sid": "KeyAdministration",
            "Effect": "Allow",
            "Principal": {"AWS": ADMIN},
            "Action": [
                "kms:Create*",
                "kms:Describe*",
                "kms:Enable*",
                "kms:List*",
                "kms:Put*",
                "kms:Update*",
                "kms:Revoke*",
                "kms:Disable*",
                "kms:Get*",
                "kms:Delete*",
                "kms:TagResource",
                "kms:UntagResource",
                "kms:ScheduleKeyDeletion",
                "kms:CancelKeyDeletion",
            ],
            "Resource": "*",
        },
        {
            "Sid": "SealModels",
            "Effect": "Allow",
            "Principal": {"AWS": SEALER},
            "Action": "kms:GenerateDataKey",
            "Resource": "*",
            "Condition": {
                "StringEquals": {
                    "kms:EncryptionContext:model": "resnet50",
                    "kms:EncryptionContext:version": "3",
                }
            },
        },
        {
            "Sid": "EnclaveDecrypt",
            "Effect": "Allow",
            "Principal": {"AWS": ENCLAVE},
            "Action": "kms:Decrypt",
            "Resource": "*",
            "Condition": {
                "StringEqualsIgnoreCase": {
                    "kms:RecipientAttestation:PCR0": PCR0.hex(),
                    "kms:RecipientAttestation:PCR1": PCR1.hex(),
                    "kms:RecipientAttestation:PCR2": PCR2.hex(),
                }
            },
        },
    )


def enclave_decrypt(pcrs: dict[int, bytes] | None, principal: str = ENCLAVE_SESSION) -> Decision:
    ctx = build_request_context(
        "kms:Decrypt", principal, KEY_ARN, {"model": "resnet50", "version": "3"}, pcrs
    )
    return evaluate_key_policy(enclave_policy(), ctx)


GOOD_PCRS = {0: PCR0, 1: PCR1, 2: PCR2, 3: bytes(48), 4: bytes([7]) * 48}


def test_enclave_with_the_right_pcrs_may_decrypt() -> None:
    decision = enclave_decrypt(GOOD_PCRS)
    assert decision.allowed and decision.matched_sids == ("EnclaveDecrypt",)


def test_enclave_upper_case_hex_pcr_still_matches() -> None:
    ctx = build_request_context("kms:Decrypt", ENCLAVE_SESSION, KEY_ARN, None, GOOD_PCRS)
    upper = dict(ctx.context)
    upper["kms:RecipientAttestation:PCR0"] = PCR0.hex().upper()
    assert allowed(enclave_policy(), dataclasses.replace(ctx, context=upper))


@pytest.mark.parametrize("index", [0, 1, 2])
def test_enclave_with_one_wrong_pcr_is_denied(index: int) -> None:
    pcrs = dict(GOOD_PCRS)
    pcrs[index] = bytes([pcrs[index][0] ^ 1]) + pcrs[index][1:]
    decision = enclave_decrypt(pcrs)
    assert not decision.allowed and not decision.deny


def test_enclave_without_attestation_is_denied() -> None:
    assert not enclave_decrypt(None).allowed


def test_enclave_with_debug_mode_zero_pcrs_is_denied() -> None:
    assert not enclave_decrypt({0: bytes(48), 1: bytes(48), 2: bytes(48)}).allowed


def test_other_role_with_the_right_pcrs_is_denied() -> None:
    assert not enclave_decrypt(GOOD_PCRS, principal=f"arn:aws:sts::{ACCT}:assumed-role/Other/i-1").allowed


def test_admin_may_administer_but_not_decrypt() -> None:
    assert allowed(enclave_policy(), req(action="kms:DescribeKey", principal=ADMIN))
    assert allowed(enclave_policy(), req(action="kms:PutKeyPolicy", principal=ADMIN))
    assert not enclave_decrypt(GOOD_PCRS, principal=ADMIN).allowed
    assert not allowed(enclave_policy(), req(action="kms:GenerateDataKey", principal=ADMIN))


def seal(principal: str, ec: dict[str, str] | None) -> bool:
    return allowed(
        enclave_policy(), build_request_context("kms:GenerateDataKey", principal, KEY_ARN, ec, None)
    )


def test_sealing_role_with_the_right_context_may_generate_data_keys() -> None:
    assert seal(SEALER, {"model": "resnet50", "version": "3"})
    assert seal(SEALER, {"model": "resnet50", "version": "3", "extra": "ok"})


@pytest.mark.parametrize(
    "ec",
    [
        {"model": "resnet50", "version": "4"},
        {"model": "RESNET50", "version": "3"},
        {"model": "resnet50"},
        None,
    ],
)
def test_sealing_role_with_the_wrong_context_is_denied(ec: dict[str, str] | None) -> None:
    assert not seal(SEALER, ec)


def test_sealing_role_may_not_decrypt() -> None:
    assert not enclave_decrypt(GOOD_PCRS, principal=SEALER).allowed


def test_root_statement_opens_the_key_to_the_whole_account_unless_told_otherwise() -> None:
    # The usual "Enable IAM User Permissions" statement: a reviewer must treat it as "anyone in the
    # account whom IAM allows", which is why delegation is the default.
    policy = enclave_policy()
    policy["Statement"].append(stmt(Sid="EnableIAM", Principal={"AWS": ROOT}, Action="kms:*"))
    no_attestation = build_request_context("kms:Decrypt", USER, KEY_ARN, None, None)
    assert evaluate_key_policy(policy, no_attestation).matched_sids == ("EnableIAM",)
    assert not allowed(policy, no_attestation, account_root_delegates=False)


# -- properties -------------------------------------------------------------------------------------------

PRINCIPALS = [ROOT, USER, ADMIN, ENCLAVE, ENCLAVE_SESSION, f"arn:aws:iam::{OTHER}:user/m", ""]
ACTIONS = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:DescribeKey", "kms:CreateGrant"]
KEYS = [
    "kms:EncryptionContext:model",
    "kms:EncryptionContextKeys",
    "kms:RecipientAttestation:PCR0",
    "kms:ViaService",
    "kms:GrantIsForAWSResource",
    "aws:PrincipalArn",
    "test:Number",
]
CONDITIONS = [
    {"StringEquals": {KEYS[0]: "resnet50"}},
    {"StringNotEquals": {KEYS[0]: ["a", "b"]}},
    {"StringEqualsIgnoreCase": {KEYS[2]: "AB"}},
    {"StringNotEqualsIgnoreCaseIfExists": {KEYS[2]: "ab"}},
    {"StringLike": {KEYS[3]: "ec2.*"}},
    {"StringNotLike": {KEYS[3]: "s3.*"}},
    {"Bool": {KEYS[4]: True}},
    {"BoolIfExists": {KEYS[4]: "false"}},
    {"Null": {KEYS[2]: "true"}},
    {"Null": {KEYS[0]: False}},
    {"NumericLessThan": {KEYS[6]: 10}},
    {"NumericGreaterThanEqualsIfExists": {KEYS[6]: "2.5"}},
    {"NumericNotEquals": {KEYS[6]: 3}},
    {"ArnLike": {KEYS[5]: "arn:aws:iam::*:role/*"}},
    {"ArnNotEquals": {KEYS[5]: ADMIN}},
    {"ForAnyValue:StringEquals": {KEYS[1]: ["model", "version"]}},
    {"ForAllValues:StringLike": {KEYS[1]: "m*"}},
    {"ForAllValues:StringNotEquals": {KEYS[1]: "stage"}},
    {"ForAnyValue:StringNotLikeIfExists": {KEYS[1]: "*"}},
]

context_values = st.one_of(
    st.text(max_size=8),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.one_of(st.text(max_size=6), st.sampled_from(["model", "version", "ab", "AB"])), max_size=4),
    st.none(),
    st.binary(max_size=4),
    st.sampled_from(["resnet50", "AB", "ab", "ec2.x", "s3.x", "true", "false", "3", "2.5", ADMIN, ENCLAVE]),
)
contexts = st.dictionaries(
    st.one_of(st.sampled_from(KEYS + [k.upper() for k in KEYS]), st.text()), context_values
)

statements = st.builds(
    lambda effect, principal, neg_principal, action, neg_action, condition: {
        "Effect": effect,
        ("NotPrincipal" if neg_principal else "Principal"): principal,
        ("NotAction" if neg_action else "Action"): action,
        "Resource": "*",
        **({"Condition": condition} if condition else {}),
    },
    st.sampled_from(["Allow", "Deny"]),
    st.sampled_from(
        ["*", {"AWS": ACCT}, {"AWS": ADMIN}, {"AWS": [ENCLAVE, USER]}, {"Service": "ec2.amazonaws.com"}]
    ),
    st.booleans(),
    st.sampled_from(["kms:*", "kms:Decrypt", "kms:Gen*", "kms:Decr?pt", ["kms:Encrypt", "kms:Describe*"]]),
    st.booleans(),
    st.one_of(
        st.none(),
        st.sampled_from(CONDITIONS),
        st.lists(st.sampled_from(CONDITIONS), max_size=3).map(
            lambda cs: {op: keys for c in cs for op, keys in c.items()}
        ),
    ),
)
requests = st.builds(
    RequestContext,
    action=st.sampled_from(ACTIONS),
    principal_arn=st.sampled_from(PRINCIPALS),
    resource=st.just(KEY_ARN),
    context=contexts,
    principal_service=st.sampled_from([None, "ec2.amazonaws.com"]),
)

PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(st.lists(statements, min_size=1, max_size=5), statements, requests, st.booleans())
def test_adding_a_deny_never_grants(
    base: list[dict[str, Any]], extra: dict[str, Any], request: RequestContext, delegates: bool
) -> None:
    deny = dict(extra, Effect="Deny")
    before = evaluate_key_policy(pol(*base), request, account_root_delegates=delegates)
    after = evaluate_key_policy(pol(*base, deny), request, account_root_delegates=delegates)
    assert not (after.allowed and not before.allowed)
    match_all = stmt(Sid="Stop", Effect="Deny", Action="*")
    stopped = evaluate_key_policy(pol(*base, match_all), request, account_root_delegates=delegates)
    assert not stopped.allowed and stopped.deny and "Stop" in stopped.matched_sids


ALL_OPERATORS_POLICY = parse_policy(
    pol(
        *[
            stmt(Sid=f"S{i}", Effect="Allow" if i % 2 else "Deny", Condition=c)
            for i, c in enumerate(CONDITIONS)
        ]
    )
)


@PROPERTY_SETTINGS
@given(requests)
def test_evaluation_never_raises_on_arbitrary_context_values(request: RequestContext) -> None:
    decision = evaluate_key_policy(ALL_OPERATORS_POLICY, request)
    assert isinstance(decision, Decision) and decision.reason
    assert not (decision.allowed and decision.deny)
