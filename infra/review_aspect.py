"""The policy reviewer as a CDK aspect: key policies are reviewed at synth time.

``Aspects.of(app).add(KeyPolicyReviewAspect(manifest))`` visits every construct; for each
``aws_kms.CfnKey`` that is a *model key* (every key with ``model_keys_only=False``, which is how
:func:`infra.app.build_app` registers it) it resolves the key policy
(``Stack.of(node).resolve(node.key_policy)``), renders the intrinsics that remain exactly as the template
review does (:func:`nitrovault.policy.cfn.render_intrinsics`, with the stack's IAM roles, account and
region), reviews it against the images' PCR manifests (one, or several in a rollout) with
:func:`nitrovault.policy.review.review_policy`, and annotates the key: ``add_error`` for findings at or
above ``fail_on`` (default ``high``), ``add_warning_v2`` for the rest. ``python -m infra.app`` (``make
synth``) refuses to write an assembly with errors, so a model key that the reviewer would fail cannot be
synthesized.

Which keys are reviewed: a model key is a ``CfnKey`` under a
:class:`infra.constructs.model_key.ModelKey`, or one marked with :func:`mark_model_key` (metadata
``nitrovault:model-key``); with ``model_keys_only=True`` (the default, for small test stacks) only those
are reviewed. The app reviews every key: the stack's at-rest keys (the weights store's SSE-KMS key, the
log groups' key, the alarm topic's key) get explicit policies from :mod:`nitrovault.policy.build` that
name no account root, and the reviewer judges them with the same rules (their S3-mediated and
service-principal grants are *at-rest* use: see :mod:`nitrovault.policy.review`), so a regression to a
delegating policy on any key fails the synth.

Invariants:

* A debug manifest or all-zero PCRs in a policy is an error unless ``unsafe_allow_debug_pcrs`` is set
  (the app's ``unsafeAllowDebugPcrs``); then those findings are warnings and a warning is logged.
* Annotation messages are the reviewer's messages: they never carry PCR values or key material.
* A policy the reviewer cannot parse is an error, never skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jsii
from aws_cdk import Annotations, IAspect, Stack, Token
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import IConstruct

from infra.constructs.model_key import ModelKey
from nitrovault.errors import NitrovaultError
from nitrovault.policy.cfn import TemplateEnv, render_intrinsics
from nitrovault.policy.manifest import PcrManifest
from nitrovault.policy.review import SEVERITY_ORDER, Finding, KeyReview, review_policy

__all__ = ["MODEL_KEY_METADATA", "KeyPolicyReviewAspect", "is_model_key", "mark_model_key"]

log = logging.getLogger(__name__)

#: Construct metadata type that marks a CfnKey as a model key (value ``true``).
MODEL_KEY_METADATA = "nitrovault:model-key"
#: Prefix of every annotation this aspect adds (searchable in ``cdk synth`` output and tests).
ANNOTATION_PREFIX = "nitrovault policy review"


def _cfn_key(key: IConstruct) -> kms.CfnKey:
    if isinstance(key, kms.CfnKey):
        return key
    child = key.node.default_child
    if not isinstance(child, kms.CfnKey):
        raise TypeError("mark_model_key needs a kms.Key or kms.CfnKey")
    return child


def mark_model_key(key: IConstruct) -> None:
    """Mark ``key`` (a ``kms.Key`` or its ``CfnKey``) as a model key: the aspect will review it."""
    _cfn_key(key).node.add_metadata(MODEL_KEY_METADATA, True)


def is_model_key(node: kms.CfnKey) -> bool:
    """True for a CfnKey marked with :func:`mark_model_key` or built inside a :class:`ModelKey`."""
    if any(entry.type == MODEL_KEY_METADATA for entry in node.node.metadata):
        return True
    return any(isinstance(scope, ModelKey) for scope in node.node.scopes)


def _template_env(stack: Stack) -> TemplateEnv:
    """The stack's IAM roles and users by logical id (so ``Fn::GetAtt [Role, Arn]`` renders as a role ARN
    the evaluator can reason about), and the account and region when they are concrete."""
    resources: dict[str, Any] = {}
    for construct in stack.node.find_all():
        if not isinstance(construct, iam.CfnRole | iam.CfnUser) or Stack.of(construct) is not stack:
            continue
        logical = stack.resolve(stack.get_logical_id(construct))
        name = construct.role_name if isinstance(construct, iam.CfnRole) else construct.user_name
        props = {}
        if name is not None:
            props["RoleName" if isinstance(construct, iam.CfnRole) else "UserName"] = stack.resolve(name)
        resources[str(logical)] = {"Type": construct.cfn_resource_type, "Properties": props}
    account = None if Token.is_unresolved(stack.account) else stack.account
    region = None if Token.is_unresolved(stack.region) else stack.region
    return TemplateEnv(resources, {}, account, region)


@jsii.implements(IAspect)
class KeyPolicyReviewAspect:
    """Review model keys' policies at synth time; annotate each finding on the key (see module doc)."""

    def __init__(
        self,
        manifest: PcrManifest | Sequence[PcrManifest] | None,
        *,
        fail_on: str = "high",
        model_keys_only: bool = True,
        unsafe_allow_debug_pcrs: bool = False,
    ) -> None:
        if fail_on not in SEVERITY_ORDER:
            raise ValueError(f"fail_on must be one of {sorted(SEVERITY_ORDER)}, not {fail_on!r}")
        self.manifest = manifest
        self.fail_on = fail_on
        self.model_keys_only = model_keys_only
        self.unsafe_allow_debug_pcrs = unsafe_allow_debug_pcrs
        self._envs: dict[str, TemplateEnv] = {}
        #: every review this aspect made, by construct path (for tests and the app's summary)
        self.reviews: dict[str, KeyReview] = {}

    def visit(self, node: IConstruct) -> None:
        if not isinstance(node, kms.CfnKey):
            return
        if self.model_keys_only and not is_model_key(node):
            return
        stack = Stack.of(node)
        env = self._envs.get(stack.node.path)
        if env is None:
            env = self._envs[stack.node.path] = _template_env(stack)
        path = node.node.path
        annotations = Annotations.of(node)
        try:
            policy = render_intrinsics(stack.resolve(node.key_policy), env)
            if not isinstance(policy, Mapping):
                raise TypeError("the key has no policy document")
            logical = stack.resolve(stack.get_logical_id(node))
            key_arn = f"arn:aws:kms:{env.region or 'us-east-1'}:{env.account or '999988887777'}:key/{logical}"
            review = review_policy(
                policy, key=path, source=stack.stack_name, manifest=self.manifest, key_arn=key_arn
            )
        except (NitrovaultError, TypeError) as exc:
            annotations.add_error(f"{ANNOTATION_PREFIX}: the key policy cannot be reviewed: {exc}")
            return
        self.reviews[path] = review
        for finding in review.findings:
            message = _message(finding)
            if self._is_error(finding):
                annotations.add_error(message)
            else:
                annotations.add_warning_v2(f"{ANNOTATION_PREFIX}:{finding.rule_id}", message)

    def _is_error(self, finding: Finding) -> bool:
        if SEVERITY_ORDER[finding.severity] < SEVERITY_ORDER[self.fail_on]:
            return False
        if finding.category == "debug-pcr" and self.unsafe_allow_debug_pcrs:
            log.warning(
                "UNSAFE: %s on %s is a warning, not an error, because unsafeAllowDebugPcrs is set",
                finding.rule_id, finding.key,
            )
            return False
        return True


def _message(f: Finding) -> str:
    who = f", principal {f.principal}" if f.principal else ""
    return (
        f"{ANNOTATION_PREFIX} [{f.rule_id}, {f.category}, {f.severity}]: {f.message} "
        f"(statement {f.statement}{who})"
    )

