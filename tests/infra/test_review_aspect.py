"""The policy reviewer as a CDK aspect: the synthesized app's model key reviews clean (in the aspect and in
the template CloudFormation gets); a bad key in a small test stack gets error annotations; only model keys
are reviewed (and why the other keys cannot yield the model key is in infra/review_aspect.py)."""

from __future__ import annotations

import hashlib
import logging

import pytest
from aws_cdk import App, Aspects, Environment, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk.assertions import Annotations, Match
from synth_context import ACCOUNT, REGION, SAMPLE_MANIFEST, Synth

from infra.constructs.model_key import ModelKey
from infra.pcr_manifest import load_pcr_manifest
from infra.review_aspect import ANNOTATION_PREFIX, KeyPolicyReviewAspect, is_model_key, mark_model_key
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


def test_app_registers_the_aspect_and_its_model_key_reviews_clean(synth: Synth) -> None:
    aspect = _aspect(synth.app)
    assert aspect.manifest == MANIFEST and aspect.fail_on == "high"
    (path,) = aspect.reviews  # exactly one key is a model key: the weights and logs keys are not reviewed
    assert "ModelKey" in path
    review = aspect.reviews[path]
    assert review.findings == ()
    assert {g.verdict for g in review.grants} == {"attested-release", "plaintext-to-caller"}
    assert _errors(synth.stack) == [] and _warnings(synth.stack) == []


def test_synthesized_template_model_key_reviews_clean(synth: Synth) -> None:
    # what CloudFormation gets (the ModelKey's KeyPolicy property override included), reviewed like
    # `nitrovault policy review cdk.out` would
    reviews = review_template(synth.template.to_json(), source="Nitrovault", manifest=MANIFEST,
                              account=ACCOUNT, region=REGION)
    by_id = {r.key.split("/", 1)[1]: r for r in reviews}
    model = [r for k, r in by_id.items() if k.startswith("ModelKey")]
    assert len(model) == 1 and model[0].findings == ()
    # the other keys keep CDK's default policy: root delegation, which is why only model keys are
    # reviewed at synth (they protect ciphertext at rest and logs, never the model's data key)
    others = [r for k, r in by_id.items() if not k.startswith("ModelKey")]
    assert others
    assert all("NV-ROOT-DELEGATION" in {f.rule_id for f in r.findings} for r in others)


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
