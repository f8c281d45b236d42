"""The policy reviewer as a CDK aspect: the synthesized app reviews EVERY key (model, store, logs, alarm
topic) and each reviews clean with zero findings -- in the aspect, in the template CloudFormation gets, and
through ``nitrovault policy review cdk.out`` itself (exit 0 even with ``--fail-on low``); a bad key in a
small test stack gets error annotations; small stacks review only model keys unless asked."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
from aws_cdk import App, Aspects, Environment, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk.assertions import Annotations, Match
from synth_context import ACCOUNT, REGION, SAMPLE_MANIFEST, Synth
from typer.testing import CliRunner

from infra.constructs.model_key import ModelKey
from infra.pcr_manifest import load_pcr_manifest
from infra.review_aspect import ANNOTATION_PREFIX, KeyPolicyReviewAspect, is_model_key, mark_model_key
from nitrovault.cli import app as cli_app
from nitrovault.policy.manifest import PcrManifest
from nitrovault.policy.review import review_template

MANIFEST = load_pcr_manifest(SAMPLE_MANIFEST)
REVIEW = Match.string_like_regexp(ANNOTATION_PREFIX)


def _aspect(app: App) -> KeyPolicyReviewAspect:
    (aspect,) = [a for a in Aspects.of(app).all if isinstance(a, KeyPolicyReviewAspect)]
    return aspect


def _stack(aspect: KeyPolicyReviewAspect) -> tuple[App, Stack]:
    app = App()
    stack = Stack(app, "Test", env=Environment(account=ACCOUNT, region=REGION))
    Aspects.of(app).add(aspect)
    return app, stack


def _errors(stack: Stack) -> list[str]:
    return [str(m.entry.data) for m in Annotations.from_stack(stack).find_error("*", REVIEW)]


def _warnings(stack: Stack) -> list[str]:
    return [str(m.entry.data) for m in Annotations.from_stack(stack).find_warning("*", REVIEW)]


def _model_key(stack: Stack, pcrs: dict[int, bytes], **kw: object) -> ModelKey:
    role = f"arn:aws:iam::{ACCOUNT}:role/"
    return ModelKey(
        stack, "ModelKey", account_id=ACCOUNT, admin_arns=[role + "admin"], sealer_arns=[role + "sealer"],
        enclave_role_arns=[role + "enclave"], pcrs=pcrs, encryption_context={"model": "m"},
        **kw,  # type: ignore[arg-type]
    )


# -- the synthesized app ----------------------------------------------------------------------------------


#: The stack's keys, by a fragment of their construct path / logical id.
KEYS = ("ModelKey", "StoreKey", "LogsKey", "AlarmTopicKey")


def _which(name: str) -> str:
    (fragment,) = [k for k in KEYS if k in name]
    return fragment


def test_app_reviews_every_key_and_each_is_clean(synth: Synth) -> None:
    aspect = _aspect(synth.app)
    assert aspect.manifest == (MANIFEST,) and aspect.fail_on == "high"
    assert aspect.model_keys_only is False  # the app reviews the at-rest keys too
    assert sorted(_which(path) for path in aspect.reviews) == sorted(KEYS)  # each exactly once
    for path, review in aspect.reviews.items():
        assert review.findings == (), (path, review.findings)
    verdicts = {_which(path): {g.verdict for g in r.grants} for path, r in aspect.reviews.items()}
    assert verdicts["ModelKey"] == {"attested-release", "plaintext-to-caller"}
    assert verdicts["StoreKey"] == {"service-mediated"}  # the sealer and the hosts, through S3 only
    # service principals only (CloudWatch Logs; CloudWatch alarms): no IAM identity uses these keys
    assert verdicts["LogsKey"] == verdicts["AlarmTopicKey"] == set()
    assert _errors(synth.stack) == [] and _warnings(synth.stack) == []


def test_synthesized_template_every_key_reviews_clean(synth: Synth) -> None:
    # what CloudFormation gets (every KeyPolicy property override included), reviewed like
    # `nitrovault policy review cdk.out` would: no key keeps a default (root-delegating) policy
    reviews = review_template(synth.template.to_json(), source="Nitrovault", manifest=MANIFEST,
                              account=ACCOUNT, region=REGION)
    assert sorted(_which(r.key) for r in reviews) == sorted(KEYS)
    for review in reviews:
        assert review.findings == (), (review.key, review.findings)
    for resource in synth.of_type("AWS::KMS::Key").values():
        assert ":root" not in json.dumps(resource["Properties"]["KeyPolicy"])


def test_policy_review_cli_on_cdk_out_exits_zero_with_no_finding(synth: Synth) -> None:
    # the deployment acceptance check, through the real CLI: every synthesized key, zero findings at any
    # severity (before the at-rest keys had their own policies this exited 3 on root delegation)
    result = CliRunner().invoke(
        cli_app,
        ["policy", "review", str(synth.outdir), "--pcr-manifest", str(SAMPLE_MANIFEST),
         "--format", "json", "--fail-on", "low"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["findings"] == []
    assert sorted(_which(k["key"]) for k in report["keys"]) == sorted(KEYS)


# -- small test stacks ------------------------------------------------------------------------------------


def test_marked_default_policy_key_gets_error_annotations() -> None:
    _, stack = _stack(KeyPolicyReviewAspect(MANIFEST))
    key = kms.Key(stack, "Bad")
    mark_model_key(key)
    errors = _errors(stack)
    assert any("NV-ROOT-DELEGATION" in e for e in errors)
    assert any("NV-ESCALATION" in e for e in errors)
    assert all(MANIFEST.pcr_hex(0)[:16] not in e for e in errors)  # no measurement values in messages


def test_unmarked_key_is_not_reviewed_unless_asked() -> None:
    _, stack = _stack(KeyPolicyReviewAspect(MANIFEST))
    key = kms.Key(stack, "Logs")
    assert not is_model_key(key.node.default_child)  # type: ignore[arg-type]
    assert _errors(stack) == []
    _, every = _stack(KeyPolicyReviewAspect(MANIFEST, model_keys_only=False))
    kms.Key(every, "Logs")
    assert any("NV-ROOT-DELEGATION" in e for e in _errors(every))


def test_model_key_construct_is_reviewed_and_clean_with_its_manifest() -> None:
    aspect = KeyPolicyReviewAspect(MANIFEST)
    _, stack = _stack(aspect)
    _model_key(stack, dict(MANIFEST.pcrs))
    assert _errors(stack) == [] and _warnings(stack) == []
    assert len(aspect.reviews) == 1


def test_model_key_for_another_image_is_an_error() -> None:
    _, stack = _stack(KeyPolicyReviewAspect(MANIFEST))
    _model_key(stack, {**MANIFEST.pcrs, 2: hashlib.sha384(b"edited enclave").digest()})
    assert any("NV-MANIFEST-MISMATCH" in e for e in _errors(stack))


def test_findings_below_fail_on_are_warnings() -> None:
    _, stack = _stack(KeyPolicyReviewAspect(MANIFEST, fail_on="critical"))
    mark_model_key(kms.Key(stack, "Bad"))
    errors, warnings = _errors(stack), _warnings(stack)
    assert any("NV-ROOT-DELEGATION" in e for e in errors)  # critical
    assert any("NV-PLAINTEXT-UNATTESTED" in w for w in warnings)  # high < critical
    assert not any("NV-PLAINTEXT-UNATTESTED" in e for e in errors)


def test_role_references_are_rendered_like_the_template_review() -> None:
    # a role created in the stack appears in the policy as Fn::GetAtt: rendered as its ARN, the evaluator
    # can prove the unattested Decrypt
    _, stack = _stack(KeyPolicyReviewAspect(MANIFEST))
    role = iam.Role(stack, "Reader", role_name="reader", assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"))
    policy = iam.PolicyDocument(
        statements=[
            iam.PolicyStatement(actions=["kms:Decrypt"], principals=[iam.ArnPrincipal(role.role_arn)],
                                resources=["*"])
        ]
    )
    mark_model_key(kms.Key(stack, "Key", policy=policy))
    errors = _errors(stack)
    assert any("NV-PLAINTEXT-UNATTESTED" in e and f"arn:aws:iam::{ACCOUNT}:role/reader" in e for e in errors)


def test_debug_manifest_is_an_error_unless_unsafe(caplog: pytest.LogCaptureFixture) -> None:
    debug = PcrManifest(pcrs={0: bytes(48), 1: bytes(48), 2: bytes(48)})
    _, stack = _stack(KeyPolicyReviewAspect(debug))
    _model_key(stack, dict(debug.pcrs), unsafe_allow_debug_pcrs=True)
    assert any("NV-PCR-DEBUG" in e for e in _errors(stack))
    _, unsafe = _stack(KeyPolicyReviewAspect(debug, unsafe_allow_debug_pcrs=True))
    _model_key(unsafe, dict(debug.pcrs), unsafe_allow_debug_pcrs=True)
    with caplog.at_level(logging.WARNING):
        assert _errors(unsafe) == []
        assert any("NV-PCR-DEBUG" in w for w in _warnings(unsafe))
    assert any("UNSAFE" in r.getMessage() and "not an error" in r.getMessage() for r in caplog.records)


def test_bad_fail_on_is_refused() -> None:
    with pytest.raises(ValueError, match="fail_on"):
        KeyPolicyReviewAspect(MANIFEST, fail_on="severe")
